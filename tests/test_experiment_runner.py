"""The experiment runner end to end on a 2-step run: a declared row trained, evaluated and probed, written in
the one results format with its provenance; probes re-run alone; re-rendering; old layouts left alone."""

import datetime
import json
import shutil

import pytest
from conftest import BASE_CONFIG_FILES, config_flags, run_module, tiny_config

from experiments import run as runner


def tiny_overrides(cache_dir: str) -> list[str]:
  """The tiny transformer, 2 steps, as key=value overrides of its config file."""
  flags = config_flags(tiny_config(**{'train.steps': 2, 'data.cache_dir': cache_dir}))
  assert flags[:2] == ['--config', BASE_CONFIG_FILES['transformer']]
  return [f.removeprefix('--config.') for f in flags[2:]]


def checkpoint_probe(row: dict) -> dict:
  """What the shared loader restores from the row's run, beside what the row's metrics say."""
  import jax
  setup, state = runner.load_run(row['workdir'])
  return {'step': int(state['step']), 'params': sum(x.size for x in jax.tree.leaves(state['params'])),
          'steps_in_row': row['steps'], 'seq_len': setup.config.train.seq_len}


def declare(cache_dir: str, probes: dict) -> runner.Experiment:
  row = runner.Row('quick', BASE_CONFIG_FILES['transformer'], tiny_overrides(cache_dir), probes=probes,
                   note='a 2-step run')
  return runner.Experiment(
      'tiny-experiment', [row],
      title='A tiny experiment', description='One row, one probe.', eval_batches=1,
      sections=lambda rows: ['## The probe', '', f'restored step {runner.probe_value(rows[0], "checkpoint")["step"]}'])


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cache_dir):
  root = tmp_path_factory.mktemp('experiment')
  experiment = declare(cache_dir, {'checkpoint': checkpoint_probe})
  results = runner.run_experiment(experiment, runs=str(root / 'runs'), results=str(root / 'results'))
  return root, results


def test_the_declared_row_is_trained_evaluated_and_probed(trained):
  root, results = trained
  assert json.load(open(root / 'results' / 'tiny-experiment.json')) == results
  assert results['experiment'] == 'tiny-experiment' and len(results['commands']) == 1
  [row] = results['rows']
  assert row['name'] == 'quick' and row['config'] == BASE_CONFIG_FILES['transformer']
  assert 'train.steps=2' in row['overrides']
  assert row['workdir'] == str(root / 'runs' / 'tiny-experiment' / 'quick') and row['note'] == 'a 2-step run'
  assert row['steps'] == 2 and row['train_tokens'] == 2 * 4 * 16 and row['model'] == 'transformer'
  assert 0 < row['valid_bpb'] < 10 and 0 < row['test_bpb'] < 10 and row['valid_ppl'] > 1 and row['tokens_per_sec'] > 0
  config = BASE_CONFIG_FILES['transformer']
  assert row['command'].startswith(f'python -m train --config {config} --workdir {row["workdir"]}')
  assert '--config.train.steps=2' in row['command'] and row['commit'] and 'cpu' in row['hardware']
  assert datetime.date.fromisoformat(row['date']) <= datetime.date.today()
  probe = row['probes']['checkpoint']
  assert probe['value'] == {'step': 2, 'params': row['params'], 'steps_in_row': 2, 'seq_len': 16}
  assert probe['commit'] == row['commit'] and probe['hardware'] == row['hardware'] and probe['command']


def test_the_markdown_holds_the_table_the_sections_the_plot_and_the_provenance(trained):
  root, results = trained
  [row] = results['rows']
  text = open(root / 'results' / 'tiny-experiment.md').read()
  assert text.startswith('# A tiny experiment\n\nOne row, one probe.\n')
  assert 'first 1 batches of each split' in text
  assert f'| quick | transformer | {row["params"]:,} |' in text
  assert '## The probe\n\nrestored step 2' in text
  assert '![tiny-experiment](tiny-experiment.png)' in text and (root / 'results' / 'tiny-experiment.png').exists()
  provenance = text.split('## Provenance')[1]
  assert f'| quick | `{row["command"]}` | {row["commit"]} | {row["hardware"]} | {row["date"]} | a 2-step run |' in \
      provenance
  assert f'| quick | checkpoint | `{row["probes"]["checkpoint"]["command"]}` |' in provenance


def test_probes_rerun_alone_keep_the_metrics_and_the_other_probes(trained, tmp_path, cache_dir):
  root, results = trained
  shutil.copytree(root / 'results', tmp_path / 'results')
  changed = lambda row: runner.load_run(row['workdir'], train={'seq_len': 8})[0].config.train.seq_len
  experiment = declare(cache_dir, {'checkpoint': checkpoint_probe, 'changed': changed})
  again = runner.run_experiment(experiment, runs=str(root / 'runs'), results=str(tmp_path / 'results'), train=False,
                                probes={'changed'})
  [before], [after] = results['rows'], again['rows']
  assert after['probes']['changed']['value'] == 8 and after['probes']['checkpoint'] == before['probes']['checkpoint']
  assert {k: v for k, v in after.items() if k != 'probes'} == {k: v for k, v in before.items() if k != 'probes'}
  assert again['commands'] == results['commands']   # the same command line, once
  assert '| quick | checkpoint, changed |' in open(tmp_path / 'results' / 'tiny-experiment.md').read()


def test_the_cli_re_renders_without_training(trained, tmp_path):
  root, results = trained
  shutil.copytree(root / 'results', tmp_path / 'results')
  (tmp_path / 'results' / 'tiny-experiment.md').unlink()
  out = run_module('experiments.run', '--name', 'tiny-experiment', '--results', str(tmp_path / 'results'), '--render')
  assert out.returncode == 0, out.stderr
  assert json.load(open(tmp_path / 'results' / 'tiny-experiment.json')) == results
  text = open(tmp_path / 'results' / 'tiny-experiment.md').read()
  assert '| quick | transformer |' in text and '$ ' not in out.stdout   # rendered, nothing run


def test_results_in_an_earlier_layout_are_read_or_left_alone(tmp_path):
  """experiments.run's own earlier layout (a list of rows) is read as rows; a paper script's is refused."""
  assert runner.read_results(str(tmp_path / 'x.json'), 'x') == {'experiment': 'x', 'commands': [], 'rows': []}
  (tmp_path / 'listed.json').write_text('[{"name": "quick"}]')
  assert runner.read_results(str(tmp_path / 'listed.json'), 'listed')['rows'] == [{'name': 'quick'}]
  old = tmp_path / 'tiny-experiment.json'
  old.write_text('{"rows": {"quick": {}}}')
  with pytest.raises(SystemExit, match='layout of an earlier script'):
    runner.run_experiment(runner.Experiment('tiny-experiment', []), results=str(tmp_path))
  assert old.read_text() == '{"rows": {"quick": {}}}' and not (tmp_path / 'tiny-experiment.md').exists()

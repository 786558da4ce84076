"""The experiment runner: train declared rows, evaluate them, run their probes, write one results format.

  python -m experiments.run --name wikitext2-baseline \\
      --configs experiments/configs/wikitext2_transformer.py [more configs, FILE:ARG allowed] \\
      [--override train.steps=100 ...] [--render]

Run from the repository root. An experiment (`Experiment`) declares its rows (`Row`: a name, a config
FILE:ARG, overrides, and the probes to run on the trained run). `run_experiment` trains each row with
`python -m train` in runs/<experiment>/<row> (a finished run is only evaluated), evaluates it with
`python -m train.evaluate` on the valid and test splits, runs the probes once every row is trained, and
writes the results. The command above declares one row per config (named after the config path);
experiments/{hat,landmark,lexinvariant,mor,mrt5,tokenformer_scaling}.py declare theirs and their probes.

The results format, the same for every experiment:
  results/<name>.json  {"experiment": name, "commands": [the experiment commands that wrote it], "rows": [...]}
      a row: name, config, overrides, workdir (what it declared, where it ran); model, params, steps,
      train_tokens, train_flops, valid_ppl, test_ppl, valid_bpb, test_bpb, tokens_per_sec, ...,
      model_metrics (its training metrics and final evaluation); command, commit, hardware, date (the
      training command, the code it started from, where and when); note; probes: {probe name: {"value":
      what the probe measured, "command", "commit", "hardware", "date"}}. Re-running a row replaces its
      metrics and keeps the results of the probes not run again.
  results/<name>.md    the experiment's description, the metrics table, its own sections (from the probes),
      its plots, and the provenance of every row and probe.
  results/<name>.png   the main plot (by default the loss curves); results/<name>-<suffix>.png any others.
A results/<name>.json of experiments.run's earlier layout (a list of rows) is read as these rows; one in another
layout (written by an earlier paper script) is left alone: the runner stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping, Sequence

from train import metrics as metrics_lib

COLUMNS = ('model', 'params', 'non_embedding_params', 'steps', 'train_tokens', 'train_flops', 'best_valid_ppl',
           'valid_ppl', 'test_ppl', 'ratio_to_first', 'valid_bpb', 'test_bpb', 'tokens_per_sec', 'train_time_s')
METRICS_NOTE = ('Perplexity is per token of the run\'s tokenizer; bits per byte is total NLL over the split\'s UTF-8 '
                'bytes (comparable across tokenizers). best_valid_ppl is the lowest whole-validation-split perplexity '
                'among the evaluations during training (the final checkpoint gives valid_ppl/test_ppl); '
                'ratio_to_first is best_valid_ppl over the first row\'s. tokens/sec is the median over logged '
                'windows, compilation excluded; train_time_s is compilation plus steps.')

Probe = Callable[[dict], object]   # a trained row's results (workdir, metrics, earlier probes) -> JSON-able value


def run_name(config_path: str) -> str:
  """experiments/configs/x.py:tiny,a -> x-tiny-a"""
  file, _, arg = config_path.partition(':')
  return '-'.join([os.path.splitext(os.path.basename(file))[0], *[a for a in arg.split(',') if a]])


def row_workdir(runs: str, experiment: str, row: str) -> str:
  """Where a row of an experiment trains; relative, so that the recorded commands stay portable."""
  return os.path.join(runs, experiment, row)


def git_commit() -> str:
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                            check=True).stdout.strip()
    # Results tables are outputs, rewritten while an experiment runs: only code makes a commit dirty.
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.', ':!results'],
                           capture_output=True, text=True).stdout.strip()
    return commit + ('-dirty' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def hardware() -> str:
  import jax
  device = jax.devices()[0]
  return f'{jax.device_count()}x {device.device_kind} ({device.platform}), {os.cpu_count()} host cores, {platform.machine()}'


def invocation() -> str:
  """This process's command line, as `python -m module args` when it was started that way."""
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  program = f'python -m {spec.name}' if spec else f'python {sys.argv[0]}'
  return ' '.join([program, shlex.join(sys.argv[1:])]).strip()


def run(cmd: list[str]) -> str:
  print('$', ' '.join(cmd), flush=True)
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.stderr.write(out.stderr[-3000:])
    raise SystemExit(f'command failed ({out.returncode}): {" ".join(cmd)}')
  return out.stdout


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_time_s(records: list[dict]) -> float:
  """Seconds a run spent compiling and stepping, summed over every invocation that trained it (evaluation
  and checkpointing excluded), from its own metrics: the same number however often it was resumed."""
  total, previous = 0.0, 0
  for r in records:
    if 'compile_time_s' in r:   # an invocation starts at this step
      total, previous = total + r['compile_time_s'], r['step']
    elif 'step_time_s' in r:
      total, previous = total + r['step_time_s'] * (r['step'] - previous), r['step']
  return total


def evaluate(workdir: str, *, split: str = 'valid', max_batches: int = 0, overrides: Sequence[str] = (),
             options: Sequence[str] = ()) -> dict:
  """`python -m train.evaluate` on a finished run: its JSON line. `overrides` (key=value) change the run's
  config, `options` are more of the evaluator's flags (e.g. --per_position); `max_batches` 0 is the whole split."""
  out = run([sys.executable, '-m', 'train.evaluate', '--workdir', workdir, '--split', split, '--max_batches',
             str(max_batches), *options, *[f'--config.{o}' for o in overrides]])
  return json.loads(out.strip().splitlines()[-1])


def load_config(workdir: str, **changes: Mapping[str, object]):
  """A run's saved config, with `changes` setting values per section, e.g. `model={'inference': 'cached'}`."""
  from train import config as config_lib
  config = config_lib.load_workdir_config(workdir)
  for section, values in changes.items():
    config[section].update(values)
  return config


def load_run(workdir: str, **changes: Mapping[str, object]):
  """(setup, state) of a finished run's latest checkpoint, for probes; `changes` as in `load_config`, e.g.
  `load_run(w, data={'dir': other_corpus})` evaluates the run on another copy of its corpus."""
  from train import restore
  return restore.load_run(load_config(workdir, **changes), workdir)


def train_and_evaluate(config_path: str | None, workdir: str, overrides: Sequence[str], name: str | None = None,
                       max_batches: int = 0) -> dict:
  """Train (config_path None: the config already in `workdir`), evaluate on valid and test (the first
  `max_batches` batches; 0 = whole splits), return the row."""
  flags = [f'--config.{o}' for o in overrides]
  config_flag = ['--config', config_path] if config_path else []
  commit = git_commit()   # the code the run starts from
  run([sys.executable, '-m', 'train', *config_flag, '--workdir', workdir, *flags])
  evals = {split: evaluate(workdir, split=split, max_batches=max_batches) for split in ('valid', 'test')}
  records = read_metrics(workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  first = records[0]
  speeds = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
  mfus = [r['mfu'] for r in records if 'mfu' in r and not math.isnan(r['mfu'])]   # NaN: the device's peak is unknown
  peak_memory, peak_measured = metrics_lib.peak_memory(
      max((r['peak_memory_bytes'] for r in records if 'peak_memory_bytes' in r), default=None), first)
  t = config['train']
  train_tokens = evals['valid']['step'] * t['batch_size'] * t['seq_len']
  return {
      'name': name or run_name(config_path), 'config': config_path, 'overrides': list(overrides), 'workdir': workdir,
      'model': config['model']['name'], 'params': first.get('params'),
      'non_embedding_params': first.get('non_embedding_params'), 'steps': evals['valid']['step'],
      'train_tokens': train_tokens,
      'train_flops': first['flops_per_token'] * train_tokens if 'flops_per_token' in first else None,
      'valid_ppl': evals['valid']['ppl'], 'test_ppl': evals['test']['ppl'], 'valid_tokens': evals['valid']['tokens'],
      'valid_bpb': evals['valid']['bpb'], 'test_bpb': evals['test']['bpb'],
      'tokens_per_sec': statistics.median(speeds) if speeds else None, 'train_time_s': round(train_time_s(records)),
      'mfu': statistics.median(mfus) if mfus else None, 'compile_time_s': first.get('compile_time_s'),
      'peak_memory_bytes': peak_memory, 'peak_memory_measured': peak_measured,
      'model_metrics': {k: v for k, v in evals['valid'].items() if '/' in k},
      'command': ' '.join(['python -m train', *config_flag, '--workdir', workdir, *flags]),
      'commit': commit, 'hardware': hardware(), 'date': datetime.date.today().isoformat(),
  }


def fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}' if abs(value) < 1e4 else f'{value:,.0f}'
  if isinstance(value, int):
    return f'{value:,}'
  return '' if value is None else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
  """Markdown table lines."""
  return (['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
          + ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows])


def workdir_of(row: dict) -> str:
  # Rows written before the workdir was recorded (e.g. the arena's) name it in their command.
  return row.get('workdir') or row['command'].split('--workdir ')[1].split()[0]


def probe_value(row: dict, probe: str):
  """What `probe` measured on the row (None: not run)."""
  return row.get('probes', {}).get(probe, {}).get('value')


def probed(rows: list[dict], probe: str) -> dict:
  """Row name -> what `probe` measured on it, for the rows it has run on."""
  return {r['name']: value for r in rows if (value := probe_value(r, probe)) is not None}


def best_valid_ppl(row: dict) -> float:
  """The lowest whole-validation-split perplexity: the final evaluation, or any during training that
  covered as many tokens (eval_batches=0)."""
  candidates = [row['valid_ppl']]
  path = os.path.join(workdir_of(row), 'metrics.jsonl')
  if row.get('valid_tokens') and os.path.exists(path):
    candidates += [r['eval_ppl'] for r in read_metrics(workdir_of(row))
                   if 'eval_ppl' in r and r['eval_tokens'] >= row['valid_tokens']]
  return min(candidates)


def plot_curves(rows: list[dict], step_offsets: Mapping[str, int] | None = None):
  """Training (and validation) loss against step, one line per row whose run directory is here; a row's
  steps shifted by its `step_offsets` entry (a run continuing another)."""
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  drawn = False
  for r in rows:
    if not os.path.exists(os.path.join(workdir_of(r), 'metrics.jsonl')):
      continue
    offset = (step_offsets or {}).get(r['name'], 0)
    records = read_metrics(workdir_of(r))
    train = [(x['step'] + offset, x['loss']) for x in records if 'loss' in x]
    evals = [(x['step'] + offset, x['eval_loss']) for x in records if 'eval_loss' in x]
    if not train:
      continue
    line, = ax.plot(*zip(*train), label=f'{r["name"]} train')
    if evals:
      ax.plot(*zip(*evals), 'o--', color=line.get_color(), label=f'{r["name"]} valid')
    drawn = True
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.legend()
  return fig if drawn else None


@dataclasses.dataclass(frozen=True)
class Row:
  """One training run of an experiment and the probes to run on it once trained."""
  name: str
  config: str | None                     # FILE:ARG; None: the config that `prepare` wrote into the run directory
  overrides: Sequence[str] = ()          # key=value, as --config.key=value of `python -m train`
  probes: Mapping[str, Probe] = dataclasses.field(default_factory=dict)   # probe name -> probe, run in this order
  prepare: Sequence[str] = ()            # `python -m` arguments that create the run directory (e.g. train.grow ...)
  note: str = ''


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Rows trained and probed together, and how their results read."""
  name: str                              # results/<name>.{json,md,png}, runs/<name>/<row>
  rows: Sequence[Row]                    # in table order; earlier rows train first
  title: str = ''                        # the markdown heading (default: the name)
  description: str = ''                  # markdown under the heading: what the rows and probes mean
  eval_batches: int = 0                  # batches of each split in the final evaluation (0 = whole splits)
  sections: Callable[[list[dict]], list[str]] | None = None   # markdown lines after the metrics table
  # results/<name><suffix>.png: suffix -> a function drawing the rows on a new figure (None: nothing to draw yet)
  plots: Mapping[str, Callable[[list[dict]], object]] = dataclasses.field(default_factory=lambda: {'': plot_curves})


def read_results(path: str, name: str) -> dict:
  if not os.path.exists(path):
    return {'experiment': name, 'commands': [], 'rows': []}
  with open(path) as f:
    results = json.load(f)
  if isinstance(results, list):   # experiments.run's earlier layout: the rows alone, each with its provenance
    return {'experiment': name, 'commands': [], 'rows': results}
  if not isinstance(results, dict) or 'experiment' not in results:
    raise SystemExit(f'{path} holds results in the layout of an earlier script; move it aside (or pass another '
                     '--results directory) to run this experiment')
  return results


def provenance_tables(rows: list[dict]) -> list[str]:
  """Each row's training command, commit, hardware and date, then those of its probes (grouped when they agree)."""
  lines = table(['row', 'command', 'commit', 'hardware', 'date', 'note'],
                [[r['name'], f'`{r["command"]}`', r['commit'], r['hardware'], r['date'], r.get('note')]
                 for r in rows])
  probed = []
  for r in rows:
    groups = {}
    for name, p in r.get('probes', {}).items():
      groups.setdefault((p['command'], p['commit'], p['hardware'], p['date']), []).append(name)
    probed += [[r['name'], ', '.join(names), f'`{command}`', commit, host, date]
               for (command, commit, host, date), names in groups.items()]
  if probed:
    lines += ['', *table(['row', 'probes', 'command', 'commit', 'hardware', 'date'], probed)]
  return lines


def render(experiment: Experiment, results: dict, plots: Sequence[str]) -> str:
  rows = results['rows']
  best = [best_valid_ppl(r) for r in rows]
  produced = ' and '.join(f'`{c}`' for c in results['commands']) or 'no command yet'
  evaluated = (f' Final evaluations cover the first {experiment.eval_batches} batches of each split.'
               if experiment.eval_batches else '')
  lines = [f'# {experiment.title or experiment.name}', '']
  if experiment.description:
    lines += [experiment.description, '']
  lines += [f'Produced by {produced} (each row\'s command is in the provenance table). {METRICS_NOTE}{evaluated}', '']
  body = []
  for r, b in zip(rows, best):
    cells = {**r, 'best_valid_ppl': b, 'ratio_to_first': b / best[0]}
    body.append([r['name'], *(cells.get(c) for c in COLUMNS)])
  lines += table(['row', *COLUMNS], body)
  sections = experiment.sections(rows) if experiment.sections else []
  if sections:
    lines += ['', *sections]
  lines += ['', *[f'![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})' for p in plots]]
  lines += ['', '## Provenance', '', *provenance_tables(rows)]
  return '\n'.join(lines) + '\n'


def draw(experiment: Experiment, rows: list[dict], stem: str) -> list[str]:
  """Write the experiment's plots next to its table; the paths of those with something to draw."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  written = []
  for suffix, plot in experiment.plots.items():
    fig = plot(rows)
    if fig is not None:
      fig.tight_layout()
      fig.savefig(f'{stem}{suffix}.png', dpi=120)
      plt.close(fig)
      written.append(f'{stem}{suffix}.png')
  return written


def run_experiment(experiment: Experiment, *, runs: str = 'runs', results: str = 'results',
                   rows: Collection[str] | None = None, train: bool = True, probes: Collection[str] | None = None,
                   overrides: Sequence[str] = ()) -> dict:
  """Train and evaluate the rows named in `rows` (all by default; `train=False` keeps their earlier results),
  then run their probes (those named in `probes`, all by default), and write results/<name>.{json,md} and the
  plots. `overrides` (key=value) apply to every row trained, after its own. Rows not named keep their earlier
  results, so rows of other invocations stay in the table. Returns the results."""
  os.makedirs(results, exist_ok=True)
  stem = os.path.join(results, experiment.name)
  saved = read_results(stem + '.json', experiment.name)
  by_name = {r['name']: r for r in saved['rows']}
  chosen = [row for row in experiment.rows if rows is None or row.name in rows]
  declared = [row.name for row in experiment.rows]
  command = invocation()

  def save():
    if command not in saved['commands']:   # this invocation trained or probed something
      saved['commands'].append(command)
    saved['rows'] = ([by_name[n] for n in declared if n in by_name]
                     + [r for n, r in by_name.items() if n not in declared])
    with open(stem + '.json', 'w') as f:
      json.dump(saved, f, indent=1, default=float)   # default: numpy scalars from probes

  for row in chosen if train else ():
    directory = row_workdir(runs, experiment.name, row.name)
    if row.prepare and not os.path.exists(os.path.join(directory, 'config.json')):   # prepared once, then reused
      run([sys.executable, '-m', *row.prepare])
    result = train_and_evaluate(row.config, directory, [*row.overrides, *overrides], name=row.name,
                                max_batches=experiment.eval_batches)
    if row.prepare:
      result['command'] = f'python -m {shlex.join(row.prepare)} && {result["command"]}'
    result.update(note=row.note, probes=by_name.get(row.name, {}).get('probes', {}))
    by_name[row.name] = result
    save()
  # Probes run once every row is trained: timings among them see no training running.
  measured = {'command': command, 'commit': git_commit(), 'hardware': hardware(),
              'date': datetime.date.today().isoformat()}
  for row in chosen:
    todo = {name: probe for name, probe in row.probes.items() if probes is None or name in probes}
    if todo and row.name not in by_name:
      print(f'{row.name} has not been trained: its probes ({", ".join(todo)}) are left out', flush=True)
      continue
    for name, probe in todo.items():
      print(f'probe {name} on {row.name}', flush=True)
      by_name[row.name]['probes'][name] = {'value': probe(by_name[row.name]), **measured}
      save()
  plots = draw(experiment, saved['rows'], stem)
  markdown = render(experiment, saved, plots)
  with open(stem + '.md', 'w') as f:
    f.write(markdown)
  print(markdown, flush=True)
  return saved


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options every experiment's command line shares."""
  parser.add_argument('--runs', default='runs', help='parent of the run directories')
  parser.add_argument('--results', default='results')
  parser.add_argument('--override', nargs='*', default=[], help='key=value applied to every row trained (smoke runs)')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', required=True, help='results/<name>.md')
  parser.add_argument('--configs', nargs='*', default=[], help='config files (FILE or FILE:ARG)')
  parser.add_argument('--render', action='store_true', help='only re-render results/<name>.md from its JSON')
  add_arguments(parser)
  args = parser.parse_args()
  experiment = Experiment(args.name, [Row(run_name(c), c) for c in args.configs])
  run_experiment(experiment, runs=args.runs, results=args.results, rows=[] if args.render else None,
                 overrides=args.override)


if __name__ == '__main__':
  main()

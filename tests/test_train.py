import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, config_flags, run_module

from train import checkpoint, config as config_lib, restore, setup, trainer


def train(config, workdir):
  return trainer.Trainer(config, str(workdir)).run()


def final_state(config, workdir):
  return restore.load_run(config, str(workdir))[1]


def records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.parametrize('schedule', ['cosine', 'wsd'])
def test_learning_rate_schedules(make_config, schedule):
  t = make_config(**{'train.steps': 100, 'train.warmup_steps': 5, 'train.lr': 1.0, 'train.min_lr_ratio': 0.1,
                     'train.schedule': schedule}).train
  lr = setup.make_optimizer(t)[1]
  assert float(lr(0)) == 0 and float(lr(5)) == pytest.approx(1.0) and float(lr(100)) == pytest.approx(0.1)
  if schedule == 'wsd':   # constant until the last 20%, then linear
    assert float(lr(80)) == pytest.approx(1.0) and float(lr(90)) == pytest.approx(0.55)
  else:
    assert float(lr(52)) == pytest.approx(0.55, abs=0.01)
  with pytest.raises(config_lib.ConfigError, match='train.schedule'):
    config_lib.validate(make_config(**{'train.schedule': 'step'}))


def test_tiny_run_learns_and_logs(make_config, tmp_path):
  result = train(make_config(**{'train.steps': 40, 'train.lr': 1e-2, 'train.log_every': 5, 'train.eval_every': 20,
                                'checkpoint.every': 20}), tmp_path)
  logs = records(tmp_path)
  losses = [r['loss'] for r in logs if 'loss' in r]
  assert losses[-1] < losses[0] - 1.0   # from ~ln(257) = 5.5 down
  assert result['eval_loss'] < np.log(257) - 1.0   # a nat below the uniform distribution
  train_rec = next(r for r in logs if 'loss' in r)
  assert {'step', 'loss', 'lr', 'tokens_per_sec', 'mfu', 'grad_norm'} <= set(train_rec)
  eval_rec = [r for r in logs if 'eval_loss' in r]
  assert [r['step'] for r in eval_rec] == [20, 40]
  assert {'eval_loss', 'eval_ppl', 'eval_bpb'} <= set(eval_rec[0])
  assert json.load(open(tmp_path / 'config.json'))['model']['vocab_size'] == 257


def test_resume_is_bitwise_identical(make_config, tmp_path):
  train(make_config(), tmp_path / 'straight')
  interrupted = make_config(**{'train.stop_at': 3})
  assert train(interrupted, tmp_path / 'resumed')['stopped_at'] == 3
  assert train(make_config(), tmp_path / 'resumed')['start_step'] == 3
  a, b = final_state(make_config(), tmp_path / 'straight'), final_state(make_config(), tmp_path / 'resumed')
  assert int(a['step']) == int(b['step']) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gradient_accumulation_matches_one_big_batch(make_config, tmp_path):
  one = train(make_config(**{'train.steps': 3}), tmp_path / 'one')
  two = train(make_config(**{'train.steps': 3, 'train.grad_accum': 2}), tmp_path / 'two')
  assert one['loss'] == pytest.approx(two['loss'], rel=1e-5)
  a, b = final_state(make_config(), tmp_path / 'one'), final_state(make_config(), tmp_path / 'two')
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(make_config, tmp_path):
  config = make_config(**{'train.lr': 1e30, 'train.warmup_steps': 0, 'train.steps': 50, 'checkpoint.every': 1})
  with pytest.raises(config_lib.TrainingStopped, match=r'non-finite loss .* at step (\d+)') as err:
    train(config, tmp_path)
  bad_step = int(str(err.value).split('at step ')[1].split(';')[0])
  last_good = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False).latest_step()
  assert last_good is not None and last_good < bad_step
  state = final_state(config, tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))


def test_interrupted_save_is_never_resumed_from(make_config, tmp_path):
  train(make_config(), tmp_path)                      # checkpoints at 3 and 6
  partial = tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp-1700000000'
  (partial / 'state').mkdir(parents=True)            # what kill -9 during a save leaves behind
  (partial / 'state' / 'half_written').write_bytes(b'\0' * 100)
  assert checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False).latest_step() == 6
  assert train(make_config(**{'train.steps': 9}), tmp_path)['start_step'] == 6


def test_sigterm_saves_and_exits_cleanly_then_resumes(make_config, tmp_path):
  config = make_config(**{'train.steps': 100000, 'checkpoint.every': 100000})
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  proc = subprocess.Popen([sys.executable, '-m', 'train', *config_flags(config), '--workdir', str(tmp_path)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and 'loss' in metrics.read_text()):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  saved = json.loads(out.strip().splitlines()[-1])['stopped_at']
  assert f'saved a checkpoint at step {saved}' in err
  assert checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False).latest_step() == saved
  assert train(make_config(**{'train.steps': saved + 2}), tmp_path)['start_step'] == saved


def test_wandb_offline_run_resumes_the_same_run(make_config, tmp_path):
  config = make_config(**{'wandb.mode': 'offline', 'train.stop_at': 3})
  env = {'WANDB_MODE': None, 'WANDB_API_KEY': None}
  for _ in range(2):   # stop at 3, then resume to 6
    out = run_module('train', *config_flags(config), '--workdir', str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    config.train.stop_at = 0
  runs = sorted(p.name for p in (tmp_path / 'wandb').glob('offline-run-*'))
  assert len(runs) == 2 and len({name.rsplit('-', 1)[1] for name in runs}) == 1


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, cache_dir):
  from conftest import tiny_config
  workdir = tmp_path_factory.mktemp('trained')
  train(tiny_config(**{'data.cache_dir': cache_dir, 'train.steps': 30}), workdir)
  return workdir


def test_evaluate_cli_prints_one_json_line(trained_workdir):
  out = run_module('train.evaluate', '--workdir', str(trained_workdir), '--split', 'test', '--max_batches', '3')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result['split'] == 'test' and result['step'] == 30 and result['tokens'] == 3 * 4 * 16
  assert result['ppl'] == pytest.approx(np.exp(result['loss']))
  assert 0 < result['bpb'] < 8


def test_sample_cli_continues_the_prompt(trained_workdir):
  out = run_module('train.sample', '--workdir', str(trained_workdir), '--prompt', 'import ', '--max_new_tokens',
                   '12', '--temperature', '0')
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('import ') and len(out.stdout.encode()) > len('import ')


def test_sample_cli_takes_a_file_of_prompts_and_writes_json_lines(trained_workdir, tmp_path):
  """Prompts of different lengths in one batch: each greedy completion equals that prompt run alone, and a
  stop string ends a completion before it."""
  prompts = ['import ', 'def main(argv):', 'x']
  (tmp_path / 'prompts.jsonl').write_text(''.join(json.dumps({'prompt': p}) + '\n' for p in prompts))
  common = ['--workdir', str(trained_workdir), '--max_new_tokens', '12', '--temperature', '0']
  out = run_module('train.sample', *common, '--prompts_file', str(tmp_path / 'prompts.jsonl'),
                   '--output', str(tmp_path / 'out.jsonl'))
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
  assert [r['prompt'] for r in rows] == prompts
  alone = run_module('train.sample', *common, '--prompt', prompts[1])
  assert alone.stdout == prompts[1] + rows[1]['completion'] + '\n'
  cut = rows[0]['completion'][3:5]
  stopped = run_module('train.sample', *common, '--prompt', prompts[0], '--stop', cut)
  assert stopped.stdout == prompts[0] + rows[0]['completion'][:rows[0]['completion'].index(cut)] + '\n'
  bad = run_module('train.sample', *common, '--prompt', 'x', '--top_p', '0')
  assert bad.returncode == 2 and bad.stderr.strip().startswith('error: sampling needs')

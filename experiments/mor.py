"""Mixture-of-Recursions at equal training FLOPs and at equal tokens, with router statistics:

  python -m experiments.mor --shape tiny [--rows 'vanilla,flops;recursive,flops;...'] [--eval_batches 50]
                            [--bench_steps N] [--override key=value ...]

Trains every row of experiments/configs/mor.py (ROW,BUDGET pairs below), evaluates it on WikiText-2
bytes (valid and test; expert-choice rows with the training top-k, the model's default and the official
code's evaluation, and again with σ > 0.5 routing, the causal rule of generation), and writes
results/mor-<shape>.{json,md,png}. Peak memory is
the device's measured peak, else XLA's compile-time estimate for the training step (arguments +
temporaries); router statistics are the training metrics averaged over the last 100 steps.
`--bench_steps N` re-times the training step of every row run (N steps in a scratch directory, after
all training, once per model) into bench_tokens_per_sec.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile

from experiments import run as runner

CONFIG = 'experiments/configs/mor.py'
ROWS = ('vanilla,flops', 'recursive,flops', 'mor2,flops', 'mor3,flops', 'mor3_token,flops', 'mor3_kvshare,flops',
        'recursive,tokens', 'mor3,tokens')
DESCRIPTION = (
    'WikiText-2 bytes (ppl per byte). `flops` rows train for the analytic training FLOPs of vanilla (3 x forward, '
    'active fractions counted: linear x c_r, attention x c_r²); `tokens` rows see vanilla\'s tokens. valid_ppl and '
    'test_ppl route expert-choice with the training top-k (the official code\'s evaluation: it looks at the whole '
    'window, so it is not causal); valid_ppl_threshold and test_ppl_threshold with σ > 0.5 (causal, as generation '
    'does). tokens_per_sec: median during the run; bench_tokens_per_sec: the same step '
    'timed with nothing else running. peak_memory_mb: the device\'s measured peak, else (CPU) XLA\'s estimate for '
    'the training step.')


def router_stats(row: dict, last_steps: int = 100) -> dict:
  """The router's training metrics (mor/...), averaged over the last `last_steps` steps."""
  records = [r for r in runner.read_metrics(row['workdir']) if 'loss' in r]
  recent = [r for r in records if r['step'] > records[-1]['step'] - last_steps]
  keys = sorted({k for r in recent for k in r if k.startswith('mor/')})
  return {k.removeprefix('mor/'): statistics.mean(r[k] for r in recent if k in r) for k in keys}


def threshold_eval(row: dict, eval_batches: int) -> dict:
  """Valid and test perplexity and bits per byte with expert-choice routed causally (σ > 0.5); the row's own
  evaluation is the default, the training top-k."""
  result = {}
  for split in ('valid', 'test'):
    ev = runner.evaluate(row['workdir'], split=split, max_batches=eval_batches,
                         overrides=['model.eval_routing=threshold'])
    result.update({f'{split}_ppl': ev['ppl'], f'{split}_bpb': ev['bpb']})
  return result


@functools.cache
def bench_model(shape: str, model: str, steps: int) -> float:
  """Median logged tokens/sec of `steps` training steps of a model (compilation excluded): the budgets only
  change the step count, so each model is timed once."""
  with tempfile.TemporaryDirectory() as scratch:
    workdir = os.path.join(scratch, model)
    runner.run([sys.executable, '-m', 'train', '--config', f'{CONFIG}:{shape},{model},flops', '--workdir', workdir,
                f'--config.train.steps={steps}', f'--config.train.eval_every={steps}', '--config.train.eval_batches=1',
                f'--config.checkpoint.every={steps}', f'--config.train.log_every={max(1, steps // 5)}'])
    return statistics.median(r['tokens_per_sec'] for r in runner.read_metrics(workdir) if 'tokens_per_sec' in r)


def declare(shape: str, eval_batches: int, bench_steps: int, pairs=ROWS) -> runner.Experiment:
  """The rows of `pairs` (ROW,BUDGET), named ROW-BUDGET."""
  from experiments.configs import mor as mor_configs
  rows = []
  for pair in pairs:
    model = pair.split(',')[0]
    probes = {'router': router_stats}
    if mor_configs.get_config(f'{shape},{pair}').model.get('router') == 'expert':   # also evaluate causally
      probes['threshold'] = functools.partial(threshold_eval, eval_batches=eval_batches)
    if bench_steps:
      probes['bench'] = lambda row, model=model: bench_model(shape, model, bench_steps)
    rows.append(runner.Row(pair.replace(',', '-'), f'{CONFIG}:{shape},{pair}', probes=probes))
  return runner.Experiment(f'mor-{shape}', rows, title=f'Mixture-of-Recursions, {shape}', description=DESCRIPTION,
                           eval_batches=eval_batches, sections=sections)


def sections(rows: list[dict]) -> list[str]:
  budget = lambda r: r['name'].rsplit('-', 1)[1]   # row names are ROW-BUDGET
  lines = ['## Budgets, routing at evaluation, speed and memory', '']
  threshold = lambda r, key: (runner.probe_value(r, 'threshold') or {}).get(key)
  lines += runner.table(
      ['row', 'budget', 'valid_ppl', 'test_ppl', 'valid_ppl_threshold', 'test_ppl_threshold', 'tokens_per_sec',
       'bench_tokens_per_sec', 'peak_memory_mb'],
      [[r['name'], budget(r), r['valid_ppl'], r['test_ppl'], threshold(r, 'valid_ppl'), threshold(r, 'test_ppl'),
        r['tokens_per_sec'], runner.probe_value(r, 'bench'),
        r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2 ** 20] for r in rows])
  routed = {name: stats for name, stats in runner.probed(rows, 'router').items() if stats}   # {}: no router
  if routed:
    keys = sorted({k for stats in routed.values() for k in stats})
    lines += ['', '## Router statistics (training, last 100 steps)', '',
              'utilisation_rN: fraction of tokens that recursion N updates; sigma_above_half_rN: fraction of '
              'recursion N\'s candidates with σ > 0.5; agreement_rN: how often σ > 0.5 agrees with top-k '
              'membership; dead_token_ratio: positions of the window that no sequence of the batch sends '
              'through the last recursion; depth_N_fraction / max_violation: token-choice loads.', '']
    lines += runner.table(['row', *keys], [[name, *(stats.get(k) for k in keys)] for name, stats in routed.items()])
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--rows', default=';'.join(ROWS), help="ROW,BUDGET pairs separated by ';' ('' re-renders)")
  parser.add_argument('--eval_batches', type=int, default=25)
  parser.add_argument('--bench_steps', type=int, default=0, help='re-time every row run for this many steps')
  runner.add_arguments(parser)
  args = parser.parse_args()
  pairs = [p for p in args.rows.split(';') if p]
  experiment = declare(args.shape, args.eval_batches, args.bench_steps, pairs=tuple(dict.fromkeys([*ROWS, *pairs])))
  runner.run_experiment(experiment, runs=args.runs, results=args.results, rows=[p.replace(',', '-') for p in pairs],
                        overrides=args.override)


if __name__ == '__main__':
  main()

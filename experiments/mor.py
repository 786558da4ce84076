"""Mixture-of-Recursions at equal training FLOPs and at equal tokens, with router statistics:

  python -m experiments.mor --shape tiny [--rows vanilla,recursive,...] [--eval_batches 50]

Trains every row of experiments/configs/mor.py (ROW,BUDGET pairs below), evaluates it on WikiText-2
bytes (valid and test; expert-choice rows with σ > 0.5 routing, the causal rule of generation, and
again with the training top-k on valid), and writes results/mor-<shape>.{json,md,png}. Peak memory is
XLA's compile-time estimate for the training step (arguments + temporaries); router statistics are
the training metrics averaged over the last 100 steps. `--bench_steps N` re-times every row's training
step alone (N steps in a scratch directory, nothing else running) into bench_tokens_per_sec.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from experiments import run as runner

CONFIG = 'experiments/configs/mor.py'
ROWS = ('vanilla,flops', 'recursive,flops', 'mor2,flops', 'mor3,flops', 'mor3_token,flops', 'mor3_kvshare,flops',
        'recursive,tokens', 'mor3,tokens')
COLUMNS = ('model', 'budget', 'non_embedding_params', 'steps', 'train_tokens', 'train_flops', 'valid_ppl',
           'valid_ppl_topk', 'test_ppl', 'valid_bpb', 'tokens_per_sec', 'bench_tokens_per_sec', 'peak_memory_mb')


def router_stats(workdir: str, last_steps: int = 100) -> dict:
  records = [r for r in runner.read_metrics(workdir) if 'loss' in r]
  recent = [r for r in records if r['step'] > records[-1]['step'] - last_steps]
  keys = sorted({k for r in recent for k in r if k.startswith('mor/')})
  return {k.removeprefix('mor/'): statistics.mean(r[k] for r in recent if k in r) for k in keys}


def train_row(shape: str, row: str, args) -> dict:
  name = row.replace(',', '-')
  workdir = os.path.join(args.runs, f'mor-{shape}', name)
  result = runner.train_and_evaluate(f'{CONFIG}:{shape},{row}', workdir, [], name=name, max_batches=args.eval_batches)
  result['budget'] = row.split(',')[1]
  result['peak_memory_mb'] = result['peak_memory_bytes'] / 2 ** 20
  result['router'] = router_stats(workdir)
  if result['router'].get('utilisation_r2') is not None:   # expert-choice: evaluate as in training, too
    out = runner.run([sys.executable, '-m', 'train.evaluate', '--workdir', workdir, '--split', 'valid',
                      '--max_batches', str(args.eval_batches), '--config.model.eval_routing=topk'])
    result['valid_ppl_topk'] = json.loads(out.strip().splitlines()[-1])['ppl']
  return result


def bench_row(shape: str, row: str, steps: int, scratch: str) -> float:
  """Median logged tokens/sec of `steps` training steps (compilation excluded)."""
  workdir = os.path.join(scratch, row.replace(',', '-'))
  runner.run([sys.executable, '-m', 'train', '--config', f'{CONFIG}:{shape},{row}', '--workdir', workdir,
              f'--config.train.steps={steps}', f'--config.train.eval_every={steps}', '--config.train.eval_batches=1',
              f'--config.checkpoint.every={steps}', f'--config.train.log_every={max(1, steps // 5)}'])
  return statistics.median(r['tokens_per_sec'] for r in runner.read_metrics(workdir) if 'tokens_per_sec' in r)


def render(shape: str, rows: list[dict]) -> str:
  lines = [f'# Mixture-of-Recursions, {shape}', '',
           'Produced by `python -m experiments.mor --shape ' + shape + '`. WikiText-2 bytes (ppl per byte). '
           '`flops` rows train for the analytic training FLOPs of vanilla (3 x forward, active fractions '
           'counted: linear x c_r, attention x c_r²); `tokens` rows see vanilla\'s tokens. valid_ppl routes '
           'expert-choice with σ > 0.5 (causal, as generation does); valid_ppl_topk with the training top-k '
           '(looks at the whole window, as the paper\'s NLL). tokens_per_sec: median during the run; '
           'bench_tokens_per_sec: the same step timed with nothing else running. peak_memory_mb: the device\'s '
           'measured peak, else (CPU) XLA\'s estimate for the training step.', '']
  lines += runner.table(['row', *COLUMNS], [[r['name'], *(r.get(c) for c in COLUMNS)] for r in rows])
  routed = [r for r in rows if r.get('router')]
  if routed:
    keys = sorted({k for r in routed for k in r['router']})
    lines += ['', '## Router statistics (training, last 100 steps)', '',
              'utilisation_rN: fraction of tokens that recursion N updates; sigma_above_half_rN: fraction of '
              'recursion N\'s candidates with σ > 0.5; agreement_rN: how often σ > 0.5 agrees with top-k '
              'membership; dead_token_ratio: positions of the window that no sequence of the batch sends '
              'through the last recursion; depth_N_fraction / max_violation: token-choice loads.', '']
    lines += runner.table(['row', *keys], [[r['name'], *(r['router'].get(k) for k in keys)] for r in routed])
  lines += ['', '| row | command | commit | hardware | date |', '|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["name"]} | `{r["command"]}` | {r["commit"]} | {r["hardware"]} | {r["date"]} |')
  lines += ['', f'![training loss](mor-{shape}.png)']
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--rows', default=';'.join(ROWS), help="ROW,BUDGET pairs separated by ';' ('' re-renders)")
  parser.add_argument('--eval_batches', type=int, default=25)
  parser.add_argument('--runs', default='runs')
  parser.add_argument('--results', default='results')
  parser.add_argument('--bench_steps', type=int, default=0, help='re-time every row alone for this many steps')
  args = parser.parse_args()
  os.makedirs(args.results, exist_ok=True)
  path = os.path.join(args.results, f'mor-{args.shape}.json')
  rows = json.load(open(path)) if os.path.exists(path) else []
  for row in filter(None, args.rows.split(';')):
    result = train_row(args.shape, row, args)
    rows = [r for r in rows if r['name'] != result['name']] + [result]
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
  if args.bench_steps:
    import tempfile
    timed = {}   # per model: the budgets only change the step count
    with tempfile.TemporaryDirectory() as scratch:
      for r in rows:
        model_row = r['name'].split('-')[0]
        if model_row not in timed:
          timed[model_row] = bench_row(args.shape, f'{model_row},flops', args.bench_steps, scratch)
        r['bench_tokens_per_sec'] = timed[model_row]
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
  runner.plot_curves(rows, os.path.join(args.results, f'mor-{args.shape}.png'))
  with open(os.path.join(args.results, f'mor-{args.shape}.md'), 'w') as f:
    f.write(render(args.shape, rows))
  print(open(os.path.join(args.results, f'mor-{args.shape}.md')).read())


if __name__ == '__main__':
  main()

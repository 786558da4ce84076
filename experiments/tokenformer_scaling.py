"""TokenFormer progressive scaling, the shape of the paper's Table 6, in one command:

  python -m experiments.tokenformer_scaling --shape tiny [--rows A,B-zeros,...]

Rows (S = the shape's steps; configs from experiments/configs/tokenformer_scaling.py):
  A         the small model (n_attn = d/4) for S steps
  B-zeros   A grown to n_attn = d (4x the parameter tokens) with zero new keys and pinned τ, 0.2·S more steps
  B-random  the same with random new keys and τ = √n (the paper's main runs)
  B-gentle  B-zeros with a quarter of the peak learning rate (re-warming to the full peak disturbs A)
  C         the large model from scratch for 0.2·S steps
  D         the large model from scratch for S steps
  softmax   A with the exp+L1 activation (ablation)
  transformer  a bias-free Transformer with D's parameter count, S steps
train_flops of the B rows is cumulative (A's compute included). Writes results/tokenformer-<shape>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments import run as runner

CONFIG = 'experiments/configs/tokenformer_scaling.py'
ROWS = ('A', 'D', 'C', 'B-zeros', 'B-random', 'softmax', 'transformer', 'B-gentle')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--rows', default=','.join(ROWS))
  parser.add_argument('--runs', default='runs')
  parser.add_argument('--results', default='results')
  args = parser.parse_args()
  from experiments.configs.tokenformer_scaling import SHAPES
  steps = SHAPES[args.shape][5]
  short = [f'train.steps={steps // 5}', f'train.eval_every={steps // 20}', f'checkpoint.every={steps // 20}']
  name = f'tokenformer-{args.shape}'
  table = os.path.join(args.results, f'{name}.json')
  rows = {r['name']: r for r in (json.load(open(table)) if os.path.exists(table) else [])}
  workdir = lambda row: os.path.join(args.runs, name, row)
  config = lambda row: f'{CONFIG}:{args.shape},{row}'

  for row in filter(None, args.rows.split(',')):   # --rows '' only re-renders
    if row == 'A':
      result = runner.train_and_evaluate(config('small'), workdir(row), [], name=row)
    elif row == 'C':
      result = runner.train_and_evaluate(config('large'), workdir(row), short, name=row)
    elif row == 'D':
      result = runner.train_and_evaluate(config('large'), workdir(row), [], name=row)
    elif row in ('softmax', 'transformer'):
      result = runner.train_and_evaluate(config(row), workdir(row), [], name=row)
    elif row in ('B-zeros', 'B-random', 'B-gentle'):
      key_init = 'random' if row == 'B-random' else 'zeros'
      grow = ['--from', workdir('A'), '--to', workdir(row), '--add_tokens', str(3 * SHAPES[args.shape][0] // 4),
              '--key_init', key_init, *(['--pin_tau'] if key_init == 'zeros' else [])]
      runner.run([sys.executable, '-m', 'train.grow', *grow])
      lr = [f'train.lr={SHAPES[args.shape][6] / 4}'] if row == 'B-gentle' else []
      result = runner.train_and_evaluate(None, workdir(row), short + lr, name=row)
      result['command'] = ' '.join(['python -m train.grow', *grow]) + ' && ' + result['command']
      result['train_flops'] += rows['A']['train_flops']
      result['note'] = 'grown from A at its last step; train_flops includes A'
    else:
      raise SystemExit(f'unknown row {row!r} (rows: {", ".join(ROWS)})')
    rows[row] = result
    os.makedirs(args.results, exist_ok=True)
    with open(table, 'w') as f:
      json.dump(list(rows.values()), f, indent=1)

  ordered = [rows[r] for r in ROWS if r in rows]
  plot = plot_curves(ordered, steps, os.path.join(args.results, f'{name}.png'))
  with open(os.path.join(args.results, f'{name}.md'), 'w') as f:
    f.write(runner.render(name, ordered, plot, f'python -m experiments.tokenformer_scaling --shape {args.shape}')
            + summary(rows))
  print(open(os.path.join(args.results, f'{name}.md')).read())


def summary(rows: dict) -> str:
  """The Table 6 comparison in words: each grown row against C and D, with its share of D's compute."""
  if not {'C', 'D'} <= set(rows):
    return ''
  lines = ['', '## Grown against scratch', '']
  for name in (r for r in ROWS if r.startswith('B-') and r in rows):
    b, c, d = rows[name], rows['C'], rows['D']
    lines.append(f'- {name}: valid ppl {b["valid_ppl"]:.3f} with {b["train_flops"] / d["train_flops"]:.0%} of D\'s '
                 f'training FLOPs (A included); D (large, S steps) {d["valid_ppl"]:.3f}, C (large, 0.2 S steps, '
                 f'{c["train_flops"] / d["train_flops"]:.0%}) {c["valid_ppl"]:.3f}. B closes '
                 f'{(rows["A"]["valid_ppl"] - b["valid_ppl"]) / (rows["A"]["valid_ppl"] - d["valid_ppl"]):.0%} of the '
                 'gap from A to D.')
  return '\n'.join(lines) + '\n'


def plot_curves(rows: list[dict], steps: int, path: str) -> str:
  """Training loss against step, the grown rows continuing from A's last step (marked)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for r in rows:
    records = runner.read_metrics(runner.workdir_of(r))
    offset = steps if r['name'].startswith('B-') else 0
    curve = [(x['step'] + offset, x['loss']) for x in records if 'loss' in x]
    ax.plot(*zip(*curve), label=r['name'], lw=1.2)
  ax.axvline(steps, color='gray', ls=':', label='growth (end of A)')
  ax.set_xlabel('step (grown rows continue from A)')
  ax.set_ylabel('training loss (nats/byte)')
  ax.set_ylim(top=2.5)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


if __name__ == '__main__':
  main()

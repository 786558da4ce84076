"""TokenFormer progressive scaling, the shape of the paper's Table 6, in one command:

  python -m experiments.tokenformer_scaling --shape tiny [--rows A,B-zeros,...] [--override key=value ...]

Rows (S = the shape's steps; configs from experiments/configs/tokenformer_scaling.py):
  A         the small model (n_attn = d/4) for S steps
  B-zeros   A grown to n_attn = d (4x the parameter tokens), 0.2·S more steps, by the paper's function-preserving
            recipe (train.grow's default; App. B, its zero-init growth study): zero new keys, τ pinned at
            √n of A, a fresh optimizer (the study held its lr constant; the table trains every B row with a
            fresh warmup and cosine)
  B-random  the paper's main runs: the new tokens at their random init, τ = √n of the new n, a fresh
            optimizer and cosine schedule
  B-gentle  B-zeros with a quarter of the peak learning rate (re-warming to the full peak disturbs A)
  C         the large model from scratch for 0.2·S steps
  D         the large model from scratch for S steps
  softmax   A with the exp+L1 activation (ablation)
  transformer  a bias-free Transformer with D's parameter count, S steps
The B rows are grown from A's last checkpoint with `python -m train.grow` (once: a grown run directory
is trained on afterwards). train_flops in the table is each row's own; the comparison below counts A's
compute in the grown rows. Writes results/tokenformer-<shape>.{json,md,png}.
"""

from __future__ import annotations

import argparse

from experiments import run as runner

CONFIG = 'experiments/configs/tokenformer_scaling.py'
ROWS = ('A', 'D', 'C', 'B-zeros', 'B-random', 'softmax', 'transformer', 'B-gentle')
GROWN = ('B-zeros', 'B-random', 'B-gentle')


def declare(shape: str, runs: str) -> runner.Experiment:
  from experiments.configs.tokenformer_scaling import SHAPES
  d, steps, lr = (SHAPES[shape][key] for key in ('d_model', 'steps', 'lr'))
  name = f'tokenformer-{shape}'
  config = lambda row: f'{CONFIG}:{shape},{row}'
  short = (f'train.steps={steps // 5}', f'train.eval_every={steps // 20}', f'checkpoint.every={steps // 20}')

  def grown(row: str, key_init: str, overrides: tuple[str, ...] = ()) -> runner.Row:
    # Every flag of the recipe spelled out, so that the recorded command says which one the row ran.
    recipe = ('--key_init', key_init, '--pin_tau' if key_init == 'zeros' else '--nopin_tau', '--optimizer', 'reset')
    grow = ('train.grow', '--from', runner.row_workdir(runs, name, 'A'), '--to', runner.row_workdir(runs, name, row),
            '--add_tokens', str(3 * d // 4), *recipe)
    return runner.Row(row, None, short + overrides, prepare=grow, note='grown from A at its last step')

  rows = [runner.Row('A', config('small')), runner.Row('D', config('large')), runner.Row('C', config('large'), short),
          grown('B-zeros', 'zeros'), grown('B-random', 'random'), runner.Row('softmax', config('softmax')),
          runner.Row('transformer', config('transformer')), grown('B-gentle', 'zeros', (f'train.lr={lr / 4}',))]
  description = ('A: the small model (n_attn = d/4), S steps. B-zeros, B-random, B-gentle: A grown to n_attn = d, '
                 '0.2 S more steps, each with a fresh optimizer and cosine schedule: B-zeros by the paper\'s '
                 'function-preserving recipe (zero new keys, τ pinned at √n of A; App. B), B-random as the paper\'s '
                 'main runs (new tokens at their random init, τ = √n of the new n), B-gentle as B-zeros at a quarter '
                 'of the peak learning rate. C, D: the large model from scratch for 0.2 S and S steps. softmax: A '
                 'with the exp+L1 activation. transformer: a bias-free Transformer with D\'s parameters, S steps. '
                 'train_flops is each row\'s own; the comparison below counts A\'s compute in the grown rows.')
  return runner.Experiment(name, rows, description=description, sections=summary, plots={'': plot_curves})


def summary(rows: list[dict]) -> list[str]:
  """The Table 6 comparison in words: each grown row against C and D, with its share of D's compute."""
  by_name = {r['name']: r for r in rows}
  if not {'A', 'C', 'D'} <= set(by_name):
    return []
  a, c, d = by_name['A'], by_name['C'], by_name['D']
  lines = ['## Grown against scratch', '']
  for b in (by_name[name] for name in GROWN if name in by_name):
    flops = (b['train_flops'] + a['train_flops']) / d['train_flops']
    lines.append(f'- {b["name"]}: valid ppl {b["valid_ppl"]:.3f} with {flops:.0%} of D\'s training FLOPs (A '
                 f'included); D (large, S steps) {d["valid_ppl"]:.3f}, C (large, 0.2 S steps, '
                 f'{c["train_flops"] / d["train_flops"]:.0%}) {c["valid_ppl"]:.3f}. B closes '
                 f'{(a["valid_ppl"] - b["valid_ppl"]) / (a["valid_ppl"] - d["valid_ppl"]):.0%} of the gap from A to D.')
  return lines


def plot_curves(rows: list[dict]):
  """Training loss against step, the grown rows continuing from A's last step (marked)."""
  growth = next((r['steps'] for r in rows if r['name'] == 'A'), 0)
  fig = runner.plot_curves(rows, step_offsets=dict.fromkeys(GROWN, growth))
  if fig:
    ax = fig.axes[0]
    ax.axvline(growth, color='gray', ls=':', label='growth (end of A)')
    ax.set(xlabel='step (grown rows continue from A)', ylabel='loss (nats/byte)', ylim=(None, 2.5))
    ax.legend()
  return fig


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--rows', default=','.join(ROWS), help="comma-separated rows ('' only re-renders)")
  runner.add_arguments(parser)
  args = parser.parse_args()
  rows = [r for r in args.rows.split(',') if r]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f'unknown row {unknown[0]!r} (rows: {", ".join(ROWS)})')
  runner.run_experiment(declare(args.shape, args.runs), runs=args.runs, results=args.results, rows=rows,
                        overrides=args.override)


if __name__ == '__main__':
  main()

"""MrT5 against ByT5, random and fixed deletion on span corruption, and the vowel-removal diagnostic
(the spec's §2.7).

  python -m experiments.mrt5 --shape tiny [--rates 0.3,0.5,0.7] [--continue_steps 200] [--eval_batches 20]
                             [--parts vowel,span,reliance] [--override key=value ...]

1. Vowel removal: trains experiments/configs/mrt5.py:SHAPE,vowel_t5, ,vowel_mrt5, and ,vowel_random and
   ,vowel_fixed (deletion at the vowel share, the rate the learned gate reaches) from scratch and reports
   sequence accuracy (every target byte right under teacher forcing, which is what greedy decoding then
   produces), the deletion rate and which bytes are deleted (the share of deleted bytes
   that are vowels, the share of vowels deleted), with hard and with soft deletion.
2. Span corruption on WikiText-2 bytes: trains the ByT5 base (SHAPE,byt5), then continues it for
   `continue_steps` as ByT5 (no deletion: the reference at equal steps), MrT5 with the PI controller
   toward each rate δ, and random and fixed deletion at each δ (`train.init_from`, a constant learning
   rate). Each is evaluated on the valid and test splits with hard deletion, and on valid with soft.
3. Runtime: with nothing else running, the median time of the jitted evaluation forward pass (encoder +
   decoder, hard deletion, as the paper times it) and of the encoder alone (the layers before the gate,
   then the kept tokens through the rest at the bucketed length) over `eval_batches` validation
   batches, after one warm-up batch per shape.
The vowel statistics, the soft-deletion evaluation, the runtimes and the encoder reliance are probes of
the trained runs, run once every row is trained. `--parts` picks the vowel rows, the span rows, and/or
`reliance` (only the encoder-reliance probe of the span rows, no training); the results keep the rest.
Run directories: runs/mrt5-SHAPE/ROW (finished runs are only evaluated). Writes results/mrt5-SHAPE.{md,json,png}.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/mrt5.py'
VOWEL_ROWS = ('vowel_t5', 'vowel_mrt5', 'vowel_random', 'vowel_fixed')
DELETION_KINDS = ('mrt5', 'random', 'fixed')   # span rows KIND-δ continue the base, as does byt5 (no deletion)
PARTS = ('vowel', 'span', 'reliance')


def load(workdir: str):
  """(setup, variables, rngs) of a finished run: its latest checkpoint and fixed keys for its RNG streams."""
  import jax
  setup, state = runner.load_run(workdir)
  return setup, {'params': state['params'], **state['model_state']}, setup.model.stream_keys(jax.random.key(0))


def vowel_report(row: dict, eval_batches: int) -> dict:
  """Sequence accuracy, deletion rate and the vowel share of deletions, hard and soft."""
  import jax
  import jax.numpy as jnp

  from models.formats.seq2seq import VOWELS
  from models.mrt5 import ByT5
  setup, variables, rngs = load(row['workdir'])
  out = {}
  for mode in ('hard', 'soft'):
    model = setup.model.clone(eval_deletion=mode)
    forward = jax.jit(lambda e, d: model.apply(variables, e, d, rngs=rngs)[0])
    front = jax.jit(lambda e: model.apply(variables, e, method=ByT5.encode_front, rngs=rngs))
    right = rows = deleted = valid_total = vowels = deleted_vowels = 0
    for batch in setup.dataset.eval_batches('valid', eval_batches):
      weights = batch['weights'] > 0
      predicted = np.asarray(forward(batch['encoder_tokens'], batch['decoder_tokens']).argmax(-1))
      used = weights.any(1)
      right += int(((predicted == batch['targets']) | ~weights).all(1)[used].sum())
      rows += int(used.sum())
      _, valid, _, gate = front(batch['encoder_tokens'])
      valid = np.asarray(valid)
      gone = np.asarray(model.deleted(gate, jnp.asarray(valid))) if gate is not None else np.zeros_like(valid)
      is_vowel = np.isin(batch['encoder_tokens'], VOWELS) & valid
      deleted, valid_total = deleted + gone.sum(), valid_total + valid.sum()
      vowels, deleted_vowels = vowels + is_vowel.sum(), deleted_vowels + (gone & is_vowel).sum()
    out[mode] = {'sequence_accuracy': right / rows, 'deletion_rate': deleted / valid_total,
                 'vowel_share_of_deleted': deleted_vowels / max(deleted, 1),
                 'vowels_deleted': deleted_vowels / vowels, 'vowel_share_of_input': vowels / valid_total}
  return out


def soft_bpb(row: dict, eval_batches: int) -> float:
  """Validation bits per target byte with soft deletion."""
  return runner.evaluate(row['workdir'], max_batches=eval_batches, overrides=['model.eval_deletion=soft'])['bpb']


def encoder_reliance(row: dict, eval_batches: int) -> float:
  """How much the model reads its encoder: the validation loss (nats per target byte, with the run's
  deletion) when each row's encoder input is swapped with the next row's, minus the loss as it is."""
  import jax

  from models import formats
  setup, variables, rngs = load(row['workdir'])
  forward = jax.jit(lambda e, d: setup.model.apply(variables, e, d, rngs=rngs)[0])
  losses, weight = np.zeros(2), 0.0
  for batch in setup.dataset.eval_batches('valid', eval_batches):
    for i, encoder in enumerate((batch['encoder_tokens'], np.roll(batch['encoder_tokens'], 1, axis=0))):
      nll = formats.token_nll(forward(encoder, batch['decoder_tokens']), batch['targets'], setup.vocab_limit)
      losses[i] += float((nll * batch['weights']).sum())
    weight += float(batch['weights'].sum())
  return float(losses[1] - losses[0]) / weight


def runtimes(row: dict, eval_batches: int) -> dict:
  """Median seconds per validation batch: the evaluation forward pass, and the encoder alone."""
  import jax

  from models.mrt5 import ByT5, take_kept
  setup, variables, rngs = load(row['workdir'])
  model = setup.model
  forward = jax.jit(lambda e, d: model.apply(variables, e, d, rngs=rngs))
  front = jax.jit(lambda e: model.apply(variables, e, method=ByT5.encode_front, rngs=rngs))
  back = jax.jit(lambda *a: model.apply(variables, *a, method=ByT5.encode_back)[0])

  def encode(tokens):
    """Encoder time: the layers before the gate, the kept tokens gathered (a host decision, as a serving
    system would make it), the rest of the encoder at the bucketed length."""
    start = time.perf_counter()
    h, valid, positions, gate = jax.block_until_ready(front(tokens))
    if gate is not None:
      keep, order, sizes, index = model.hard_plan(gate, valid)
      order = order[:, :sizes[int(index)]]
      h, valid, positions, gate = (take_kept(x, order) for x in (h, keep, positions, gate))
    jax.block_until_ready(back(h, valid, positions, gate))
    return time.perf_counter() - start

  def timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  batches = list(setup.dataset.eval_batches('valid', eval_batches + 1))
  for batch in batches:   # compile every shape the batches reach
    timed(forward, batch['encoder_tokens'], batch['decoder_tokens'])
    encode(batch['encoder_tokens'])
  full = [timed(forward, b['encoder_tokens'], b['decoder_tokens']) for b in batches[1:]]
  encoder = [encode(b['encoder_tokens']) for b in batches[1:]]
  return {'forward_s': statistics.median(full), 'encoder_s': statistics.median(encoder)}


def kind(row: dict) -> str:
  """byt5-base, byt5 (continued) or a deletion kind: the span rows' names say it."""
  return row['name'] if row['name'].startswith('byt5') else row['name'].split('-')[0]


def span_table(rows: list[dict]) -> list[dict]:
  """The span rows with everything their table and plot show (runtimes relative to the continued ByT5)."""
  times = runner.probed(rows, 'runtimes')   # only the span rows time their runs
  base = times.get('byt5')
  if not base:
    return []
  return [{'row': r['name'], 'kind': kind(r), 'target': float(r['name'].split('-')[1]) if kind(r) in DELETION_KINDS
           else None, 'deletion_rate': r['model_metrics'].get('mrt5/deletion_rate', 0.0), 'valid_bpb': r['valid_bpb'],
           'valid_bpb_soft': runner.probe_value(r, 'soft'), 'test_bpb': r['test_bpb'],
           'encoder_reliance': runner.probe_value(r, 'encoder_reliance'),
           'encoder_length': r['model_metrics'].get('mrt5/encoder_length_fraction', 1.0),
           'encoder_s': times[r['name']]['encoder_s'],
           'encoder_vs_byt5': times[r['name']]['encoder_s'] / base['encoder_s'],
           'forward_vs_byt5': times[r['name']]['forward_s'] / base['forward_s']}
          for r in rows if r['name'] in times]


def plot(rows: list[dict]):
  import matplotlib.pyplot as plt
  span = span_table(rows)
  if not span:
    return None
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for deletion, marker in zip(DELETION_KINDS, ('o-', 's--', '^--')):
    points = sorted((r['deletion_rate'], r['valid_bpb'], r['encoder_vs_byt5']) for r in span if r['kind'] == deletion)
    if points:
      x, bpb, runtime = zip(*points)
      left.plot(x, bpb, marker, label=deletion)
      right.plot(x, runtime, marker, label=deletion)
  reference = next(r['valid_bpb'] for r in span if r['kind'] == 'byt5')
  left.axhline(reference, color='gray', ls=':', label='ByT5 (continued)')
  left.set(xlabel='sequence reduction (deletion rate)', ylabel='valid bits per target byte (hard deletion)')
  right.set(xlabel='sequence reduction (deletion rate)', ylabel='encoder time / ByT5 encoder time')
  for ax in (left, right):
    ax.legend()
  return fig


def vowel_verdict(vowels: dict) -> str:
  """Whether the paper's direction shows: learned deletion keeps the sequence accuracy that random and
  fixed deletion at the same rate lose."""
  accuracy = {name: modes['hard']['sequence_accuracy'] for name, modes in vowels.items()}
  if not {'vowel_t5', 'vowel_mrt5', 'vowel_random', 'vowel_fixed'} <= set(accuracy):
    return 'Direction: not all four rows have run yet.'
  others = max(accuracy['vowel_random'], accuracy['vowel_fixed'])
  shows = accuracy['vowel_mrt5'] > others + 0.05 and accuracy['vowel_mrt5'] > accuracy['vowel_t5'] - 0.05
  return (f"Direction {'shows' if shows else 'does not show'}: learned deletion {accuracy['vowel_mrt5']:.3f} "
          f"(no deletion {accuracy['vowel_t5']:.3f}) against random {accuracy['vowel_random']:.3f} and fixed "
          f"{accuracy['vowel_fixed']:.3f} at the same rate.")


def sections(rows: list[dict], continue_steps: int, continue_lr: float, eval_batches: int) -> list[str]:
  lines = ['## Vowel removal (random letter strings; target: the string without vowels)', '',
           'Sequence accuracy: every target byte right under teacher forcing (what greedy decoding reproduces). '
           'Deleted-vowel share: the share of deleted input bytes that are vowels; vowels deleted: the share of '
           'the input vowels deleted.', '']
  lines += runner.table(['row', 'deletion', 'sequence accuracy', 'deletion rate', 'vowel share of deleted',
                         'vowels deleted', 'vowel share of input'],
                        [[name, mode, m['sequence_accuracy'], m['deletion_rate'], m['vowel_share_of_deleted'],
                          m['vowels_deleted'], m['vowel_share_of_input']]
                         for name, modes in runner.probed(rows, 'vowels').items() for mode, m in modes.items()])
  lines += ['', vowel_verdict(runner.probed(rows, 'vowels'))]
  span = span_table(rows)
  if not span:
    return lines + ['', 'Span corruption: not run yet (`--parts span`).']
  base_steps = next((r['steps'] for r in rows if r['name'] == 'byt5-base'), None)
  lines += ['', '## Span corruption on WikiText-2 bytes', '',
            f'The ByT5 base trains {base_steps} steps; every other row continues it for {continue_steps} steps at a '
            f'constant learning rate {continue_lr} (byt5: no deletion, the reference). Bits per byte are bits per '
            'target byte (sentinels and eos included, as MrT5 reports them), over the first '
            f'{eval_batches} batches of each split. Deletion rate: hard, on valid. Encoder reliance: the validation '
            'loss with each row\'s encoder input swapped with another row\'s, minus the loss as it is (how much the '
            'model reads its encoder at all). Encoder length: the bucketed length hard deletion runs the later '
            'encoder layers at. Runtimes: median seconds per validation batch, relative to the continued ByT5.', '']
  columns = {'row': 'row', 'target δ': 'target', 'deletion rate': 'deletion_rate', 'valid bpb (hard)': 'valid_bpb',
             'valid bpb (soft)': 'valid_bpb_soft', 'test bpb (hard)': 'test_bpb',
             'encoder reliance (nats)': 'encoder_reliance', 'encoder length': 'encoder_length',
             'encoder time (s)': 'encoder_s', 'encoder time vs ByT5': 'encoder_vs_byt5',
             'forward time vs ByT5': 'forward_vs_byt5'}
  return lines + runner.table(list(columns), [[r[key] for key in columns.values()] for r in span]) + [
      '', *span_verdict(span)]


def span_verdict(span: list[dict]) -> list[str]:
  """Whether deletion tracks δ (within 0.1), and whether MrT5 beats random and fixed deletion at the
  nearest deletion rate (the paper's Table 2 direction), with the encoder reliance that bounds the effect."""
  learned = [r for r in span if r['kind'] == 'mrt5']
  baselines = [r for r in span if r['kind'] in ('random', 'fixed')]
  if not learned or not baselines:
    return []
  off = max(abs(r['deletion_rate'] - r['target']) for r in learned)
  reliance = max(r['encoder_reliance'] or 0.0 for r in span)
  lines = [f"Tracking δ: {'shows' if off <= 0.1 else 'does not show'} (largest |rate - δ| {off:.2f}). The encoder "
           f'reliance is at most {reliance:.3f} nats, so deleting costs the task almost nothing and only the '
           "controller sets the rate (its official α cannot go below 0; see mrt5-tiny-two-sided.md)."]
  wins = []
  for r in learned:
    nearest = {kind: min((b for b in baselines if b['kind'] == kind),
                         key=lambda b: abs(b['deletion_rate'] - r['deletion_rate'])) for kind in ('random', 'fixed')}
    wins.append(all(r['valid_bpb'] < b['valid_bpb'] for b in nearest.values()))
  lines += ['']
  lines.append(f"MrT5 against random and fixed deletion at the nearest rate: {sum(wins)} of {len(wins)} rows better "
               f"({'shows' if all(wins) else 'does not show'} the paper's direction; with {reliance:.3f} nats to lose, "
               'every method deletes nearly for free).')
  return lines


def declare(args) -> runner.Experiment:
  name = f'mrt5-{args.shape}'
  config = lambda row: f'{CONFIG}:{args.shape},{row}'
  on_batches = lambda probe: functools.partial(probe, eval_batches=args.eval_batches)
  span_probes = {'soft': on_batches(soft_bpb), 'runtimes': on_batches(runtimes),
                 'encoder_reliance': on_batches(encoder_reliance)}
  rows = [runner.Row(row, config(row), probes={'vowels': on_batches(vowel_report)}) for row in VOWEL_ROWS]
  base = os.path.abspath(runner.row_workdir(args.runs, name, 'byt5-base'))
  continued = (f'train.init_from={base}', f'train.steps={args.continue_steps}', f'train.lr={args.continue_lr}',
               'train.warmup_steps=0', 'train.min_lr_ratio=1.0', f'train.eval_every={args.continue_steps}',
               f'checkpoint.every={args.continue_steps}')
  rows += [runner.Row('byt5-base', config('byt5'), probes=span_probes),
           runner.Row('byt5', config('byt5'), continued, probes=span_probes)]
  rows += [runner.Row(f'{deletion}-{rate}', config(deletion), (*continued, f'model.target_deletion={rate}'),
                      probes=span_probes) for deletion in DELETION_KINDS for rate in args.rates.split(',')]
  return runner.Experiment(name, rows, title=f'MrT5 ({args.shape})', eval_batches=args.eval_batches,
                           sections=functools.partial(sections, continue_steps=args.continue_steps,
                                                      continue_lr=args.continue_lr, eval_batches=args.eval_batches),
                           plots={'': plot})


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--rates', default='0.3,0.5,0.7')
  parser.add_argument('--continue_steps', type=int, default=200)
  parser.add_argument('--continue_lr', type=float, default=5e-4)
  parser.add_argument('--eval_batches', type=int, default=20)
  parser.add_argument('--parts', default='vowel,span',
                      help='vowel, span and/or reliance (only the encoder reliance of the span rows); results keep '
                           'the other parts')
  runner.add_arguments(parser)
  args = parser.parse_args()
  parts = set(args.parts.split(','))
  if parts - set(PARTS):
    parser.error(f'unknown part {sorted(parts - set(PARTS))[0]!r} (parts: {", ".join(PARTS)})')
  experiment = declare(args)
  span = [r.name for r in experiment.rows if r.name not in VOWEL_ROWS]
  common = dict(runs=args.runs, results=args.results, overrides=args.override)
  trained = [*(VOWEL_ROWS if 'vowel' in parts else ()), *(span if 'span' in parts else ())]
  if trained:
    runner.run_experiment(experiment, rows=trained, **common)
  if 'reliance' in parts and 'span' not in parts:
    runner.run_experiment(experiment, rows=span, train=False, probes={'encoder_reliance'}, **common)


if __name__ == '__main__':
  main()

"""MrT5 against ByT5, random and fixed deletion on span corruption, and the vowel-removal diagnostic
(the spec's §2.7).

  python -m experiments.mrt5 --shape tiny [--rates 0.3,0.5,0.7] [--continue_steps 200] [--eval_batches 20]

1. Vowel removal: trains experiments/configs/mrt5.py:SHAPE,vowel_t5 and ,vowel_mrt5 from scratch and
   reports sequence accuracy (every target byte right under teacher forcing, which is what greedy
   decoding then produces), the deletion rate and which bytes are deleted (the share of deleted bytes
   that are vowels, the share of vowels deleted), with hard and with soft deletion.
2. Span corruption on WikiText-2 bytes: trains the ByT5 base (SHAPE,byt5), then continues it for
   `continue_steps` as ByT5 (no deletion: the reference at equal steps), MrT5 with the PI controller
   toward each rate δ, and random and fixed deletion at each δ (`train.init_from`, a constant learning
   rate). Each is evaluated on the valid and test splits with hard deletion, and on valid with soft.
3. Runtime: with nothing else running, the median time of the jitted evaluation forward pass (encoder +
   decoder, hard deletion, as the paper times it) and of the encoder alone (the layers before the gate,
   then the kept tokens through the rest at the bucketed length) over `eval_batches` validation
   batches, after one warm-up batch per shape.
Run directories: runs/mrt5-SHAPE/ROW (finished runs are only evaluated). Writes results/mrt5-SHAPE.{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/mrt5.py'


def evaluate(workdir: str, split: str, max_batches: int, *overrides: str) -> dict:
  out = runner.run([sys.executable, '-m', 'train.evaluate', '--workdir', workdir, '--split', split, '--max_batches',
                    str(max_batches), *[f'--config.{o}' for o in overrides]])
  return json.loads(out.strip().splitlines()[-1])


def train(shape: str, row: str, workdir: str, overrides: list[str]) -> dict:
  """Train one run; the command, commit and training time of its row."""
  flags = [f'--config.{o}' for o in overrides]
  commit = runner.git_commit()
  runner.run([sys.executable, '-m', 'train', '--config', f'{CONFIG}:{shape},{row}', '--workdir', workdir, *flags])
  records = runner.read_metrics(workdir)
  return {'command': ' '.join(['python -m train', '--config', f'{CONFIG}:{shape},{row}', '--workdir', workdir, *flags]),
          'commit': commit, 'train_time_s': round(runner.train_time_s(records)),
          'params': records[0].get('params'), 'steps': max(r['step'] for r in records)}


def load(workdir: str):
  """(setup, variables, rngs) of a finished run: its latest checkpoint and fixed keys for its RNG streams."""
  import jax

  from train import config as config_lib, restore
  setup, state = restore.load_run(config_lib.load_workdir_config(workdir), workdir)
  return setup, {'params': state['params'], **state['model_state']}, setup.model.stream_keys(jax.random.key(0))


def vowel_report(workdir: str, eval_batches: int) -> dict:
  """Sequence accuracy, deletion rate and the vowel share of deletions, hard and soft."""
  import jax
  import jax.numpy as jnp

  from models.formats.seq2seq import VOWELS
  from models.mrt5 import ByT5
  setup, variables, rngs = load(workdir)
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


def encoder_reliance(workdir: str, eval_batches: int) -> float:
  """How much the model reads its encoder: the validation loss (nats per target byte, with the run's
  deletion) when each row's encoder input is swapped with the next row's, minus the loss as it is."""
  import jax

  from models import formats

  setup, variables, rngs = load(workdir)
  forward = jax.jit(lambda e, d: setup.model.apply(variables, e, d, rngs=rngs)[0])
  losses, weight = np.zeros(2), 0.0
  for batch in setup.dataset.eval_batches('valid', eval_batches):
    for i, encoder in enumerate((batch['encoder_tokens'], np.roll(batch['encoder_tokens'], 1, axis=0))):
      nll = formats.token_nll(forward(encoder, batch['decoder_tokens']), batch['targets'], setup.vocab_limit)
      losses[i] += float((nll * batch['weights']).sum())
    weight += float(batch['weights'].sum())
  return float(losses[1] - losses[0]) / weight


def runtimes(workdir: str, eval_batches: int) -> dict:
  """Median seconds per validation batch: the evaluation forward pass, and the encoder alone."""
  import jax

  from models.mrt5 import ByT5, take_kept
  setup, variables, rngs = load(workdir)
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


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  base = next(r for r in rows if r['kind'] == 'byt5')
  for kind, marker in (('mrt5', 'o-'), ('random', 's--'), ('fixed', '^--')):
    points = sorted((r['deletion_rate'], r['valid_bpb'], r['encoder_s'] / base['encoder_s']) for r in rows
                    if r['kind'] == kind)
    if points:
      x, bpb, runtime = zip(*points)
      left.plot(x, bpb, marker, label=kind)
      right.plot(x, runtime, marker, label=kind)
  left.axhline(base['valid_bpb'], color='gray', ls=':', label='ByT5 (continued)')
  left.set_xlabel('sequence reduction (deletion rate)')
  left.set_ylabel('valid bits per target byte (hard deletion)')
  right.set_xlabel('sequence reduction (deletion rate)')
  right.set_ylabel('encoder time / ByT5 encoder time')
  for ax in (left, right):
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


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
  parser.add_argument('--runs', default='runs')
  parser.add_argument('--results', default='results')
  args = parser.parse_args()
  root = os.path.join(args.runs, f'mrt5-{args.shape}')
  hardware, date = runner.hardware(), datetime.date.today().isoformat()
  command = ' '.join(['python -m experiments.mrt5', *sys.argv[1:]])

  stem = os.path.join(args.results, f'mrt5-{args.shape}')
  previous = json.load(open(stem + '.json')) if os.path.exists(stem + '.json') else {}
  parts = args.parts.split(',')
  vowel_rows = [] if 'vowel' in parts else previous.get('vowel', [])
  for row in ('vowel_t5', 'vowel_mrt5') if 'vowel' in parts else ():
    workdir = os.path.join(root, row)
    info = train(args.shape, row, workdir, [])
    vowel_rows.append({'row': row, **info, **vowel_report(workdir, args.eval_batches)})

  base_dir = os.path.abspath(os.path.join(root, 'byt5-base'))
  continued = [f'train.init_from={base_dir}', f'train.steps={args.continue_steps}', f'train.lr={args.continue_lr}',
               'train.warmup_steps=0', 'train.min_lr_ratio=1.0', f'train.eval_every={args.continue_steps}',
               f'checkpoint.every={args.continue_steps}']
  plan = [('byt5-base', 'byt5', None, []), ('byt5', 'byt5', None, continued)]   # (name, config row, δ, overrides)
  plan += [(f'{kind}-{rate}', kind, float(rate), continued + [f'model.target_deletion={rate}'])
           for kind in ('mrt5', 'random', 'fixed') for rate in args.rates.split(',')]
  span_rows = [] if 'span' in parts else previous.get('span', [])
  for name, row, rate, overrides in plan if 'span' in parts else ():
    workdir = os.path.abspath(os.path.join(root, name))
    info = train(args.shape, row, workdir, overrides)
    valid = evaluate(workdir, 'valid', args.eval_batches)
    test = evaluate(workdir, 'test', args.eval_batches)
    soft = evaluate(workdir, 'valid', args.eval_batches, 'model.eval_deletion=soft')
    span_rows.append({'row': name, 'kind': 'base' if name == 'byt5-base' else row, 'target': rate, **info,
                      'valid_bpb': valid['bpb'], 'test_bpb': test['bpb'], 'valid_bpb_soft': soft['bpb'],
                      'deletion_rate': valid.get('mrt5/deletion_rate', 0.0),
                      'encoder_length': valid.get('mrt5/encoder_length_fraction', 1.0), 'workdir': workdir})
  for r in span_rows if 'span' in parts else ():   # timed one after another, with no training running
    r.update(runtimes(r['workdir'], args.eval_batches))
  for r in span_rows if {'span', 'reliance'} & set(parts) else ():
    r['encoder_reliance'] = encoder_reliance(r['workdir'], args.eval_batches)

  os.makedirs(args.results, exist_ok=True)
  commands = {**previous.get('commands', {}), **{part: command for part in parts}}
  with open(stem + '.json', 'w') as f:
    json.dump({'vowel': vowel_rows, 'span': span_rows, 'commands': commands, 'hardware': hardware, 'date': date}, f,
              indent=1, default=float)
  if span_rows:
    plot(span_rows, stem + '.png')
  with open(stem + '.md', 'w') as f:
    f.write(render(args, vowel_rows, span_rows, commands, hardware, date, os.path.basename(stem + '.png')))
  print(f'wrote {stem}.md')


def render(args, vowel_rows, span_rows, commands, hardware, date, plot_name) -> str:
  produced = ' and '.join(f'`{c}`' for c in dict.fromkeys(commands.values()))
  lines = [f'# MrT5 ({args.shape})', '', f'Produced by {produced} on {hardware}, {date}. Every run\'s own command and '
           'commit are in the last table.', '', '## Vowel removal (random letter strings; target: the '
           'string without vowels)', '',
           'Sequence accuracy: every target byte right under teacher forcing (what greedy decoding reproduces). '
           'Deleted-vowel share: the share of deleted input bytes that are vowels; vowels deleted: the share of '
           'the input vowels deleted.', '']
  header = ['row', 'deletion', 'sequence accuracy', 'deletion rate', 'vowel share of deleted', 'vowels deleted',
            'vowel share of input']
  body = []
  for r in vowel_rows:
    for mode in ('hard', 'soft'):
      m = r[mode]
      body.append([r['row'], mode, m['sequence_accuracy'], m['deletion_rate'], m['vowel_share_of_deleted'],
                   m['vowels_deleted'], m['vowel_share_of_input']])
  lines += runner.table(header, body)
  if not span_rows:
    return '\n'.join(lines + ['', 'Span corruption: not run yet (`--parts span`).']) + '\n'
  base = next(r for r in span_rows if r['kind'] == 'byt5')
  lines += ['', '## Span corruption on WikiText-2 bytes', '',
            f'The ByT5 base trains {span_rows[0]["steps"]} steps; every other row continues it for '
            f'{args.continue_steps} steps at a constant learning rate {args.continue_lr} (byt5: no deletion, '
            'the reference). Bits per byte are bits per target byte (sentinels and eos included, as MrT5 '
            f'reports them), over the first {args.eval_batches} batches of each split. Deletion rate: hard, on '
            'valid. Encoder reliance: the validation loss with each row\'s encoder input swapped with another '
            'row\'s, minus the loss as it is (how much the model reads its encoder at all). Encoder length: the '
            'bucketed length hard deletion runs the later encoder layers at. Runtimes: median seconds per '
            'validation batch, relative to the continued ByT5.', '']
  header = ['row', 'target δ', 'deletion rate', 'valid bpb (hard)', 'valid bpb (soft)', 'test bpb (hard)',
            'encoder reliance (nats)', 'encoder length', 'encoder time (s)', 'encoder time vs ByT5',
            'forward time vs ByT5']
  lines += runner.table(header, [[r['row'], r.get('target'), r['deletion_rate'], r['valid_bpb'], r['valid_bpb_soft'],
                                  r['test_bpb'], r.get('encoder_reliance'), r['encoder_length'], r['encoder_s'],
                                  r['encoder_s'] / base['encoder_s'], r['forward_s'] / base['forward_s']]
                                 for r in span_rows])
  lines += ['', f'![bits per byte and encoder time against deletion rate]({plot_name})', '', '## Runs', '',
            '| row | command | commit | params | steps | train time (s) |', '|---|---|---|---|---|---|']
  for r in vowel_rows + span_rows:
    lines.append(f'| {r["row"]} | `{r["command"]}` | {r["commit"]} | {runner.fmt(r["params"])} | {r["steps"]} | '
                 f'{r["train_time_s"]} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()

"""Landmark attention against the same model without landmarks: Table 1 of the paper in shape, the
passkey test, and memory against evaluation length.

  python -m experiments.landmark --shape tiny [--eval_tokens 65536] [--passkey_prompts 50]
                                 [--passkey_lengths 1024,2048,...] [--skip_long_eval] [--skip_passkey]

1. Trains experiments/configs/landmark.py:SHAPE,{landmark,baseline} in runs/landmark-SHAPE/ROW (a finished
   run is only evaluated) and evaluates both at their training window.
2. Bits per byte on the same first `eval_tokens` bytes of the held-out book at each evaluation length
   (`python -m train.evaluate --config.train.seq_len=L` with the cached-inference options), every token
   of each segment scored, as the paper does.
3. Passkey retrieval: 50 prompts per length; a prompt is right when, fed the prompt and the key, the
   model's argmax predicts every digit of the key and then a non-digit (what greedy decoding would
   produce). The landmark model reads the whole prompt through its cache (ℓ_local 250, k 4, all blocks
   kept); the baseline sees the last 512 bytes, its training window.
4. Peak memory of one sequence's evaluation forward: XLA's compile-time estimate (arguments + temporaries).
Writes results/landmark-SHAPE.{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/landmark.py'
# (evaluation length, row, (ℓ_local, blocks kept, k) or None for the full window): the paper's Table 1.
LONG_EVAL = [
    (512, 'baseline', None), (360, 'baseline', None), (512, 'landmark', (250, 10, 2)),
    (2048, 'baseline', None), (2048, 'landmark', (250, 40, 2)), (2048, 'landmark', (350, 40, 2)),
    (2048, 'landmark', (300, 40, 3)), (2048, 'landmark', (250, 20, 4)), (2048, 'landmark', (250, 40, 4)),
    (4096, 'baseline', None), (4096, 'landmark', (250, 40, 4)), (4096, 'landmark', (250, 80, 2)),
    (4096, 'landmark', (250, 80, 4)), (8192, 'landmark', (250, 80, 4)),
]
PASSKEY_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
MEMORY_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def cached_flags(options) -> list[str]:
  local, blocks, k = options
  return ['--config.model.inference=cached', f'--config.model.local_len={local}',
          f'--config.model.mem_blocks={blocks}', f'--config.model.topk={k}']


def long_eval(workdir: str, length: int, options, eval_tokens: int) -> dict:
  batch = max(1, 8192 // length)
  batches = max(1, eval_tokens // (batch * length))
  cmd = [sys.executable, '-m', 'train.evaluate', '--workdir', workdir, '--split', 'valid', '--max_batches',
         str(batches), f'--config.train.seq_len={length}', f'--config.train.batch_size={batch}',
         *(cached_flags(options) if options else [])]
  result = json.loads(runner.run(cmd).strip().splitlines()[-1])
  return {'bpb': result['bpb'], 'tokens': result['tokens'], 'command': ' '.join(cmd[1:])}


def load(workdir: str, overrides: dict):
  from train import config as config_lib, restore
  config = config_lib.load_workdir_config(workdir)
  config.model.update(overrides)
  return restore.load_run(config, workdir)


def passkey_accuracy(workdir: str, lengths, n_prompts: int, overrides: dict, window: int | None) -> dict:
  """Share of prompts whose key the model's argmax reproduces (then stops), per length."""
  import jax

  from train import passkey
  setup, state = load(workdir, overrides)
  tokenizer, params = setup.dataset.tokenizer, state['params']
  digits = set(tokenizer.encode_prompt('0123456789').tolist())
  accuracy = {}
  for length in lengths:
    model = setup.model
    if overrides.get('inference') == 'cached':   # keep every block of the prompt
      model = model.clone(mem_blocks=length // model.block_size + 2)
    forward = jax.jit(lambda p, tokens: model.apply({'params': p}, tokens)[0].argmax(-1))
    rng = np.random.default_rng([0, length])
    correct = 0
    batch = max(1, min(n_prompts, 2 ** 18 // length))
    for start in range(0, n_prompts, batch):
      prompts = [passkey.prompt(rng, length) for _ in range(min(batch, n_prompts - start))]
      encoded = [(tokenizer.encode_prompt(text), tokenizer.encode_prompt(key)) for text, key in prompts]
      if window:   # the baseline reads its training window: the last `window` tokens
        encoded = [(np.concatenate([q, a])[-window:][:-len(a)], a) for q, a in encoded]
      width = max(len(q) + len(a) for q, a in encoded)
      tokens = np.zeros((len(encoded), width), np.int32)
      for row, (q, a) in enumerate(encoded):
        tokens[row, :len(q) + len(a)] = np.concatenate([q, a])
      predicted = np.asarray(forward(params, tokens))
      for row, (q, a) in enumerate(encoded):
        guess = predicted[row, len(q) - 1:len(q) + len(a)]   # the key's digits, then what follows it
        correct += bool((guess[:-1] == a).all() and guess[-1] not in digits)
    accuracy[str(length)] = correct / n_prompts   # string keys, as they come back from the JSON file
    print(f'passkey {workdir} {length}: {correct / n_prompts:.2f}', flush=True)
  return accuracy


def memory_mb(workdir: str, length: int, overrides: dict) -> float:
  """XLA's compile-time estimate (arguments + temporaries) of one sequence's evaluation forward."""
  import jax
  import jax.numpy as jnp

  from train import config as config_lib, metrics
  config = config_lib.load_workdir_config(workdir)
  config.model.update(overrides)
  model = config_lib.build_model(config, vocab_size=257)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  compiled = jax.jit(lambda p, t: model.apply({'params': p}, t)[0]).lower(
      params, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
  estimate, _ = metrics.peak_memory(None, metrics.step_memory(compiled))
  return estimate / 2 ** 20 if estimate else float('nan')


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, curve in result['memory_mb'].items():
    xs = sorted(int(x) for x in curve)
    axes[0].plot(xs, [curve[str(x)] for x in xs], marker='o', label=name)
  axes[0].set(xscale='log', yscale='log', xlabel='evaluation length (bytes)', ylabel='peak memory (MB, XLA estimate)',
              title='memory of one evaluation forward')
  for name, curve in result.get('passkey', {}).items():
    xs = sorted(int(x) for x in curve)
    axes[1].plot(xs, [curve[str(x)] for x in xs], marker='o', label=name)
  axes[1].set(xscale='log', xlabel='prompt length (bytes)', ylabel='passkey accuracy', ylim=(-0.05, 1.05),
              title='passkey retrieval')
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def render(shape: str, result: dict) -> str:
  trained = result['trained']
  lines = [f'# Landmark attention, {shape}', '',
           f'Produced by `python -m experiments.landmark --shape {shape}` on {result["hardware"]}, '
           f'{result["date"]}, commit {result["commit"]}. Byte-level Gutenberg books (whole books held out); '
           'the landmark model trains on windows of 502 bytes (512 positions with its 10 landmarks), the '
           'baseline (the same model without landmarks) on 512 bytes. 10% of the training windows of both are '
           'synthetic passkey sequences (`data.passkey_fraction=0.1`, a deviation from the paper that the '
           'spec allows).', '', '## Training', '',
           'train time: compilation and steps, from the run\'s own metrics (evaluation excluded).', '']
  lines += runner.table(['row', 'params', 'steps', 'train tokens', 'valid bpb (training window)', 'test bpb',
                         'tok/s', 'train time s'],
                        [[r['name'], r['params'], r['steps'], r['train_tokens'], r['valid_bpb'], r['test_bpb'],
                          r['tokens_per_sec'], r['train_time_s']] for r in trained])
  lines += ['', '## Bits per byte against evaluation length (the shape of the paper\'s Table 1)', '',
            f'The first {result["eval_tokens"]:,} bytes of the held-out book, cut into segments of the evaluation '
            'length, every byte scored. Attention size: regular keys a query can read, ℓ_local + k x 50 (the paper '
            'also counts some landmark keys); the baseline '
            'beyond 512 attends the whole segment with RoPE positions it never saw in training.', '']
  rows = []
  for r in result['long_eval']:
    options = r['options']
    size = r['length'] if not options else options[0] + options[2] * 50
    rows.append([r['length'], r['row'], *(options or ['full', '', '']), size, r['bpb']])
  lines += runner.table(['eval length', 'model', 'ℓ_local', 'blocks kept', 'k', 'attention size', 'valid bpb'], rows)
  if result.get('passkey'):
    names = list(result['passkey'])
    lengths = sorted({int(x) for curve in result['passkey'].values() for x in curve})
    lines += ['', f'## Passkey retrieval ({result["passkey_prompts"]} prompts per length)', '',
              'Accuracy: the argmax continuation of the prompt is exactly the key. Landmark: ℓ_local 250, k 4 per '
              'token and head, every block kept. Baseline: the last 512 bytes of the prompt.', '']
    lines += runner.table(['model', *map(str, lengths)], [[n, *(result['passkey'][n].get(str(x)) for x in lengths)]
                                                for n in names])
  lines += ['', '## Peak memory of one evaluation forward (MB, XLA compile-time estimate)', '']
  names = list(result['memory_mb'])
  lengths = sorted({int(x) for curve in result['memory_mb'].values() for x in curve})
  lines += runner.table(['model', *map(str, lengths)], [[n, *(result['memory_mb'][n].get(str(x)) for x in lengths)]
                                              for n in names])
  lines += ['', '## Commands', '']
  lines += [f'- `{r["command"]}`' for r in trained]
  lines += [f'- `python {r["command"]}`' for r in result['long_eval'][:3]] + ['- (and so on for every row)']
  lines += ['', f'![memory and passkey](landmark-{shape}.png)']
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--eval_tokens', type=int, default=65536)
  parser.add_argument('--eval_batches', type=int, default=20, help='batches of the training-window evaluation')
  parser.add_argument('--passkey_prompts', type=int, default=50)
  parser.add_argument('--passkey_lengths', default=','.join(map(str, PASSKEY_LENGTHS)))
  parser.add_argument('--skip_long_eval', action='store_true')
  parser.add_argument('--skip_passkey', action='store_true')
  parser.add_argument('--runs', default='runs')
  parser.add_argument('--results', default='results')
  args = parser.parse_args()
  os.makedirs(args.results, exist_ok=True)
  path = os.path.join(args.results, f'landmark-{args.shape}.json')
  result = json.load(open(path)) if os.path.exists(path) else {}
  workdirs = {row: os.path.abspath(os.path.join(args.runs, f'landmark-{args.shape}', row))
              for row in ('landmark', 'baseline')}
  result.update(eval_tokens=args.eval_tokens, commit=runner.git_commit(), hardware=runner.hardware(),
                date=datetime.date.today().isoformat(), passkey_prompts=args.passkey_prompts)
  result['trained'] = [runner.train_and_evaluate(f'{CONFIG}:{args.shape},{row}', workdir, [], name=row,
                                                 max_batches=args.eval_batches) for row, workdir in workdirs.items()]
  save = lambda: json.dump(result, open(path, 'w'), indent=1)
  save()
  if not args.skip_long_eval:
    result['long_eval'] = [{'length': length, 'row': row, 'options': options,
                            **long_eval(workdirs[row], length, options, args.eval_tokens)}
                           for length, row, options in LONG_EVAL]
    save()
  retrieval = dict(inference='cached', local_len=250, mem_blocks=4, topk=4)   # passkey: every block kept
  if not args.skip_passkey:
    lengths = [int(x) for x in args.passkey_lengths.split(',')]
    result['passkey'] = {
        'landmark (cached, k=4)': passkey_accuracy(workdirs['landmark'], lengths, args.passkey_prompts, retrieval,
                                                   None),
        'baseline (last 512 bytes)': passkey_accuracy(workdirs['baseline'], lengths, args.passkey_prompts, {},
                                                      512)}
    save()
  result['memory_mb'] = {
      'landmark cached (ℓ_local 250, all blocks kept)': {
          str(n): memory_mb(workdirs['landmark'], n, {**retrieval, 'mem_blocks': n // 50 + 1}) for n in MEMORY_LENGTHS},
      'landmark cached (ℓ_local 250, 80 blocks kept)': {
          str(n): memory_mb(workdirs['landmark'], n, {**retrieval, 'mem_blocks': 80}) for n in MEMORY_LENGTHS},
      'baseline full attention': {str(n): memory_mb(workdirs['baseline'], n, {}) for n in MEMORY_LENGTHS}}
  save()
  plot(result, os.path.join(args.results, f'landmark-{args.shape}.png'))
  with open(os.path.join(args.results, f'landmark-{args.shape}.md'), 'w') as f:
    f.write(render(args.shape, result))
  print(open(os.path.join(args.results, f'landmark-{args.shape}.md')).read())


if __name__ == '__main__':
  main()

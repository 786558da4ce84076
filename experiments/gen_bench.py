"""Generation throughput of every architecture: its own `generate` (decode caches) against the per-token
cost of generating without a cache, at the arena's parameter-matched shapes.

  python -m experiments.gen_bench [--models a,b] [--size tiny] [--prompt_lens 128,2048] [--new_tokens 256]
      [--batch 1] [--name gen-bench-cpu] [--override KEY=VALUE ...]

Each case runs in its own process: it builds the arena config for the model at a window of prompt + new
tokens, with random weights (speed does not depend on training; MoR's routers then send about half the
tokens on at each recursion), and a prompt of the Python standard library's bytes. The cached figure is the
wall time of one whole `generate` call (prefill included) after a warm-up call of the same shapes, greedy
over byte ids only (no end-of-document or end-of-word symbol, so every row runs all its tokens; HAT's
words then end at the 16-byte cap). The uncached figure is what generating without a cache costs per
token: the median time of one full forward over the final length (`models.sampling.full_forward_fn`, the
step of the uncached loop; HAT: its teacher-forced forward over all the words; ByT5/MrT5: the decoder over
its whole target buffer, as before the decoder had a cache, plus one encoder pass shared by the tokens).
Writes results/<name>.md and .csv.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments import bench
from experiments.configs import arena as arena_config

FIELDS = ('model', 'prompt_len', 'new_tokens', 'batch', 'non_embedding_params', 'cached_tokens_per_sec',
          'uncached_tokens_per_sec', 'speedup', 'compile_time_s', 'status')


def prompt_ids(length: int) -> list[int]:
  """`length` bytes of the standard library's source (repeated if needed)."""
  text = inspect.getsource(inspect).encode()
  return list((text * (length // len(text) + 1))[:length])


def uncached_steps(setup, state, prompt, new_tokens: int, batch: int):
  """(what an uncached generator runs once, or None; what it runs once per generated token), at the final
  length, as callables."""
  import jax
  import jax.numpy as jnp

  from models import sampling
  from models.mrt5 import ByT5
  model, params = setup.model, state['params']
  variables = {'params': params, **state['model_state']}
  length = len(prompt) + new_tokens
  if model.batch_format == 'lm':
    forward, buffer = sampling.full_forward_fn(model), jnp.zeros((batch, length), jnp.int32)
    return None, lambda: forward(params, buffer, length - 1, jax.random.key(0), state['model_state'])
  if model.batch_format == 'seq2seq':
    encoder = jnp.ones((batch, len(prompt) + 1), jnp.int32)
    rngs = model.stream_keys(jax.random.key(0))

    @jax.jit
    def encode(v, tokens):   # -> encoder output, validity, gate
      h, valid, positions, gate = model.apply(v, tokens, method=ByT5.encode_front, rngs=rngs)
      return model.apply(v, h, valid, positions, gate, method=ByT5.encode_back)[0], valid, gate

    encoded, valid, gate = encode(variables, encoder)
    decode = jax.jit(lambda v, buffer: model.apply(v, encoded, valid, gate, buffer, method=ByT5.decode)[0])
    return (lambda: encode(variables, encoder)), lambda: decode(variables, jnp.zeros((batch, new_tokens), jnp.int32))
  # the words generation holds at the end: the prompt's (about 6 bytes each) and the new ones (at the cap)
  words = model.clone(max_words=len(prompt) // 6 + new_tokens // model.max_word_bytes + 1)
  inputs = {k: jnp.zeros(s.shape, s.dtype) for k, s in words.example_inputs(batch, length).items()}
  inputs['word_lengths'] = inputs['word_lengths'].at[:].set(6)
  forward = jax.jit(lambda v, inputs: words.apply(v, **inputs)[0])
  return None, lambda: forward(variables, inputs)


def median_time(fn) -> float:
  """Median wall time of three calls of `fn` after a warm-up call."""
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_case(model_name: str, size: str, prompt_len: int, new_tokens: int, batch: int, cache_dir: str,
             overrides: tuple[str, ...] = ()) -> dict:
  import jax
  import numpy as np

  from models.sampling import Sampling
  from train import setup as setup_lib
  config = bench.bench_config(model_name, size, prompt_len + new_tokens, prompt_len + new_tokens, cache_dir, overrides)
  with tempfile.TemporaryDirectory() as workdir:
    setup = setup_lib.Setup(config, workdir)
    state = setup.init_state()
  prompts = [np.asarray(prompt_ids(prompt_len), np.int32)] * batch
  greedy = Sampling(temperature=0, vocab_limit=256)   # byte ids only: no row stops early

  def generate():
    out = setup.model.generate(state['params'], prompts, new_tokens, key=jax.random.key(0), sampling=greedy,
                               model_state=state['model_state'])
    assert all(len(ids) == new_tokens for ids in out), [len(ids) for ids in out]

  start = time.perf_counter()
  generate()
  compile_time = time.perf_counter() - start
  start = time.perf_counter()
  generate()
  cached = batch * new_tokens / (time.perf_counter() - start)
  once, per_token = uncached_steps(setup, state, prompts[0], new_tokens, batch)
  uncached = batch * new_tokens / ((median_time(once) if once else 0.0) + new_tokens * median_time(per_token))
  return {'model': ' '.join([model_name, *overrides]), 'prompt_len': prompt_len, 'new_tokens': new_tokens, 'batch': batch,
          'non_embedding_params': setup.param_counts['non_embedding_params'], 'cached_tokens_per_sec': cached,
          'uncached_tokens_per_sec': uncached, 'speedup': cached / uncached, 'compile_time_s': compile_time,
          'status': 'ok'}


def case_in_subprocess(args, model: str, prompt_len: int, cache_dir: str) -> dict:
  cmd = [sys.executable, '-m', 'experiments.gen_bench', '--case', f'{model},{prompt_len}', '--size', args.size,
         '--new_tokens', str(args.new_tokens), '--batch', str(args.batch), '--cache_dir', cache_dir,
         '--override', *args.override]
  failed = {'model': ' '.join([model, *args.override]), 'prompt_len': prompt_len, 'new_tokens': args.new_tokens, 'batch': args.batch}
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout_s)
  except subprocess.TimeoutExpired:
    return {**failed, 'status': f'over {args.case_timeout_s} s on this host'}
  if out.returncode:
    last = [line for line in out.stderr.strip().splitlines() if line.strip()] or ['no output']
    return {**failed, 'status': f'failed: {last[-1][:160]}'}
  return json.loads(out.stdout.strip().splitlines()[-1])


def render(name: str, rows: list[dict], command: str, hardware: str, commit: str) -> str:
  from experiments import run
  header = ['model', 'prompt_len', 'new_tokens', 'batch', 'non_embedding_params', 'cached tokens/s',
            'uncached tokens/s', 'speedup', 'compile+first call s', 'status']
  body = [[r['model'], r['prompt_len'], r['new_tokens'], r['batch'], r.get('non_embedding_params'),
           r.get('cached_tokens_per_sec'), r.get('uncached_tokens_per_sec'),
           f'{r["speedup"]:.1f}x' if r['status'] == 'ok' else None, r.get('compile_time_s'), r['status']]
          for r in rows]
  return '\n'.join([f'# {name}', '', __doc__.split('\n\n')[0].replace('\n', ' '), '',
                    f'Command: `{command}`  ', f'Commit: {commit}  ', f'Hardware: {hardware}  ',
                    f'Date: {datetime.date.today().isoformat()}', '', *run.table(header, body), '']) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(arena_config.ARCHITECTURES))
  parser.add_argument('--size', default='tiny', help=f'an arena preset ({", ".join(arena_config.PRESETS)})')
  parser.add_argument('--prompt_lens', default='128,2048')
  parser.add_argument('--new_tokens', type=int, default=256)
  parser.add_argument('--batch', type=int, default=1, help='prompts generated together')
  parser.add_argument('--case_timeout_s', type=int, default=900)
  parser.add_argument('--name', default='', help='results/<name>.{csv,md} (default gen-bench-<platform>)')
  parser.add_argument('--results', default='results')
  parser.add_argument('--override', nargs='*', default=[],
                      help='KEY=VALUE applied to every case (model.num_layers=8), named in the model column')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  parser.add_argument('--cache_dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    model, prompt_len = args.case.split(',')
    print(json.dumps(run_case(model, args.size, int(prompt_len), args.new_tokens, args.batch, args.cache_dir,
                              tuple(args.override))))
    return
  from experiments import run
  models = args.models.split(',')
  unknown = sorted(set(models) - set(arena_config.ARCHITECTURES)) + sorted({args.size} - set(arena_config.PRESETS))
  if unknown:
    parser.error(f'unknown model or size {unknown[0]!r}')
  import jax
  name = args.name or f'gen-bench-{jax.default_backend()}'
  command = 'python -m experiments.gen_bench ' + ' '.join(sys.argv[1:])
  commit, hardware = run.git_commit(), run.hardware()
  rows = []
  with tempfile.TemporaryDirectory() as cache_dir:
    for model in models:
      for prompt_len in map(int, args.prompt_lens.split(',')):
        row = case_in_subprocess(args, model, prompt_len, cache_dir)
        print(json.dumps(row), flush=True)
        rows.append(row)
  bench.write_csv(os.path.join(args.results, f'{name}.csv'), rows, FIELDS, command=command, commit=commit,
                  hardware=hardware)
  with open(os.path.join(args.results, f'{name}.md'), 'w') as f:
    f.write(render(name, rows, command, hardware, commit))
  print(open(os.path.join(args.results, f'{name}.md')).read())


if __name__ == '__main__':
  main()

"""Training-step throughput of every architecture: forward + backward + optimizer update, the trainer's
own compiled step, at the arena's shapes (parameter-matched) and several sequence lengths.

  python -m experiments.bench [--models a,b] [--sizes tiny,small] [--seq_lens 128,512,2048,8192]
      [--tokens_per_step 8192] [--repeats 5] [--steps_per_repeat 3] [--name bench-cpu] [--override KEY=VALUE ...]

Each case runs in its own process (a clean peak-memory counter; an out-of-memory case fails alone):
it builds the arena config for (model, size) at that sequence length with batch = tokens_per_step /
seq_len, compiles the train step, runs two warm-up steps, then `repeats` timed runs of
`steps_per_repeat` steps each, blocking on the result only at the end of a run; the step time is the
median run over its steps. MFU = tokens/sec x the model's analytic training FLOPs per token / the
device's dense peak (train/metrics.py; on CPU this host's float32 matmul rate through XLA, measured at the
start, so CPU figures are for comparing architectures, not hardware). Peak memory is the device's
measured peak where it reports one, else XLA's estimate for the step (arguments + temporaries).
Writes results/<name>.csv, .md and .png.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.configs import arena as arena_config

FIELDS = ('model', 'size', 'seq_len', 'batch', 'non_embedding_params', 'step_time_s', 'tokens_per_sec', 'mfu',
          'peak_memory_mb', 'memory_measured', 'compile_time_s', 'flops_per_token', 'status')


def bench_config(model: str, size: str, seq_len: int, tokens_per_step: int, cache_dir: str,
                 overrides: tuple[str, ...] = ()):
  """The arena's parameter-matched config for `model` at `size`, with the benchmark's sequence length and
  `overrides` (KEY=VALUE, the value read as the key's type; e.g. model.remat=none)."""
  c = arena_config.matched(size, model, seq_len)
  c.data.update(corpus='stdlib', tokenizer='byte', cache_dir=cache_dir)
  c.train.update(batch_size=max(1, tokens_per_step // seq_len), seq_len=seq_len, steps=10**6, warmup_steps=10)
  c.wandb.mode = 'disabled'
  for override in overrides:
    key, value = override.split('=', 1)
    *parents, leaf = key.split('.')
    node = c
    for parent in parents:
      node = node[parent]
    current = node[leaf]
    node[leaf] = value.lower() in ('1', 'true') if isinstance(current, bool) else type(current)(value)
  return c


def host_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """This host's float32 matmul FLOP/s through XLA (the best of `repeats` n x n products): the CPU peak."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(jnp.dot)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def run_case(model: str, size: str, seq_len: int, tokens_per_step: int, repeats: int, steps_per_repeat: int,
             cache_dir: str, peak_flops: float = 0.0, overrides: tuple[str, ...] = ()) -> dict:
  """Measure one case in this process."""
  import jax

  from train import metrics as metrics_lib
  from train.trainer import Trainer

  config = bench_config(model, size, seq_len, tokens_per_step, cache_dir, overrides)
  config.train.peak_flops_per_device = peak_flops
  with tempfile.TemporaryDirectory() as workdir:
    trainer = Trainer(config, workdir)
    setup = trainer.setup
    state = setup.init_state()
    batch = setup.global_batch(setup.dataset.train_batch(0, setup.rows))
    start = time.perf_counter()
    step = trainer.compile_train_step(state, batch)
    compile_time = time.perf_counter() - start
    for _ in range(2):   # warm-up
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps_per_repeat):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / steps_per_repeat)
    step_time = statistics.median(times)
    tokens = config.train.batch_size * seq_len
    flops_per_token = setup.model.flops_per_token(seq_len)
    peak_flops = metrics_lib.peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count()
    peak, measured = metrics_lib.peak_memory(metrics_lib.device_peak_memory(), metrics_lib.step_memory(step))
    return {'model': model, 'size': size, 'seq_len': seq_len, 'batch': config.train.batch_size,
            'non_embedding_params': setup.param_counts['non_embedding_params'], 'step_time_s': step_time,
            'tokens_per_sec': tokens / step_time, 'mfu': tokens / step_time * flops_per_token / peak_flops,
            'peak_memory_mb': peak / 2**20, 'memory_measured': measured,
            'compile_time_s': compile_time, 'flops_per_token': flops_per_token, 'status': 'ok'}


def case_in_subprocess(args, model: str, size: str, seq_len: int, cache_dir: str) -> dict:
  cmd = [sys.executable, '-m', 'experiments.bench', '--case', f'{model},{size},{seq_len}',
         '--tokens_per_step', str(args.tokens_per_step), '--repeats', str(args.repeats),
         '--steps_per_repeat', str(args.steps_per_repeat), '--cache_dir', cache_dir,
         '--peak_flops', str(args.peak_flops), '--override', *args.override]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout_s)
  except subprocess.TimeoutExpired:
    return {'model': model, 'size': size, 'seq_len': seq_len, 'status': f'over {args.case_timeout_s} s on this host'}
  if out.returncode:
    last = [line for line in out.stderr.strip().splitlines() if line.strip()] or ['no output']
    return {'model': model, 'size': size, 'seq_len': seq_len, 'status': f'failed: {last[-1][:160]}'}
  return json.loads(out.stdout.strip().splitlines()[-1])


def render(name: str, rows: list[dict], command: str, hardware: str, commit: str, peak_flops: float) -> str:
  from experiments import run
  header = ['model', 'size', 'seq_len', 'batch', 'non_embedding_params', 'step_time_ms', 'tokens_per_sec', 'mfu',
            'peak_memory_mb', 'compile_time_s', 'status']
  body = []
  for r in rows:
    ok = r['status'] == 'ok'
    body.append([r['model'], r['size'], r['seq_len'], r.get('batch'), r.get('non_embedding_params'),
                 1e3 * r['step_time_s'] if ok else None, r.get('tokens_per_sec'),
                 f'{100 * r["mfu"]:.2f}%' if ok else None,
                 (f'{r["peak_memory_mb"]:,.0f}' + ('' if r['memory_measured'] else ' (XLA est.)')) if ok else None,
                 r.get('compile_time_s'), r['status']])
  return '\n'.join([
      f'# {name}', '', __doc__.split('\n\n')[0].replace('\n', ' '), '',
      f'Command: `{command}`  ', f'Commit: {commit}  ', f'Hardware: {hardware}  ',
      f'Peak for MFU: {peak_flops / 1e9:,.0f} GFLOP/s per device  ',
      f'Date: {datetime.date.today().isoformat()}', '', *run.table(header, body), '',
      f'![throughput]({name}.png)', '']) + '\n'


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  sizes = sorted({r['size'] for r in rows}, key=list(arena_config.PRESETS).index)
  fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    for model in dict.fromkeys(r['model'] for r in rows):
      points = [(r['seq_len'], r['tokens_per_sec']) for r in rows
                if r['model'] == model and r['size'] == size and r['status'] == 'ok']
      if points:
        ax.plot(*zip(*points), 'o-', label=model)
    ax.set(xscale='log', yscale='log', xlabel='sequence length', ylabel='training tokens/sec',
           title=f'size {size}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_csv(path: str, rows: list[dict], fields, *, command: str, commit: str, hardware: str) -> None:
  """The benchmark's rows, each with the provenance of the run (command, commit, hardware, date)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[*fields, 'command', 'commit', 'hardware', 'date'], extrasaction='ignore')
    writer.writeheader()
    for r in rows:
      writer.writerow({**r, 'command': command, 'commit': commit, 'hardware': hardware,
                       'date': datetime.date.today().isoformat()})


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(arena_config.ARCHITECTURES))
  parser.add_argument('--sizes', default='tiny',
                      help=f'comma-separated arena presets ({", ".join(arena_config.PRESETS)})')
  parser.add_argument('--seq_lens', default='128,512,2048,8192')
  parser.add_argument('--tokens_per_step', type=int, default=8192, help='batch = this / seq_len (at least 1)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--steps_per_repeat', type=int, default=3)
  parser.add_argument('--case_timeout_s', type=int, default=900)
  parser.add_argument('--name', default='', help='results/<name>.{csv,md,png} (default bench-<platform>)')
  parser.add_argument('--results', default='results')
  parser.add_argument('--peak_flops', type=float, default=0.0,
                      help='per-device peak FLOP/s for MFU (0: the device table; on CPU, the measured matmul rate)')
  parser.add_argument('--override', nargs='*', default=[], help='KEY=VALUE applied to every case (model.remat=none)')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  parser.add_argument('--cache_dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    model, size, seq_len = args.case.split(',')
    print(json.dumps(run_case(model, size, int(seq_len), args.tokens_per_step, args.repeats, args.steps_per_repeat,
                              args.cache_dir, args.peak_flops, tuple(args.override))))
    return
  from experiments import run
  models, sizes = args.models.split(','), args.sizes.split(',')
  unknown = sorted(set(models) - set(arena_config.ARCHITECTURES)) + sorted(set(sizes) - set(arena_config.PRESETS))
  if unknown:
    parser.error(f'unknown model or size {unknown[0]!r}')
  import jax
  name = args.name or f'bench-{jax.default_backend()}'
  if not args.peak_flops:
    from train import metrics as metrics_lib
    args.peak_flops = host_matmul_flops() if jax.default_backend() == 'cpu' else metrics_lib.peak_flops_per_device()
  command = 'python -m experiments.bench ' + ' '.join(sys.argv[1:])
  commit, hardware = run.git_commit(), run.hardware()
  rows = []
  with tempfile.TemporaryDirectory() as cache_dir:
    for size in sizes:
      for model in models:
        for seq_len in map(int, args.seq_lens.split(',')):
          row = case_in_subprocess(args, model, size, seq_len, cache_dir)
          print(json.dumps(row), flush=True)
          rows.append(row)
  write_csv(os.path.join(args.results, f'{name}.csv'), rows, FIELDS, command=command, commit=commit,
            hardware=hardware)
  plot(rows, os.path.join(args.results, f'{name}.png'))
  with open(os.path.join(args.results, f'{name}.md'), 'w') as f:
    f.write(render(name, rows, command, hardware, commit, args.peak_flops))
  print(open(os.path.join(args.results, f'{name}.md')).read())


if __name__ == '__main__':
  main()

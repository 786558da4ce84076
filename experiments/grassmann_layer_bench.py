"""Forward+backward time and memory of one Grassmann block against one attention block.

  python -m experiments.grassmann_layer_bench [--lengths 128,512,2048,8192] [--repeats 5]

Both blocks at the paper's width (d=256, d_ff=1024; Grassmann r=32 with offsets 1,2,4,8,12,16;
attention with 4 heads, causal), batch 1, float32. Time: median of `repeats` jitted calls after a
warm-up call (compilation excluded). Memory: XLA's buffer assignment for the compiled step (temporary
plus argument bytes), the figure XLA:CPU exposes; on a GPU it is the same figure for that backend.
Writes results/grassmann-layer-bench.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.run import git_commit, hardware
from models import grassmann, layers, stack

D_MODEL, D_FF, HEADS, RANK = 256, 1024, 4, 32


BLOCKS = {
    'attention': layers.Block(d_model=D_MODEL, num_heads=HEADS, d_ff=D_FF, prenorm=False, attention_impl='einsum'),
    'grassmann': grassmann.GrassmannBlock(d_model=D_MODEL, d_ff=D_FF, rank=RANK, offsets=grassmann.PAPER_OFFSETS,
                                          prenorm=False, eps=1e-6, dropout=0.0, dtype=jnp.float32),
}


def measure(kind: str, length: int, repeats: int) -> dict:
  module = BLOCKS[kind]
  positions = jnp.arange(length)[None]
  context = stack.Context(mask=layers.causal_mask(positions, positions), positions=positions)
  x = jax.random.normal(jax.random.key(0), (1, length, D_MODEL))
  params = nn.meta.unbox(module.init(jax.random.key(1), x, context))['params']
  step = jax.jit(jax.grad(lambda p, x: module.apply({'params': p}, x, context).sum(), argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  memory = compiled.memory_analysis()
  jax.block_until_ready(compiled(params, x))   # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {'layer': kind, 'seq_len': length, 'fwd_bwd_ms': seconds * 1e3, 'us_per_token': seconds / length * 1e6,
          'memory_mb': (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2 ** 20}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', default='128,512,2048,8192')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='results/grassmann-layer-bench')
  args = parser.parse_args()
  rows = [measure(kind, int(length), args.repeats) for length in args.lengths.split(',')
          for kind in ('attention', 'grassmann')]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for kind in ('attention', 'grassmann'):
    pts = [r for r in rows if r['layer'] == kind]
    axes[0].plot([r['seq_len'] for r in pts], [r['us_per_token'] for r in pts], 'o-', label=kind)
    axes[1].plot([r['seq_len'] for r in pts], [r['memory_mb'] for r in pts], 'o-', label=kind)
  for ax, label in zip(axes, ('forward+backward time per token (µs)', 'XLA buffers for the step (MiB)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length')
    ax.set_ylabel(label)
    ax.legend()
  fig.tight_layout()
  fig.savefig(args.out + '.png', dpi=120)
  command = 'python -m experiments.grassmann_layer_bench ' + f'--lengths {args.lengths} --repeats {args.repeats}'
  lines = ['# One block, forward+backward: Grassmann mixing vs causal attention', '',
           f'Command: `{command}` · commit {git_commit()} · {hardware()} · {datetime.date.today().isoformat()}', '',
           'd=256, d_ff=1024, batch 1, float32; attention: 4 heads (XLA dot_product_attention, full masked scores); '
           'Grassmann: r=32, offsets 1,2,4,8,12,16. Median of the timed calls, compilation excluded.', '',
           '| layer | seq_len | fwd+bwd ms | µs per token | memory MiB |', '|---|---|---|---|---|']
  lines += [f'| {r["layer"]} | {r["seq_len"]} | {r["fwd_bwd_ms"]:.2f} | {r["us_per_token"]:.2f} | {r["memory_mb"]:.1f} |'
            for r in rows]
  lines += ['', f'![scaling]({os.path.basename(args.out)}.png)']
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

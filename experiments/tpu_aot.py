"""Every architecture at its paper shape (experiments/configs/paper.py), compiled for two TPU slices from this
host by `python -m train.aot`: per-chip memory, whether it fits, a step-time bound, MFU and the chip-hours
of the paper's main run. Writes results/tpu-aot.json and results/tpu-aot.md.

  python -m experiments.tpu_aot [--only NAME|depth[,...]] [--out results/tpu-aot] [--render]

Each row compiles in its own process (libtpu, and the memory of one compilation at a time). `--only` reruns
some rows and keeps the others from the JSON already written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from importlib import metadata

from experiments import run
from experiments.configs import paper
from train import aot

# v5e-16 (16 chips of 16 GiB) and v5p-64 (32 chips of 95 GiB; Google counts v5p in TensorCores); v6e-8 (8 chips
# of 32 GiB) for the one small model. The micro-batch
# per chip (train.grad_accum) is what a user would pick: the largest that fits, about 4k-8k tokens a chip.
TOPOLOGIES = {'v5e-16': 'v5e:4x4', 'v5p-64': 'v5p:2x4x4', 'v6e-8': 'v6e:2x4'}
ROWS = [
    dict(name='transformer', slice='v5e-16', grad_accum=8), dict(name='transformer', slice='v5p-64', grad_accum=2),
    dict(name='tokenformer', slice='v5e-16', grad_accum=8), dict(name='tokenformer', slice='v5p-64', grad_accum=2),
    # 17M parameters at batch 16: a user takes a small slice (16 chips is already one sequence a chip)
    dict(name='grassmann', slice='v5e-16', grad_accum=1), dict(name='grassmann', slice='v6e-8', grad_accum=1),
    dict(name='mor', slice='v5e-16', grad_accum=32), dict(name='mor', slice='v5p-64', grad_accum=8),
    dict(name='llama', slice='v5e-16', grad_accum=32), dict(name='llama', slice='v5p-64', grad_accum=8),
    dict(name='hat', slice='v5e-16', grad_accum=64), dict(name='hat', slice='v5p-64', grad_accum=32),
    dict(name='mrt5', slice='v5e-16', grad_accum=16), dict(name='mrt5', slice='v5p-64', grad_accum=8),
    dict(name='landmark', slice='v5e-16', grad_accum=2), dict(name='landmark', slice='v5p-64', grad_accum=1),
    dict(name='lexinvariant', slice='v5e-16', grad_accum=1), dict(name='lexinvariant', slice='v5p-64', grad_accum=1),
]

# Compile time of the train step against depth, layers scanned (one compiled layer) or unrolled.
DEPTH_ROWS = [dict(name='transformer', slice='v5e-16', grad_accum=8, depth=depth, scan=scan,
                   overrides=[f'--config.model.num_layers={depth}', f'--config.model.scan_layers={scan}',
                              '--eval_step=false', '--decode_step=false'])
              for depth in (6, 12, 24) for scan in (True, False)]

# Measured on the baseline at v5e-16 (batch 512 x 1024) while building this table; the rows above have all of it.
FIXES = [
    '- **Activation sharding hints took effect.** The models constrain their activations by logical name '
    '(`layers.constrain`), but nothing had set the mesh and rules, so the hints were no-ops and XLA kept whole '
    'micro-batches on every chip: 18.9 GiB per chip at 8 micro-batches, against 1.7 GiB with the hints '
    '(`layers.activation_sharding`, entered by the train and eval steps).',
    '- **Evaluation in the training micro-batches.** The eval step ran the whole global batch at once: the '
    'compiler asked for 55.3 GiB on v5e. It now maps over `train.grad_accum` micro-batches.',
    '- **Micro-batches per slice** (`train.grad_accum`, in each row): at one micro-batch the baseline asked for '
    '56.0 GiB (its float32 logits alone are 6.6 GB a chip).',
    '- **Splash attention** on TPU (`attention_impl=auto`): the Pallas kernel for causal attention without mask '
    'or bias (the baseline: 4 kernels per step). The others pass an explicit mask or bias (TokenFormer\'s and '
    'MoR\'s causal masks, HAT\'s word masks, T5 and Lexinvariant biases, Landmark\'s own attention) and get '
    'XLA\'s attention; they fit without the kernel.',
    '- **Scanned layers** where the model allows (`scan_layers`): compile time flat in depth (below).',
    '- **Grassmann** on v6e-8 instead of v5p-64: its paper batch of 16 cannot split over 32 chips, and the '
    '16 x 2 (data, tensor) mesh had not compiled after 8 minutes.',
]


def row_key(row: dict) -> str:
  return f"{row['name']}@{row['slice']}" + (f"/{row['depth']}/{row['scan']}" if 'depth' in row else '')


def command(row: dict) -> list[str]:
  args = ['--config', f"experiments/configs/paper.py:{row['name']}", '--topology', TOPOLOGIES[row['slice']],
          f"--config.train.grad_accum={row['grad_accum']}"]
  args += [f'--config.mesh.{axis}={size}' for axis, size in row.get('mesh', {}).items()]
  args += row.get('overrides', [])
  return [sys.executable, '-m', 'train.aot', *args]


def compile_row(row: dict) -> dict:
  cmd = command(row)
  done = subprocess.run(cmd, capture_output=True, text=True)
  stamp = {'command': ' '.join(['python', *cmd[1:]]), 'commit': run.git_commit(), 'date': datetime.date.today().isoformat()}
  if done.returncode:
    error = [line for line in done.stderr.splitlines() if line.strip()][-1]
    return {**row, **stamp, 'error': error}
  return {**row, **stamp, 'report': json.loads(done.stdout.strip().splitlines()[-1])}


def chip_hours(report: dict, tokens: float) -> float | None:
  """The paper's main run at the estimated rate: tokens / (tokens/s per chip) in hours."""
  rate = report.get('tokens_per_s_per_device')
  if not rate:
    return None
  return tokens / (rate * report['devices'] / report['chips']) / 3600


def markdown(rows: list[dict], header: dict) -> str:
  gib = lambda n: f'{n / 2 ** 30:.1f}'
  lines = [
      '# Paper-scale shapes compiled for TPU slices from a CPU host',
      '',
      f"Command: `python -m experiments.tpu_aot` (each row's own `python -m train.aot` command is in "
      f"results/tpu-aot.json). Compiled on {header['host']} with libtpu {header['libtpu']} (jax {header['jax']}); "
      "no TPU was used: XLA's TPU compiler ran on this CPU.",
      '',
      'Memory is per chip, XLA\'s own memory analysis of the compiled step (arguments + outputs - aliased + '
      'temporaries, or its peak where larger); "no" rows are refused by the compiler, which reports what it needs. '
      'The step time is a lower bound: the traced matmul FLOPs at the chip\'s peak bf16 rate, or XLA\'s roofline '
      '(flops and bytes) where that is larger and XLA counted every layer (the Pallas splash kernel counted over '
      'its whole grid, as if attention were not causal); it sees no collectives, so MFU '
      '(analytic model FLOPs / step time / peak) is an upper bound. Chip-hours are the paper\'s main run '
      '(its tokens, experiments/configs/paper.py) at that rate.',
      '',
      '| model | slice | mesh (data, fsdp, tensor) | batch x seq (micro-batches) | params | train / eval / decode '
      'GiB per chip | fits | step (ms) | tokens/s/chip | MFU <= | chip-hours | compile train (s) | commit, date |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in [r for r in rows if 'depth' not in r]:
    if 'error' in row:
      lines.append(f"| {row['name']} | {row['slice']} | | | | | error: {row['error']} | | | | | | "
                   f"{row['commit']}, {row['date']} |")
      continue
    r = row['report']
    mesh = ', '.join(str(r['mesh'][a]) for a in ('data', 'fsdp', 'tensor'))
    per_step = []
    for k in ('train', 'eval', 'decode'):
      if k not in r:
        per_step.append('-')
      elif 'needed_temp_bytes' in r[k]:
        per_step.append(f"needs {gib(r[k]['needed_temp_bytes'])}")
      else:
        per_step.append(gib(r[k]['total_bytes']))
    tokens = paper.RUNS[row['name']]['tokens']
    hours = chip_hours(r, tokens)
    chips = r['devices'] // (r['devices'] // r['chips'])
    step = f"{r['step_s'] * 1e3:.0f}" if r.get('step_s') else '-'
    rate = f"{r['tokens_per_s_per_device'] * r['devices'] / chips:,.0f}" if r.get('step_s') else '-'
    mfu = f"{r['mfu']:.0%}" if r.get('step_s') else '-'
    lines.append(
        f"| {row['name']} | {row['slice']} ({r['topology']}) | {mesh} | {r['batch_size']} x {r['seq_len']} "
        f"({r['grad_accum']}) | {r['params'] / 1e6:.0f}M | {' / '.join(per_step)} of {gib(r['capacity_bytes'])} | "
        f"{'yes' if r['fits'] else 'no'} | {step} | {rate} | {mfu} | "
        f"{f'{hours:,.0f}' if hours else '-'} ({tokens:.3g} tokens) | {r['train']['compile_s']:.0f} | "
        f"{row['commit']}, {row['date']} |")
  lines += ['', '## What made the rows fit', '', *FIXES]
  lines += ['', '## The chips', '', '| chip | jax device kind | HBM per chip | peak bf16 | HBM bandwidth | source |',
            '|---|---|---|---|---|---|']
  lines += [f'| {c.name} | {c.device_kind} | {c.hbm_bytes / 2 ** 30:.0f} GiB | {c.peak_bf16 / 1e12:.0f} TFLOP/s | '
            f'{c.hbm_bandwidth / 1e9:,.0f} GB/s | {c.source} |' for c in aot.CHIPS.values()]
  lines += ['', '## Compile time against depth', '',
            f'The baseline on {DEPTH_ROWS[0]["slice"]}, train step only; scanned layers compile one layer body.', '',
            '| layers | scanned | train step compile (s) | train GiB per chip |', '|---|---|---|---|']
  for row in [r for r in rows if 'depth' in r and 'report' in r]:
    train = row['report']['train']
    memory = gib(train['total_bytes']) if 'total_bytes' in train else f"needs {gib(train['needed_temp_bytes'])}"
    lines.append(f"| {row['depth']} | {'yes' if row['scan'] else 'no'} | {train['compile_s']:.0f} | {memory} |")
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='comma-separated model names (or depth) to (re)compile')
  parser.add_argument('--out', default='results/tpu-aot')
  parser.add_argument('--render', action='store_true', help='only rewrite the markdown from the JSON')
  args = parser.parse_args()
  only = set(filter(None, args.only.split(',')))
  out = pathlib.Path(args.out)
  previous = {}
  if out.with_suffix('.json').exists():
    written = json.loads(out.with_suffix('.json').read_text())
    if args.render:
      out.with_suffix('.md').write_text(markdown(written['rows'], written['header']))
      return
    previous = {row_key(r): r for r in written['rows']}
  header = {'host': f'{os.cpu_count()}-core {platform.machine()} CPU', 'jax': metadata.version('jax'),
            'libtpu': metadata.version('libtpu')}
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  for row in ROWS + DEPTH_ROWS:
    chosen = ('depth' if 'depth' in row else row['name']) in only
    if only and not chosen and row_key(row) in previous:
      rows.append(previous[row_key(row)])
      continue
    result = compile_row(row)
    print(json.dumps({k: v for k, v in result.items() if k != 'report'}), file=sys.stderr, flush=True)
    rows.append(result)
    # after every row: an interrupted run keeps what it compiled (rerun with --only for the rest)
    out.with_suffix('.json').write_text(json.dumps({'header': header, 'rows': rows}, indent=1) + '\n')
  out.with_suffix('.md').write_text(markdown(rows, header))

if __name__ == '__main__':
  main()

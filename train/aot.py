"""python -m train.aot --config FILE[:ARG] --topology v5e:4x4 [--config.KEY=VALUE ...]

Compiles, from this host and without a TPU, the trainer's own train step (`Trainer.trace_train_step`), the
eval step and the cached decode step for a TPU pod slice, on abstract state and batch shapes: no data is
read and no array allocated. It prints per-chip memory against the chip's HBM, XLA's flops against the
analytic count, a roofline step time with tokens/s and MFU, the collectives in the compiled train step and
the compile times, as a table and then one JSON line.

Needs libtpu (`pip install -e '.[tpu]'`, which is `jax[tpu]` at the project's jax). The model's 'auto' keys
resolve for the target ('tpu'), not for this host's CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # libtpu would otherwise look for a local TPU at start-up
# This process opens no TPU, so it need not hold libtpu's one-process lock (/tmp/libtpu_lockfile): compilations
# (and test workers) can run side by side.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from models import sampling  # noqa: E402
from train import config as config_lib, metrics as metrics_lib, setup as setup_lib, sharding, trainer  # noqa: E402

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str            # the topology prefix: v5e in v5e:4x4
  device_kind: str     # jax's device_kind
  hbm_bytes: float     # per chip
  hbm_bandwidth: float  # bytes/s per chip
  source: str

  @property
  def peak_bf16(self) -> float:
    """Dense bf16 FLOP/s per chip: the trainer's MFU table (train.metrics.PEAK_FLOPS)."""
    return metrics_lib.PEAK_FLOPS[self.device_kind.lower()]


# Google Cloud's published per-chip figures (checked 2026-12-02 against the pages named; they give v4 in GiB and
# the others in "GB": the compiler's own free-HBM figure, e.g. 15.75 GiB on v5e, is what refuses a program).
CHIPS = {c.name: c for c in (
    Chip('v4', 'TPU v4', 32 * GIB, 1200e9, 'https://docs.cloud.google.com/tpu/docs/v4'),
    Chip('v5e', 'TPU v5 lite', 16 * GIB, 819e9, 'https://docs.cloud.google.com/tpu/docs/v5e'),
    Chip('v5p', 'TPU v5', 95 * GIB, 2765e9, 'https://docs.cloud.google.com/tpu/docs/v5p'),
    Chip('v6e', 'TPU v6 lite', 32 * GIB, 1638e9, 'https://docs.cloud.google.com/tpu/docs/v6e'),
)}
TOPOLOGY_PATTERN = re.compile(r'^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def topology_devices(name: str):
  """The devices of TPU topology `name` (e.g. v5e:4x4, v5p:2x4x4), or a ConfigError in one line."""
  if not TOPOLOGY_PATTERN.match(name):
    raise config_lib.ConfigError(f'--topology={name!r} is not CHIP:AxB[xC] with CHIP one of {", ".join(CHIPS)} '
                                 '(e.g. v5e:4x4, v5p:2x4x4)')
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise config_lib.ConfigError(f"libtpu is not installed: pip install 'jax[tpu]=={jax.__version__}' "
                                 "(or pip install -e '.[tpu]') to compile for TPU from this host") from None
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform='tpu').devices
  except Exception as e:  # noqa: BLE001 - libtpu reports a bad topology as a runtime error
    raise config_lib.ConfigError(f'--topology={name}: {str(e).splitlines()[0]}') from None


def chip_of(topology: str, devices) -> tuple[Chip, int]:
  """The chip and how many jax devices each chip shows (v4 without megacore: one per TensorCore)."""
  chip = CHIPS[topology.split(':')[0]]
  chips = {tuple(d.coords) for d in devices}
  return chip, len(devices) // len(chips)


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Collectives in a compiled module's HLO, by kind (async pairs counted once, at their start)."""
  ops = re.findall(r'=\s*[^=]*?\b(' + '|'.join(COLLECTIVES) + r')(-start)?\(', hlo_text)
  return dict(sorted(Counter(kind for kind, _ in ops).items()))


def memory_of(compiled) -> dict:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {'argument_bytes': int(m.argument_size_in_bytes), 'output_bytes': int(m.output_size_in_bytes),
          'alias_bytes': int(m.alias_size_in_bytes), 'temp_bytes': int(m.temp_size_in_bytes),
          'total_bytes': int(max(total, m.peak_memory_in_bytes))}


def cost_of(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # one entry per program on some versions
  return {'flops': float(cost.get('flops', math.nan)), 'bytes_accessed': float(cost.get('bytes accessed', math.nan)),
          'optimal_seconds': float(cost.get('optimal_seconds', math.nan))}


def matmul_flops(jaxpr) -> float:
  """FLOPs of every dot_general in a (closed) jaxpr, through its sub-jaxprs: a scan's body counts `length`
  times, a cond its costliest branch, a Pallas kernel's body once per grid point (splash's blocks above the
  diagonal included, which it skips: its attention is counted as if not causal), and rematerialised
  forwards once more where the backward recomputes them. XLA's cost analysis counts a loop body once, so
  it undercounts scanned layers, and it does not see into Pallas kernels."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      continue
    subs = [v for v in eqn.params.values() if hasattr(v, 'eqns') or hasattr(v, 'jaxpr')]
    subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v if hasattr(b, 'jaxpr')]
    if eqn.primitive.name == 'cond':
      total += max(matmul_flops(b) for b in eqn.params['branches'])
    elif eqn.primitive.name == 'pallas_call':   # the kernel body runs once per grid point
      total += math.prod(eqn.params['grid_mapping'].grid) * matmul_flops(eqn.params['jaxpr'])
    elif subs:
      times = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
      total += times * sum(matmul_flops(sub) for sub in subs)
  return total


def out_of_memory(message: str) -> tuple[int, int] | None:
  """(needed, available) bytes from the TPU compiler's out-of-memory error, which it raises instead of compiling."""
  found = re.search(r'RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)', message, re.S)
  if not found:
    return None
  scale = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
  return (int(float(found[1]) * scale[found[2]]), int(float(found[3]) * scale[found[4]]))


def abstract_decode_inputs(setup):
  """(cache, tokens) for one decode step of a batch of one sequence per batch shard, at train.seq_len."""
  batch = setup.mesh.shape['data'] * setup.mesh.shape['fsdp']
  cache = jax.eval_shape(lambda: sampling.init_cache(setup.model, batch, setup.config.train.seq_len))
  rows = sharding.batch_sharding(setup.mesh)
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=rows if x.ndim and x.shape[0] == batch else sharding.replicated(setup.mesh)), cache)
  return cache, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)


def compile_step(lower, capacity: float):
  """(compiled or None, report): per-device memory and compile time, or how much the program needs when the
  TPU compiler refuses it for not fitting in HBM (it does so rather than compile)."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except jax.errors.JaxRuntimeError as e:
    needed = out_of_memory(str(e))
    if needed is None:
      raise
    return None, {'fits': False, 'needed_temp_bytes': needed[0], 'available_bytes': needed[1],
                  'compile_s': time.perf_counter() - start}
  memory = memory_of(compiled)
  return compiled, {**memory, 'fits': memory['total_bytes'] <= capacity, 'compile_s': time.perf_counter() - start}


def compile_for(config, topology: str, *, eval_step: bool = True, decode_step: bool = True) -> dict:
  """Compile config's steps for `topology`; the report as a dict (see the module docstring)."""
  devices = topology_devices(topology)
  chip, devices_per_chip = chip_of(topology, devices)
  n_devices = len(devices)
  capacity, peak = chip.hbm_bytes / devices_per_chip, chip.peak_bf16 / devices_per_chip
  setup = setup_lib.Setup(config, None, devices=devices, load_data=False)
  run = trainer.Trainer(config, None, setup=setup)
  state, batch = setup.abstract_state, setup.abstract_batch()
  t = config.train
  report = {
      'model': config.model.name, 'topology': topology, 'device_kind': devices[0].device_kind,
      'devices': n_devices, 'chips': n_devices // devices_per_chip, 'mesh': dict(setup.mesh.shape),
      'batch_size': t.batch_size, 'seq_len': t.seq_len, 'grad_accum': t.grad_accum,
      'dtype': getattr(setup.model, 'dtype', None), 'remat': getattr(setup.model, 'remat', None),
      'params': setup.param_counts['params'], 'capacity_bytes': int(capacity),
  }
  traced_step = run.trace_train_step(state, batch)
  compiled, report['train'] = compile_step(traced_step.lower, capacity)
  if compiled is not None:
    tokens = t.batch_size * t.seq_len
    cost, text = cost_of(compiled), compiled.as_text()
    traced = matmul_flops(traced_step.jaxpr) / n_devices
    analytic = setup.model.flops_per_token(t.seq_len) * tokens / n_devices   # forward + backward, per device
    report['train'].update(**cost, matmul_flops=traced, analytic_flops=analytic,
                           collectives=collective_counts(text),
                           pallas_kernels=text.count('custom_call_target="tpu_custom_call"'))
    report.update(step_estimate(cost, traced, analytic, peak=peak, bandwidth=chip.hbm_bandwidth / devices_per_chip,
                                tokens_per_device=tokens / n_devices))
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(setup.mesh))
  if eval_step:
    step = setup.make_eval_step()
    _, report['eval'] = compile_step(lambda: step.lower(state['params'], state['model_state'], batch, key), capacity)
  if decode_step and setup.model.cached_decoding and setup.model.batch_format == 'lm':
    cache, tokens_in = abstract_decode_inputs(setup)
    step = sampling.decode_step_fn(setup.model)
    _, report['decode'] = compile_step(
        lambda: step.lower(state['params'], cache, tokens_in, key, state['model_state'] or None), capacity)
  report['fits'] = all(report[k]['fits'] for k in ('train', 'eval', 'decode') if k in report)
  return report


def step_estimate(cost: dict, matmul_flops_per_device: float, analytic_flops: float, *, peak: float,
                  bandwidth: float, tokens_per_device: float) -> dict:
  """A lower bound on the step time, hence an upper bound on MFU (analytic model FLOPs over peak): the matmul
  FLOPs of the traced step at the chip's peak, or XLA's roofline of the compiled step where that is larger
  and XLA counted every layer (a scanned layer body is counted once). Neither sees collectives or their
  overlap with compute."""
  seconds, source = matmul_flops_per_device / peak, 'matmul flops at peak'
  if cost['flops'] >= 0.9 * matmul_flops_per_device:
    roofline = max(cost['flops'] / peak, cost['bytes_accessed'] / bandwidth, cost['optimal_seconds'])
    if roofline > seconds:
      seconds, source = roofline, 'xla roofline'
  else:
    source += ' (xla counted scanned layers once)'
  return {'step_s': seconds, 'step_source': source, 'tokens_per_s_per_device': tokens_per_device / seconds,
          'mfu': analytic_flops / seconds / peak}


def format_table(r: dict) -> str:
  def gb(n):
    return f'{n / GIB:.2f} GiB'

  def memory(step):
    if 'needed_temp_bytes' in step:
      return (f"does not fit: the compiler needs {gb(step['needed_temp_bytes'])} of temporaries, "
              f"{gb(step['needed_temp_bytes'] - step['available_bytes'])} over the {gb(step['available_bytes'])} free")
    verdict = 'fits' if step['fits'] else f"does not fit by {gb(step['total_bytes'] - r['capacity_bytes'])}"
    return (f"args {gb(step['argument_bytes'])}  temps {gb(step['temp_bytes'])}  total {gb(step['total_bytes'])} "
            f"of {gb(r['capacity_bytes'])}: {verdict}")

  lines = [f"{r['model']} on {r['topology']} ({r['chips']} chips, {r['devices']} devices of {r['device_kind']}), "
           f"mesh {r['mesh']}, batch {r['batch_size']} x {r['seq_len']} in {r['grad_accum']} micro-batches, "
           f"{r['params'] / 1e6:.1f}M parameters, {r['dtype']}, remat {r['remat']}"]
  for k in ('train', 'eval', 'decode'):
    if k in r:
      lines.append(f"  {k + ' step':<12} {memory(r[k])}  (compiled in {r[k]['compile_s']:.0f} s)")
  tr = r['train']
  if 'flops' in tr:
    lines += [
        f"  flops/device xla {tr['flops']:.3g}  traced matmuls {tr['matmul_flops']:.3g}  analytic {tr['analytic_flops']:.3g}",
        f"  step         >= {r['step_s'] * 1e3:.4g} ms ({r['step_source']}): <= {r['tokens_per_s_per_device']:.0f} "
        f"tokens/s per device, MFU <= {r['mfu']:.1%}",
        f"  collectives  {', '.join(f'{k} {v}' for k, v in tr['collectives'].items()) or 'none'}"]
  return '\n'.join(lines)


def _define(fv):
  flags.DEFINE_string('topology', 'v5e:2x2', 'TPU slice, CHIP:AxB[xC] with CHIP in ' + ', '.join(CHIPS), flag_values=fv)
  flags.DEFINE_bool('eval_step', True, 'also compile the eval step', flag_values=fv)
  flags.DEFINE_bool('decode_step', True, 'also compile the cached decode step (decoders with a cache)',
                    flag_values=fv)


@config_lib.cli
def main(argv):
  fv = config_lib.parse_flags(argv, _define, workdir_required=False)
  report = compile_for(fv.config, fv.topology, eval_step=fv.eval_step, decode_step=fv.decode_step)
  print(format_table(report), file=sys.stderr)
  print(json.dumps(report, default=float))


if __name__ == '__main__':
  main()

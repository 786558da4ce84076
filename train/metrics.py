"""Where metrics go: DIR/metrics.jsonl, a progress bar and Weights & Biases (process 0 only)."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid

import jax

from train import paths

# Dense bf16 peak FLOP/s per device, for MFU. CPU: the measured fp32 matmul roofline of the 2-core
# project machines (numpy 4096^2, ../shared/specs/jax-ecosystem.md section 9); override with
# train.peak_flops_per_device on other hosts.
PEAK_FLOPS = {
    'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'l4': 121e12,
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12, 'tpu v5': 459e12,
    'tpu v6 lite': 918e12, 'tpu v6e': 918e12, 'cpu': 146e9,
}


def peak_flops_per_device(override: float = 0.0) -> float:
  if override:
    return override
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return float('nan')


def device_peak_memory() -> int | None:
  """The most memory the first local device has held, where the backend reports it (not on CPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get('peak_bytes_in_use')


def step_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled step: its temporaries and arguments, in bytes."""
  try:
    m = compiled.memory_analysis()
    return {'memory_temp_bytes': int(m.temp_size_in_bytes), 'memory_argument_bytes': int(m.argument_size_in_bytes)}
  except Exception:  # noqa: BLE001 - not every backend reports it
    return {}


def peak_memory(measured: int | None, step_stats: dict) -> tuple[int | None, bool]:
  """(bytes, measured): the device's measured peak where it reports one, else XLA's estimate for the step
  (arguments + temporaries; None without either)."""
  if measured:
    return measured, True
  return (step_stats.get('memory_argument_bytes', 0) + step_stats.get('memory_temp_bytes', 0)) or None, False


def new_wandb_run_id() -> str:
  return uuid.uuid4().hex[:12]


def wandb_has_credentials() -> bool:
  if os.environ.get('WANDB_API_KEY'):
    return True
  netrc = os.path.expanduser('~/.netrc')
  return os.path.exists(netrc) and 'api.wandb.ai' in open(netrc).read()


class MetricsWriter:
  """Appends JSON lines, drives a tqdm bar and mirrors everything to W&B; W&B failures never stop training."""

  def __init__(self, workdir: str, config, *, run_id: str, total_steps: int, initial_step: int):
    self.active = jax.process_index() == 0
    self.path = paths.workdir_path(workdir, 'metrics.jsonl')
    self.wandb_run = None
    self.bar = None
    if not self.active:
      return
    from tqdm import tqdm
    # disable=None: a live bar on a terminal, nothing in logs and CI.
    self.bar = tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True, disable=None)
    self._init_wandb(workdir, config, run_id)

  def _init_wandb(self, workdir, config, run_id):
    mode = config.wandb.mode
    if mode == 'disabled':
      return
    if mode == 'online' and not wandb_has_credentials():
      mode = 'offline'
      self.note('wandb: no credentials found, logging offline (wandb sync DIR/wandb later)')
    try:
      import wandb
      wandb_dir = os.path.abspath(paths.local_dir(workdir, ''))
      os.makedirs(wandb_dir, exist_ok=True)
      self.wandb_run = wandb.init(
          project=config.wandb.project, entity=config.wandb.entity or None, name=config.wandb.name or None,
          id=run_id, resume='allow', mode=mode, dir=wandb_dir, config=config.to_dict())
    except Exception as e:  # noqa: BLE001 - logging must never stop training
      self.note(f'wandb: disabled after an error in init: {" ".join(str(e).split())[:200]}')

  def note(self, message: str) -> None:
    if self.active:
      (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self.wandb_run is not None:
      try:
        self.wandb_run.log(record, step=int(step))
      except Exception as e:  # noqa: BLE001
        self.note(f'wandb: logging failed ({e}); continuing without it')
        self.wandb_run = None
    if self.bar is not None:
      shown = {k: record[k] for k in ('loss', 'eval_loss', 'tokens_per_sec') if k in record}
      self.bar.set_postfix({k: f'{v:.4g}' for k, v in shown.items()}, refresh=False)

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.wandb_run is not None:
      try:
        self.wandb_run.finish()
      except Exception:  # noqa: BLE001
        pass


def _plain(value):
  value = float(value) if hasattr(value, '__float__') and not isinstance(value, (int, bool)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value

"""Configs: the defaults every config file starts from, command-line parsing and validation.

A config file defines `get_config(arg=None)` returning a ConfigDict built on `default_config()`;
any key can be overridden on the command line (`--config.train.steps=200`). Unknown keys, impossible
shapes and missing files stop the program before compiling, with one line naming the problem.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from typing import Callable, Sequence

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

import models
from train import paths
from train.corpora import CORPORA, DataError


class ConfigError(Exception):
  """A problem in the user's config or command line; printed as one line, no traceback."""


class TrainingStopped(Exception):
  """Training cannot continue (a non-finite loss); printed as one line."""


WANDB_MODES = ('online', 'offline', 'disabled')


def default_config(model: str = 'transformer') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = models.default_config(model)
  c.model.vocab_size = 0   # 0: taken from the tokenizer
  # 'auto': compute precision, rematerialisation and the attention kernel follow the backend
  # (`accelerator_defaults`).
  for key in ('dtype', 'remat', 'attention_impl'):
    if key in c.model:
      c.model[key] = 'auto'
  c.data = ml_collections.ConfigDict(dict(
      corpus='stdlib',     # stdlib | text | wikitext2 | documents | tfds:local | tfds:NAME
      dir='',              # directory for text/wikitext2/documents/tfds:local
      tokenizer='byte',    # byte | char | word | bpe | wordpiece
      vocab_size=8192,     # target size for bpe/wordpiece; a cap for char/word (0 = every symbol)
      cache_dir='',        # tokenized splits (default <workdir>/cache)
      tfds_dir='',         # TFDS data_dir (default ~/tensorflow_datasets)
      tfds_text_key='text',
      train_offset=0,      # training windows already read by the run this one continues (set by train.grow)
      passkey_fraction=0.0,   # share of training samples replaced by synthetic passkey sequences (train/passkey.py)
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=16, seq_len=128, grad_accum=1,
      lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
      schedule='cosine', decay_fraction=0.2,   # cosine | wsd (constant, then linear over the last decay_fraction)
      log_every=10, eval_every=500, eval_batches=0,   # eval_batches 0 = the whole validation split
      stop_at=0,   # end this invocation at this step with a checkpoint (time-sliced jobs); 0 = run to train.steps
      init_from='',   # a run directory: start from its latest parameters where paths and shapes match
      peak_flops_per_device=0.0,                       # for MFU; 0 = from the device kind
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1 = fill with the remaining devices
  c.wandb = ml_collections.ConfigDict(dict(mode='online', project='seqarch', entity='', name=''))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that need no devices and no data; raise ConfigError naming the key."""
  t = config.train
  for key in ('steps', 'batch_size', 'seq_len', 'grad_accum', 'log_every', 'eval_every'):
    if t[key] <= 0:
      raise ConfigError(f'train.{key}={t[key]} must be positive')
  if t.lr <= 0:
    raise ConfigError(f'train.lr={t.lr} must be positive')
  if t.get('schedule', 'cosine') not in ('cosine', 'wsd') or not 0 < t.get('decay_fraction', 0.2) <= 1:
    raise ConfigError(f"train.schedule={t.get('schedule')!r} must be 'cosine' or 'wsd', with train.decay_fraction "
                      'in (0, 1]')
  if t.batch_size % t.grad_accum:
    raise ConfigError(f'train.grad_accum={t.grad_accum} does not divide train.batch_size={t.batch_size}')
  if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
    raise ConfigError('checkpoint.every and checkpoint.keep must be positive')
  if not 0 <= config.data.get('passkey_fraction', 0.0) < 1:
    raise ConfigError(f'data.passkey_fraction={config.data.passkey_fraction} must be in [0, 1)')
  if config.data.corpus not in CORPORA and not config.data.corpus.startswith('tfds:'):
    raise ConfigError(f'data.corpus={config.data.corpus!r} is not one of {", ".join(CORPORA)} or tfds:NAME')
  if config.wandb.mode not in WANDB_MODES:
    raise ConfigError(f'wandb.mode={config.wandb.mode!r} must be one of {", ".join(WANDB_MODES)}')
  max_len = config.model.get('max_len')
  if max_len is not None and t.seq_len > max_len:
    raise ConfigError(f'train.seq_len={t.seq_len} exceeds model.max_len={max_len}')
  try:
    build_model(config, vocab_size=max(config.model.vocab_size, 1))
  except ValueError as e:
    raise ConfigError(str(e)) from None


# What 'auto' means on each platform: bfloat16 compute and rematerialised blocks on accelerators, where memory
# bandwidth and capacity bind; on TPU the splash kernel for causal attention (XLA's elsewhere), on GPU the fused
# path (cuDNN flash attention where shapes allow). On CPU float32 (bf16 is emulated), no remat and XLA:CPU's
# fastest attention (two einsums, layers.dot_product_attention).
AUTO = {
    'dtype': {'cpu': 'float32', 'gpu': 'bfloat16', 'tpu': 'bfloat16'},
    'remat': {'cpu': 'none', 'gpu': 'full', 'tpu': 'full'},
    'attention_impl': {'cpu': 'einsum', 'gpu': 'fused', 'tpu': 'splash'},
}


def accelerator_defaults(model_config: ml_collections.ConfigDict, platform: str) -> None:
  """Resolve the model keys left at 'auto' for `platform` (see AUTO; another accelerator is taken as a GPU)."""
  for key, by_platform in AUTO.items():
    if model_config.get(key) == 'auto':
      model_config[key] = by_platform.get(platform, by_platform['gpu'])


def build_model(config, vocab_size: int | None = None, platform: str | None = None) -> models.LanguageModel:
  """The model of `config`, its 'auto' keys resolved for `platform` (the mesh's devices: 'tpu' when compiling
  for a TPU from this host; default: this process's backend)."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  accelerator_defaults(model_config, platform or jax.default_backend())
  if vocab_size is not None:
    model_config.vocab_size = vocab_size
  try:
    return models.build(model_config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = paths.workdir_path(workdir, 'config.json')
  if not path.exists():
    raise ConfigError(f'{path} not found: --workdir must be a directory written by python -m train '
                      '(or give --config FILE)')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def parse_flags(argv: Sequence[str], define: Callable[[flags.FlagValues], None], *,
                config_from_workdir: bool = False, workdir_required: bool = True) -> flags.FlagValues:
  """Parse argv into fresh FlagValues with a `--config` (a file, or DIR/config.json) and `--workdir`.

  `config_from_workdir`: the config is the training run's saved one; `--config.x=y` still overrides.
  """
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, config.json)', flag_values=fv)
  define(fv)
  argv = list(argv)
  try:
    if config_from_workdir:
      fv(argv, known_only=True)
      if not fv.workdir:
        raise ConfigError('--workdir is required')
      config_flags.DEFINE_config_dict('config', load_workdir_config(fv.workdir), flag_values=fv,
                                      lock_config=True, sys_argv=argv)
      fv.unparse_flags()
    else:
      config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError) as e:   # an override naming a key the config does not have
    raise ConfigError(_unknown_key_message(str(e), argv)) from None
  except OSError as e:
    raise ConfigError(' '.join(str(e).split())) from None
  if fv.config is None:
    raise ConfigError('--config is required (a config file, e.g. experiments/configs/quickstart.py)')
  if not isinstance(fv.config, ml_collections.ConfigDict):   # config_flags defers load errors to first use
    try:
      fv.config.keys()
    except OSError as e:
      reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
      raise ConfigError(f'--config={fv["config"].config_filename} could not be loaded: {reason}') from None
  if workdir_required and not config_from_workdir and not fv.workdir:
    raise ConfigError('--workdir is required')
  return fv


def _unknown_key_message(error: str, argv: Sequence[str]) -> str:
  key = (re.findall(r"'(\w+)", error) or ['?'])[0]
  flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and
               re.search(rf'\.{key}(=|$|\.)', a.split('=')[0])), key)
  hint = re.findall(r'Did you mean "(\w+)"', error)
  return f'unknown config key {flag}' + (f' (did you mean {hint[0]!r}?)' if hint else '')


def cli(main: Callable[[list[str]], None]) -> Callable[[], None]:
  """Run `main(argv)`, turning user errors into one line on stderr and a non-zero exit."""
  @functools.wraps(main)
  def run():
    try:
      main(sys.argv)
    except (ConfigError, DataError, models.InputError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    except TrainingStopped as e:
      print(f'stopped: {e}', file=sys.stderr)
      sys.exit(1)
  return run

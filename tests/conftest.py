import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['WANDB_MODE'] = 'disabled'
# One persistent XLA compilation cache for both xdist workers and every subprocess the tests start: the suite
# compiles the same tiny models' steps in many tests, and compiling dominates their time. A size bound turns
# on the cache's file lock, so concurrent writers are safe; entries are keyed by program, options and versions.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.pytest_cache' / 'jax-compilation'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 * 2 ** 30))
SHARED_DATA = ROOT.parent / 'shared' / 'data'


def _tiny_models() -> dict[str, dict]:
  import models
  return {name: models.model_class(name).presets['tiny'] for name in models.names()}


TINY_MODELS = _tiny_models()   # every registered model's test shape, from its registration


def tiny_config(model='transformer', **overrides):
  """A seconds-long run of a tiny model on the embedded stdlib corpus (experiments/configs/tiny.py, shorter)."""
  from experiments.configs import tiny
  c = tiny.get_config(model)
  c.train.update(steps=6, lr=3e-3, log_every=1, eval_every=1000)
  c.checkpoint.update(every=3, keep=5, async_save=False)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  """Tokenized corpora shared by every test (tokenizing is deterministic)."""
  return str(tmp_path_factory.mktemp('token_cache'))


@pytest.fixture
def make_config(cache_dir):
  def make(model='transformer', **overrides):
    return tiny_config(model, **{'data.cache_dir': cache_dir, **overrides})
  return make


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300):
  """Run `python -m module args` from the repository root; `env` values of None unset a variable."""
  full_env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'tests')]), **(env or {})}
  full_env = {k: v for k, v in full_env.items() if v is not None}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


# A config file per model with the same keys as `tiny_config(model)` (the overrides set every value).
BASE_CONFIG_FILES = {name: f'experiments/configs/tiny.py:{name}' for name in TINY_MODELS}


def assert_causal(model, params, tokens, vocab_size: int, t: int = 9, **apply_kwargs):
  """Changing tokens after position t changes no logit up to t, and does change later ones."""
  import jax
  import numpy as np
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens, **apply_kwargs)[0])   # one compile
  logits = forward(tokens)
  perturbed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % vocab_size)
  logits2 = forward(perturbed)
  np.testing.assert_allclose(logits[:, :t + 1], logits2[:, :t + 1], atol=1e-5)
  assert not np.allclose(logits[:, t + 1:], logits2[:, t + 1:], atol=1e-3)


def config_flags(config) -> list[str]:
  """A tiny config as command-line overrides of a config file for its model."""
  flat = []

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
      elif value is not None:   # unset (model.remat: the backend decides), as in the base file
        flat.append(f'--config.{prefix}{key}={value}')
  walk(config, '')
  return ['--config', BASE_CONFIG_FILES[config.model.name], *flat]

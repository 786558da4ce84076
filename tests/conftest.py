import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['WANDB_MODE'] = 'disabled'

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'


TINY_MODELS = {
    'transformer': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32),
    'grassmann': dict(d_model=32, num_layers=2, d_ff=64, max_len=32, rank=8, offsets=(1, 2, 4), dropout=0.0),
    'tokenformer': dict(d_model=32, num_layers=2, num_heads=2, n_attn=24, n_ffn=96, max_len=32),
    'lexinvariant': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32),
    'mor': dict(d_model=32, num_layers=5, num_recursions=3, num_heads=2, d_ff=64, max_len=32),
    'landmark': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, block_size=4, local_len=8, mem_blocks=4,
                     topk=2),
    'hat': dict(byte_width=32, byte_heads=2, byte_ff=64, encoder_layers=1, decoder_layers=1, d_model=32,
                num_layers=2, num_heads=2, d_ff=64, max_words=8, max_word_bytes=8),
    'byt5': dict(d_model=32, num_heads=2, d_ff=64, encoder_layers=3, decoder_layers=2, gate_layer=1, mean_span=3.0,
                 hard_buckets=4),
}
TINY_MODELS['mrt5'] = TINY_MODELS['byt5']
TINY_MODELS['llama'] = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32)
TINY_MODELS['recursive'] = TINY_MODELS['mor']


def tiny_config(model='transformer', **overrides):
  """A seconds-long run of a tiny model on the embedded stdlib corpus."""
  from train.config import default_config
  c = default_config(model)
  c.model.update(**TINY_MODELS[model])
  c.train.update(steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, log_every=1, eval_every=1000,
                 eval_batches=2)
  c.checkpoint.update(every=3, keep=5, async_save=False)
  c.mesh.update(data=1)
  c.wandb.mode = 'disabled'
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


# A config file per model with the same keys as `tiny_config(model)`: the overrides set every value.
BASE_CONFIG_FILES = {
    'transformer': 'experiments/configs/quickstart.py',
    'grassmann': 'experiments/configs/grassmann_wikitext2.py:tiny,grassmann,wordpiece',
    'tokenformer': 'experiments/configs/tokenformer_scaling.py:tiny,small',
    'lexinvariant': 'experiments/configs/lexinvariant.py:tiny,stdlib,char,random',
    'mor': 'experiments/configs/mor.py:tiny,mor3',
    'landmark': 'experiments/configs/landmark.py:tiny,landmark',
    'hat': 'experiments/configs/hat.py:tiny',
    'byt5': 'experiments/configs/mrt5.py:tiny,byt5',
    'mrt5': 'experiments/configs/mrt5.py:tiny,mrt5',
}


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

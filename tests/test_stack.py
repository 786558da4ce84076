"""The shared layer stack: the unrolled loop, remat policies and the scan over layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import stack


def build(**kw):
  cfg = models.default_config('transformer')
  cfg.update(vocab_size=50, d_model=32, num_layers=3, num_heads=4, d_ff=48, max_len=24, attention_impl='einsum', **kw)
  model = models.build(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 50)
  return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))['params'], tokens


def scanned_params(params, num_layers):
  """The unrolled stack's block_0 .. block_{L-1} stacked along a leading axis under `block`."""
  blocks = [params.pop(f'block_{i}') for i in range(num_layers)]
  return {**params, 'block': {'block': jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)}}


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_layers_compute_what_the_unrolled_layers_do(remat):
  """Same weights, stacked: the same logits and gradients, with the layers' axis named for sharding."""
  model, params, tokens = build()
  scanned = model.clone(scan_layers=True, remat=remat)
  stacked = scanned_params(dict(params), 3)
  boxed = models.abstract_variables(scanned)['params']
  assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(stacked)
  assert boxed['block']['block']['attention']['query']['kernel'].names == ('layers', 'embed', 'heads', 'kv')
  np.testing.assert_allclose(scanned.apply({'params': stacked}, tokens)[0], model.apply({'params': params}, tokens)[0],
                             atol=1e-5)
  loss = lambda m: jax.grad(lambda p: m.apply({'params': p}, tokens, train=True)[0].mean())
  grads = scanned_params(dict(loss(model)(params)), 3)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(loss(scanned)(stacked))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_decoding_keeps_a_cache_per_layer():
  from models import sampling
  model, params, tokens = build(scan_layers=True)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens))['params']
  full = model.apply({'params': params}, tokens)[0]
  step = sampling.decode_step_fn(model)
  logits, cache = step(params, sampling.init_cache(model, 2, 24), tokens[:, :6], jax.random.key(0))
  for t in range(6, 9):
    logits, cache = step(params, cache, tokens[:, t:t + 1], jax.random.key(0))
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5)


def test_blocks_with_per_layer_settings_cannot_be_scanned():
  cfg = models.default_config('grassmann')
  cfg.update(schedule='per_layer', offsets=(1, 2, 4, 8, 12, 16), scan_layers=True)
  with pytest.raises(ValueError, match='model.scan_layers'):
    models.build(cfg)


def test_unknown_remat_policy_names_the_key():
  with pytest.raises(ValueError, match="model.remat='some' must be one of none, full, dots, dots_no_batch"):
    stack.check_remat('some')


def test_a_scanned_model_trains_and_resumes_through_the_trainer(make_config, tmp_path):
  """The stacked parameters' `layers` axis has a sharding rule and checkpoints like any other."""
  from train import trainer
  config = make_config('transformer', **{'model.scan_layers': True, 'model.remat': 'full', 'train.steps': 4,
                                         'train.stop_at': 2})
  assert trainer.Trainer(config, str(tmp_path)).run()['stopped_at'] == 2
  with config.unlocked():
    config.train.stop_at = 0
  result = trainer.Trainer(config, str(tmp_path)).run()
  assert result['start_step'] == 2 and result['step'] == 4 and np.isfinite(result['loss'])

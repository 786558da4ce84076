import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_causal

import models
from models import sampling


def build(**kw):
  cfg = models.default_config('transformer')
  cfg.update(vocab_size=50, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_len=24, **kw)
  model = models.build(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 50)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))['params']
  return model, params, tokens


VARIANTS = [dict(prenorm=True, positions='learned'), dict(prenorm=False, positions='rope'),
            dict(prenorm=True, positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False, tied_embeddings=False)]


@pytest.mark.parametrize('kw', VARIANTS[1:])   # the default is in test_models.py
def test_shapes_and_causality_of_the_variants(kw):
  model, params, tokens = build(**kw)
  logits, aux = model.apply({'params': params}, tokens)
  assert logits.shape == (2, 24, 50) and aux == {}
  assert_causal(model, params, tokens, vocab_size=50, t=10)


def test_flops_per_token_close_to_compiler_count():
  """The analytic matmul count against XLA's own (which also counts elementwise work and the full,
  unmasked attention matrix): within a few percent at a shape where matmuls dominate."""
  cfg = models.default_config('transformer')
  cfg.update(vocab_size=512, d_model=256, num_layers=2, num_heads=4, d_ff=1024, max_len=64)
  model = models.build(cfg)
  tokens = jnp.zeros((4, 64), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))['params']
  xla = jax.jit(lambda p, x: model.apply({'params': p}, x)[0]).lower(params, tokens).compile().cost_analysis()
  xla_per_token = xla['flops'] / tokens.size
  full_attention_extra = 2 * 2 * 256 * 64 / 2 * 2   # the causal half XLA also counts, per layer
  assert 0.95 < (model.forward_flops_per_token(64) + full_attention_extra) / xla_per_token < 1.1
  assert model.flops_per_token(64) == 3 * model.forward_flops_per_token(64)


def test_cached_generation_of_post_ln_with_rope_equals_full_forward():
  model, params, tokens = build(**VARIANTS[1])
  prompt = np.asarray(tokens[0, :5])
  generated = model.generate(params, [prompt], 10, key=jax.random.key(0), sampling=sampling.Sampling(temperature=0))[0]
  # One full forward over prompt + generated: by causality, position i's logits are those of the prefix,
  # so greedy decoding without a cache would have chosen exactly the generated tokens.
  full = np.concatenate([prompt, generated])
  logits, _ = model.apply({'params': params}, jnp.asarray(full)[None])
  np.testing.assert_array_equal(generated, np.argmax(logits[0, 4:-1], axis=-1))
  cached_logits = sampling.decode_step_fn(model)(params, sampling.init_cache(model, 1, 15), jnp.asarray(full)[None],
                                               jax.random.key(0))[0]
  np.testing.assert_allclose(cached_logits[0], logits[0, -1], atol=1e-4)


def test_registry_rejects_unknown_names_and_keys():
  with pytest.raises(ValueError, match='not registered'):
    models.model_class('nope')
  cfg = models.default_config('transformer')
  cfg.bogus = 1
  with pytest.raises(ValueError, match='model.bogus'):
    models.build(cfg)
  cfg = models.default_config('transformer')
  cfg.num_heads = 3
  with pytest.raises(ValueError, match='num_heads'):
    models.build(cfg)


@pytest.mark.parametrize('policy', ['dots', 'dots_no_batch'])
def test_remat_policies_give_the_same_gradients(policy):
  model, params, tokens = build()
  loss = lambda m: jax.jit(jax.grad(lambda p: m.apply({'params': p}, tokens, train=True)[0].mean()))
  for a, b in zip(jax.tree.leaves(loss(model)(params)), jax.tree.leaves(loss(model.clone(remat=policy))(params))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_stays_close():
  model, params, tokens = build()
  bf16_model, _, _ = build(dtype='bfloat16')
  full, _ = model.apply({'params': params}, tokens)
  half, _ = bf16_model.apply({'params': params}, tokens)
  assert half.dtype == jnp.float32   # logits are returned in float32 for the loss
  np.testing.assert_allclose(half, full, atol=0.1)


def test_uncached_generation_agrees_with_the_cache_path():
  """The fallback for models without a decode cache (e.g. grassmann) samples the same tokens."""
  model, params, tokens = build(positions='rope')
  prompt = np.asarray(tokens[0, :4])
  for temperature in (0, 1.0):
    kwargs = dict(key=jax.random.key(3), sampling=sampling.Sampling(temperature=temperature, vocab_limit=45))
    cached = model.generate(params, [prompt], 8, **kwargs)[0]
    np.testing.assert_array_equal(cached, sampling.generate(model, params, [prompt], 8, cached=False, **kwargs)[0])
    assert cached.max() < 45

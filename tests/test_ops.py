"""Every named fast path against its naive reference, forward and backward: plain attention (masked,
causal, with a relative-position bias, grouped-query), Landmark's grouped softmax, Grassmann's Plücker
mixing (MoR's gathered top-k: test_mor.py). (Pattention has a single implementation, checked against its float64
definition in test_tokenformer.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODELS

import models
from models import layers


def assert_same_value_and_gradients(fast, reference, *args, atol=1e-5):
  """fast(*args) == reference(*args), and the gradients of a random projection of each, for every argument."""
  out = reference(*args)
  probe = jax.random.normal(jax.random.key(9), out.shape)
  np.testing.assert_allclose(fast(*args), out, atol=atol)
  grads = lambda f: jax.grad(lambda *a: (f(*a) * probe).sum(), argnums=tuple(range(len(args))))(*args)
  for g_fast, g_ref in zip(grads(fast), grads(reference)):
    np.testing.assert_allclose(g_fast, g_ref, atol=atol)


def qkv(batch=2, length=12, heads=2, dim=8):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, dim)) for k in keys)


@pytest.mark.parametrize('impl', [i for i in layers.ATTENTION_IMPLS if i not in ('reference', 'cudnn')])
@pytest.mark.parametrize('variant', ['causal', 'padding_mask', 'bias'])
def test_attention_implementations_equal_the_reference(impl, variant):
  q, k, v = qkv()
  causal = layers.causal_mask(jnp.arange(12)[None], jnp.arange(12)[None])
  kwargs = {'causal': dict(is_causal=True),
            'padding_mask': dict(mask=causal & (jnp.arange(12) < 9)[None, None, None, :]),
            'bias': dict(mask=causal, bias=jax.random.normal(jax.random.key(3), (1, 2, 12, 12)))}[variant]
  assert_same_value_and_gradients(
      lambda q, k, v: layers.dot_product_attention(q, k, v, impl=impl, **kwargs),
      lambda q, k, v: layers.dot_product_attention(q, k, v, impl='reference', **kwargs), q, k, v)


def test_splash_kernel_equals_the_reference():
  """The Pallas splash kernel, in its interpreter on CPU, with the blocks above the diagonal skipped, through
  the shard_map it runs in under a mesh (one device here; tests/test_aot.py compiles it for a 4-chip TPU
  slice)."""
  q, k, v = qkv(batch=1, length=384, heads=2, dim=32)   # tiles of 128: 3 x 3 blocks, 3 above the diagonal
  mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with layers.activation_sharding(mesh, (('batch', ('data', 'fsdp')), ('act_heads', 'tensor'))):
    assert_same_value_and_gradients(
        lambda q, k, v: layers.dot_product_attention(q, k, v, is_causal=True, impl='splash'),
        lambda q, k, v: layers.dot_product_attention(q, k, v, is_causal=True, impl='reference'), q, k, v, atol=2e-5)


def test_grouped_query_attention_layer_equals_its_reference_implementation():
  x = jax.random.normal(jax.random.key(0), (2, 12, 16))
  attention = lambda impl: layers.Attention(num_heads=4, head_dim=4, num_kv_heads=2, use_rope=True, causal=True,
                                            impl=impl)
  params = attention('einsum').init(jax.random.key(1), x)['params']
  apply = lambda impl: lambda params, x: attention(impl).apply({'params': params}, x)
  assert_same_value_and_gradients(lambda x: apply('einsum')(params, x), lambda x: apply('reference')(params, x), x)


def tiny(name, **overrides):
  config = models.default_config(name)
  config.update(vocab_size=40, **{**TINY_MODELS[name], **overrides})
  model = models.build(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 40)
  return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))['params'], tokens


@pytest.mark.parametrize('name,fast,reference', [
    ('landmark', dict(attention_impl='einsum'), dict(attention_impl='reference')),
    ('grassmann', dict(mixing_impl='shifted'), dict(mixing_impl='reference')),
])
def test_model_fast_paths_equal_their_references(name, fast, reference):
  """The whole model with the fast op and with its reference: the same logits and parameter gradients."""
  model, params, tokens = tiny(name, **fast)
  reference_model = model.clone(**reference)
  logits = lambda m: jax.jit(lambda p: m.apply({'params': p}, tokens)[0])
  np.testing.assert_allclose(logits(model)(params), logits(reference_model)(params), atol=1e-5)
  grads = lambda m: jax.jit(jax.grad(lambda p: m.apply({'params': p}, tokens)[0].std()))(params)
  for a, b in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(reference_model))):
    np.testing.assert_allclose(a, b, atol=1e-5)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def rand(key, *shape):
  return jax.random.normal(jax.random.key(key), shape)


def test_fused_attention_matches_reference_with_causal_and_padding_masks():
  q, k, v = rand(0, 2, 7, 3, 8), rand(1, 2, 7, 3, 8), rand(2, 2, 7, 3, 8)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  valid = jnp.array([[True] * 7, [True] * 5 + [False] * 2])
  mask = layers.causal_mask(pos, pos) & layers.padding_mask(valid, valid)
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v, mask=mask)[:, :5],
                             layers.reference_attention(q, k, v, mask=mask)[:, :5], atol=1e-5)


def test_causal_attention_layer_equals_the_explicit_causal_mask():
  x, pos = rand(0, 2, 7, 16), jnp.broadcast_to(jnp.arange(7), (2, 7))
  explicit = layers.Attention(num_heads=2, head_dim=8, use_rope=True)
  fused = layers.Attention(num_heads=2, head_dim=8, use_rope=True, causal=True)
  params = explicit.init(jax.random.key(1), x, mask=layers.causal_mask(pos, pos))
  np.testing.assert_allclose(fused.apply(params, x), explicit.apply(params, x, mask=layers.causal_mask(pos, pos)),
                             atol=1e-5)
  with pytest.raises(ValueError, match='no other mask'):
    fused.apply(params, x, mask=layers.causal_mask(pos, pos))


def test_token_dot_general_equals_the_plain_dot():
  x, w = rand(0, 2, 5, 3, 4), rand(1, 3, 4, 6)   # [batch, length, heads, head_dim] x [heads, head_dim, out]
  dims = (((2, 3), (0, 1)), ((), ()))
  np.testing.assert_allclose(layers.token_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims), atol=1e-5)
  dims = (((3,), (1,)), ((), ()))   # not a dense layer's layout: the plain dot
  np.testing.assert_allclose(layers.token_dot_general(x, rand(2, 6, 4), dims),
                             jax.lax.dot_general(x, rand(2, 6, 4), dims), atol=1e-5)


def test_reference_attention_is_softmax_weighted_average():
  q, k, v = rand(0, 1, 1, 1, 4), rand(1, 1, 3, 1, 4), rand(2, 1, 3, 1, 4)
  w = jax.nn.softmax(jnp.einsum('d,kd->k', q[0, 0, 0], k[0, :, 0]) / 2.0)
  np.testing.assert_allclose(layers.reference_attention(q, k, v)[0, 0, 0], w @ v[0, :, 0], atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
  q, k = rand(0, 1, 1, 1, 16), rand(1, 1, 1, 1, 16)
  def score(m, n):
    return jnp.sum(layers.rope(q, jnp.array([[m]])) * layers.rope(k, jnp.array([[n]])))
  assert score(5, 2) == pytest.approx(float(score(13, 10)), abs=1e-4)
  assert abs(float(score(5, 2)) - float(score(5, 4))) > 1e-3


def test_rope_fraction_rotates_only_leading_dims():
  x = rand(0, 1, 4, 2, 16)
  y = layers.rope(x, jnp.broadcast_to(jnp.arange(4), (1, 4)), fraction=0.25)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  assert not np.allclose(y[:, 1:, :, :4], x[:, 1:, :, :4])


def test_norms_normalise():
  x = rand(0, 3, 10) * 5 + 2
  ln, rms = layers.norm('layernorm'), layers.norm('rmsnorm')
  y = ln.apply(nn.meta.unbox(ln.init(jax.random.key(0), x)), x)
  np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
  z = rms.apply(nn.meta.unbox(rms.init(jax.random.key(0), x)), x)
  np.testing.assert_allclose(jnp.sqrt((z ** 2).mean(-1)), 1, atol=1e-3)


def test_swiglu_matches_its_equation():
  mlp = layers.Mlp(hidden=6, kind='swiglu', use_bias=False)
  x = rand(0, 2, 3, 4)
  p = nn.meta.unbox(mlp.init(jax.random.key(0), x))['params']
  expected = (nn.silu(x @ p['gate']['kernel']) * (x @ p['up']['kernel'])) @ p['down']['kernel']
  np.testing.assert_allclose(mlp.apply({'params': p}, x), expected, atol=1e-5)


def test_tied_readout_is_embedding_transpose():
  embed = layers.Embed(11, 4)
  v = nn.meta.unbox(embed.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  x = rand(1, 1, 2, 4)
  np.testing.assert_allclose(embed.apply(v, x, method='attend'), x @ v['params']['embedding'].T, atol=1e-6)


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
  x = rand(0, 2, 5, 16)
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = layers.causal_mask(pos, pos)
  gqa = layers.Attention(num_heads=4, head_dim=4, num_kv_heads=2)
  mha = layers.Attention(num_heads=4, head_dim=4)
  p = nn.meta.unbox(gqa.init(jax.random.key(0), x, mask=mask))['params']
  repeat = lambda t, axis: jnp.repeat(t, 2, axis=axis)
  p_mha = {**p, 'key': {'kernel': repeat(p['key']['kernel'], 1), 'bias': repeat(p['key']['bias'], 0)},
           'value': {'kernel': repeat(p['value']['kernel'], 1), 'bias': repeat(p['value']['bias'], 0)}}
  np.testing.assert_allclose(gqa.apply({'params': p}, x, mask=mask), mha.apply({'params': p_mha}, x, mask=mask),
                             atol=1e-5)


@pytest.mark.parametrize('use_rope', [False, True])
def test_kv_cache_decoding_equals_full_causal_attention(use_rope):
  attn = layers.Attention(num_heads=2, head_dim=4, use_rope=use_rope)
  x = rand(0, 1, 6, 8)
  pos = jnp.broadcast_to(jnp.arange(6), (1, 6))
  p = nn.meta.unbox(attn.init(jax.random.key(1), x, mask=layers.causal_mask(pos, pos)))['params']
  full = attn.apply({'params': p}, x, mask=layers.causal_mask(pos, pos))
  cache = attn.init(jax.random.key(1), x, decode=True)['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)
  outs = []
  for chunk in (x[:, :3], x[:, 3:4], x[:, 4:5], x[:, 5:6]):   # a prompt, then one token at a time
    out, vars_ = attn.apply({'params': p, 'cache': cache}, chunk, decode=True, mutable=['cache'])
    cache = vars_['cache']
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)

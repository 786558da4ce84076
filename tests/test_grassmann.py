import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_causal

import models
from models import grassmann


def build(**kw):
  cfg = models.default_config('grassmann')
  cfg.update(**{**dict(vocab_size=50, d_model=32, num_layers=2, d_ff=48, rank=6, max_len=24), **kw})
  model = models.build(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 50)
  return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))['params'], tokens


@pytest.mark.parametrize('kw', [dict(prenorm=True), dict(offsets=(1, 3), schedule='per_layer')])   # default: test_models
def test_causality_of_the_variants(kw):
  assert_causal(*build(**kw), vocab_size=50)


def test_plucker_is_antisymmetric_and_vanishes_on_a_line():
  u, v = jax.random.normal(jax.random.key(0), (2, 7))
  np.testing.assert_allclose(grassmann.plucker(u, v), -grassmann.plucker(v, u), atol=1e-6)
  np.testing.assert_allclose(grassmann.plucker(u, u), 0, atol=1e-6)
  np.testing.assert_allclose(grassmann.plucker(u, 3 * u), 0, atol=1e-5)
  i, j = np.triu_indices(7, k=1)
  np.testing.assert_allclose(grassmann.plucker(u, v), u[i] * v[j] - u[j] * v[i], atol=1e-6)


def naive_mean_plucker(z, offsets, eps):
  """Per position, per offset, per coordinate pair, with Python loops: the reference."""
  z = np.asarray(z, np.float64)
  batch, length, r = z.shape
  out = np.zeros((batch, length, r * (r - 1) // 2))
  for b, t in itertools.product(range(batch), range(length)):
    feats = []
    for offset in offsets:
      if t - offset < 0:
        continue
      u, v = z[b, t], z[b, t - offset]
      p = np.array([u[i] * v[j] - u[j] * v[i] for i in range(r) for j in range(i + 1, r)])
      feats.append(p / max(np.linalg.norm(p), eps))
    if feats:
      out[b, t] = np.mean(feats, axis=0)
  return out


def test_vectorised_mixing_matches_naive_reference():
  z = jax.random.normal(jax.random.key(0), (2, 11, 5))
  fast, count = grassmann.mean_plucker(z, (1, 2, 4, 16), 1e-6)
  np.testing.assert_allclose(fast, naive_mean_plucker(z, (1, 2, 4, 16), 1e-6), atol=1e-5)
  np.testing.assert_array_equal(count, [0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3])


def test_averaging_then_projecting_equals_projecting_then_averaging():
  z = jax.random.normal(jax.random.key(0), (1, 9, 5))
  w, b = jax.random.normal(jax.random.key(1), (10, 4)), jax.random.normal(jax.random.key(2), (4,))
  mean_first = grassmann.mean_plucker(z, (1, 3), 1e-6)[0] @ w + b
  per_offset = []
  for t in range(9):
    gs = [grassmann.mean_plucker(z, (o,), 1e-6)[0][0, t] @ w + b for o in (1, 3) if t >= o]
    per_offset.append(np.mean(gs, axis=0) if gs else np.zeros(4))
  np.testing.assert_allclose(mean_first[0, 1:], np.stack(per_offset)[1:], atol=1e-5)


def grassmann_params(v, d, layers, ff, r, max_len):
  c = r * (r - 1) // 2
  mixing = (d * r + r) + (c * d + d) + (2 * d * d + d) + 2 * d
  ffn = (d * ff + ff) + (ff * d + d) + 2 * d
  return v * d + max_len * d + layers * (mixing + ffn) + 2 * d


def transformer_params(v, d, layers, ff, max_len):
  return v * d + max_len * d + layers * (4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d) + 2 * d


@pytest.mark.parametrize('layers, length, offsets, schedule, expected_grassmann, expected_transformer', [
    (6, 128, grassmann.PAPER_OFFSETS, 'all', 12_607_168, 12_585_472),
    (12, 256, grassmann.PAPER_12_LAYER_SCHEDULE, 'per_layer', 17_400_192, 17_356_800),
])
def test_paper_shapes_parameter_counts(layers, length, offsets, schedule, expected_grassmann, expected_transformer):
  g = models.default_config('grassmann')
  g.update(vocab_size=30522, num_layers=layers, max_len=length, offsets=offsets, schedule=schedule)
  t = models.default_config('transformer')
  t.update(vocab_size=30522, d_model=256, num_layers=layers, num_heads=4, d_ff=1024, max_len=length, prenorm=False)
  assert models.param_counts(models.build(g))['params'] == grassmann_params(30522, 256, layers, 1024, 32, length) \
      == expected_grassmann
  assert models.param_counts(models.build(t))['params'] == transformer_params(30522, 256, layers, 1024, length) \
      == expected_transformer


def test_no_length_by_length_tensor_and_flat_flops_per_token():
  model, params, _ = build(max_len=256)
  tokens = jnp.zeros((1, 256), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, tokens))(params)
  shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
  assert not [s for s in shapes if sum(dim == 256 for dim in s) >= 2]
  assert model.forward_flops_per_token(256) == model.forward_flops_per_token(8192)


def test_schedule_validation():
  with pytest.raises(ValueError, match='one offset per layer'):
    build(offsets=(1, 2, 4), schedule='per_layer')
  with pytest.raises(ValueError, match='must be positive'):
    build(offsets=(0, 1))


def test_pair_head_learns_a_synthetic_pair_task():
  """Label 1 when the hypothesis is a shuffled, slightly noisy copy of the premise's token features,
  0 when it is unrelated. Two padded positions hold junk that the masks must hide."""
  def make(key, n, length=6, dim=8):
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    premise = jax.random.normal(k1, (n, length, dim))
    copy = jax.random.permutation(k2, premise, axis=1, independent=True) + 0.1 * jax.random.normal(k3, premise.shape)
    labels = jax.random.bernoulli(k4, 0.5, (n,)).astype(jnp.int32)
    hypothesis = jnp.where(labels[:, None, None] == 1, copy, jax.random.normal(k5, premise.shape))
    junk = 5 * jax.random.normal(k6, (2, n, 2, dim))
    pad = lambda x, j: jnp.concatenate([x, j], axis=1)
    mask = jnp.arange(length + 2)[None].repeat(n, 0) < length
    return pad(premise, junk[0]), mask, pad(hypothesis, junk[1]), mask, labels

  head = grassmann.GrassmannPairHead(num_classes=2, d_model=16, d_proj=8, window=4, num_layers=1, num_heads=2,
                                     d_ff=32, dropout=0.0)
  train_data, test_data = make(jax.random.key(0), 512), make(jax.random.key(1), 256)
  params = nn.meta.unbox(head.init(jax.random.key(2), *train_data[:4]))['params']
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = head.apply({'params': p}, *train_data[:4])
      return optax.softmax_cross_entropy_with_integer_labels(logits, train_data[4]).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(150):
    params, opt_state = step(params, opt_state)
  accuracy = (head.apply({'params': params}, *test_data[:4]).argmax(-1) == test_data[4]).mean()
  assert accuracy > 0.9


def test_gradients_are_finite_where_positions_have_no_partner():
  """Position 0 has no partner (p = 0): the normalisation's gradient there must not be NaN."""
  model, params, tokens = build()
  grads = jax.jit(jax.grad(lambda p: model.apply({'params': p}, tokens)[0].mean()))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('kw', [dict(), dict(schedule='per_layer', offsets=(1, 3), num_layers=2, prenorm=True)])
def test_decode_cache_is_the_last_offsets_and_equals_the_full_forward(kw):
  """The cache holds max(offsets) reduced vectors per layer whatever the length (O(1) work a token), and
  feeding a prompt chunk then one token at a time gives the full forward's logits."""
  from models import sampling
  model, params, tokens = build(**kw)
  shapes = lambda length: jax.tree.map(lambda x: x.shape, sampling.init_cache(model, 2, length))
  assert shapes(8) == shapes(24)
  histories = [x.shape for path, x in jax.tree_util.tree_leaves_with_path(sampling.init_cache(model, 2, 8))
               if 'history' in str(path)]
  assert histories == [(2, max(model.layer_offsets(i)), model.rank) for i in range(model.num_layers)]
  full = model.apply({'params': params}, tokens)[0]
  step, cache = sampling.decode_step_fn(model), sampling.init_cache(model, tokens.shape[0], tokens.shape[1])
  logits, cache = step(params, cache, tokens[:, :3], jax.random.key(0))
  np.testing.assert_allclose(logits, full[:, 2], atol=1e-5)
  for t in range(3, tokens.shape[1]):
    logits, cache = step(params, cache, tokens[:, t:t + 1], jax.random.key(0))
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, err_msg=f'position {t}')

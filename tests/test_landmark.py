"""Landmark attention: grouped softmax against its naive reference, loss masking, cached inference."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODELS, assert_causal, run_module

import models
from models import landmark, layers, sampling
from train import trainer

BLOCK = 4
# Jitted once per shape: eager mode would compile every small op separately.
grouped = jax.jit(landmark.grouped_attention, static_argnums=5)




def naive(q, k, v, is_landmark, q_index, kv_valid):
  reference = lambda q, k, v: landmark.reference_grouped_attention(q, k, v, np.asarray(is_landmark),
                                                                   jnp.asarray(q_index), jnp.asarray(kv_valid))
  return jax.jit(reference)(q, k, v)


def init(model, tokens):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)['params'])


def forward(model, params, tokens):
  return jax.jit(lambda p, t: model.apply({'params': p}, t)[0])(params, tokens)


def tiny_model(**overrides):
  config = models.default_config('landmark')
  config.update(vocab_size=40, **TINY_MODELS['landmark'])
  config.update(**overrides)
  return models.build(config)


def random_qkv(n_queries, n_keys, heads=2, dim=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (2, n_queries, heads, dim)),
          jax.random.normal(keys[1], (2, n_keys, heads, dim)),
          jax.random.normal(keys[2], (2, n_keys, heads, dim)))


@pytest.mark.parametrize('n_before,length,n_valid', [(0, 23, 23), (7, 10, 6), (4, 1, 1)])
def test_fast_grouped_softmax_equals_naive_reference(n_before, length, n_valid):
  """The layouts of training (a window from position 0) and of cached chunks (a carried partial block,
  a partly padded chunk): the block-reshape path equals the per-group definition."""
  token_slots, landmark_slots, carry = landmark.chunk_layout(n_before, length, BLOCK)
  window = (len(landmark_slots) + 1) * (BLOCK + 1)
  slots = np.concatenate([token_slots, landmark_slots])
  entry_valid = np.concatenate([np.arange(length) < n_valid,
                                (np.arange(len(landmark_slots)) + 1) * BLOCK <= carry + n_valid])
  kv_valid = np.zeros(window, bool)
  kv_valid[:carry] = True                     # carried keys of the current block
  kv_valid[slots[entry_valid]] = True
  q, k, v = random_qkv(len(slots), window)
  fast = grouped(q, k, v, jnp.asarray(slots), jnp.broadcast_to(kv_valid, (2, window)), BLOCK + 1)
  is_landmark = np.arange(window) % (BLOCK + 1) == BLOCK
  expected = naive(q, k, v, is_landmark, slots, kv_valid)
  np.testing.assert_allclose(fast[:, entry_valid], expected[:, entry_valid], atol=1e-5)
  # The weights of every query sum to one: with all values 1 each output is exactly 1.
  ones = jnp.ones_like(v)
  summed = grouped(q, k, ones, jnp.asarray(slots), jnp.broadcast_to(kv_valid, (2, window)),
                                      BLOCK + 1)
  np.testing.assert_allclose(summed[:, entry_valid], 1.0, atol=1e-5)


def test_retrieved_blocks_are_gated_groups_and_weights_sum_to_one():
  """Retrieved memory blocks enter like earlier blocks of the window: a query attending one retrieved
  block equals the naive softmax over [that block | window] with the block in front."""
  token_slots, landmark_slots, _ = landmark.chunk_layout(0, 7, BLOCK)
  slots = jnp.concatenate([token_slots, landmark_slots])
  window = (len(landmark_slots) + 1) * (BLOCK + 1)
  kv_valid = np.zeros(window, bool)
  kv_valid[np.asarray(slots)] = True
  q, k, v = random_qkv(len(slots), window + BLOCK + 1)
  k_mem, v_mem = k[:, :BLOCK + 1], v[:, :BLOCK + 1]
  as_retrieved = lambda t: jnp.broadcast_to(jnp.moveaxis(t, 2, 1)[:, :, None, None],
                                            (2, 2, len(slots), 1, BLOCK + 1, t.shape[-1]))
  retrieved = (as_retrieved(k_mem), as_retrieved(v_mem), jnp.ones((2, 2, len(slots), 1), bool))
  fast = grouped(q, k[:, BLOCK + 1:], v[:, BLOCK + 1:], slots,
                                    jnp.broadcast_to(kv_valid, (2, window)), BLOCK + 1, retrieved)
  is_landmark = np.arange(window + BLOCK + 1) % (BLOCK + 1) == BLOCK
  expected = naive(q, k, v, is_landmark, slots + BLOCK + 1, np.concatenate([np.ones(BLOCK + 1, bool), kv_valid]))
  np.testing.assert_allclose(fast, expected, atol=1e-5)
  ones = grouped(q, k[:, BLOCK + 1:], jnp.ones_like(v[:, BLOCK + 1:]), slots,
                                    jnp.broadcast_to(kv_valid, (2, window)), BLOCK + 1,
                                    (retrieved[0], jnp.ones_like(retrieved[1]), retrieved[2]))
  np.testing.assert_allclose(ones, 1.0, atol=1e-5)


def test_single_block_is_causal_attention():
  q, k, v = random_qkv(BLOCK, BLOCK + 1)
  k, v = k.at[:, BLOCK].set(0), v.at[:, BLOCK].set(0)
  out = grouped(q, k, v, jnp.arange(BLOCK), jnp.ones((2, BLOCK + 1), bool).at[:, BLOCK].set(False),
                                   BLOCK + 1)
  positions = np.arange(BLOCK)[None]
  expected = jax.jit(layers.reference_attention)(q, k[:, :BLOCK], v[:, :BLOCK],
                                                 np.asarray(layers.causal_mask(positions, positions)))
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_stingy_slots_leave_one_empty_slot_between_far_and_recent():
  place = lambda ages, completed, topk=2: landmark.stingy_slots(
      jnp.asarray(ages), jnp.asarray([a >= 0 for a in ages]), completed, topk).tolist()
  assert place([3, 9], 10) == [0, 2]      # far block left, the newest block right before the chunk
  assert place([8, 9], 10) == [1, 2]      # both recent: their true relative positions
  assert place([2, 5], 10) == [0, 1]      # both far: the slot next to the chunk stays empty
  assert place([0, -1], 1)[:1] == [0]     # fewer blocks than k: true positions


def reference_choice(q, ring_landmark_keys, completed, query_valid, *, mode, topk, mem_blocks, block_len):
  """The blocks retrieval picks, written per query from the definition: [b, h, q] -> set of block ages.

  q [b, q, h, d] rotated; ring_landmark_keys [b, ring, h, d] unrotated. Candidates: the last mem_blocks
  complete blocks still in the ring. Scoring slots: the latest k at their own slots, older ones at slot 0.
  'head' takes each block's best softmax weight over the valid queries, 'token' over the heads; equal
  scores go to the most recent block."""
  q, keys = np.asarray(q, np.float64), np.asarray(ring_landmark_keys)
  batch, n_queries, heads, dim = q.shape
  ring = keys.shape[1]
  age_of = {segment: completed - 1 - (completed - 1 - segment) % ring for segment in range(ring)}
  n_slots = min(completed, topk + 1)
  blocks = sorted((a for a in age_of.values() if a >= max(0, completed - mem_blocks)), reverse=True)
  segment_of = {a: s for s, a in age_of.items()}
  slot = lambda a: n_slots - (completed - a) if a >= completed - topk else 0
  scores = np.zeros((batch, heads, n_queries, len(blocks)))
  for j, a in enumerate(blocks):
    rotated = np.asarray(layers.rope(keys[:, segment_of[a]][:, None], np.full((batch, 1), slot(a) * block_len
                                                                               + block_len - 1)))[:, 0]
    scores[..., j] = np.einsum('bqhd,bhd->bhq', q, rotated) / np.sqrt(dim)
  if mode != 'token_and_head':
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if mode == 'head':
      scores = np.broadcast_to(probs[:, :, query_valid].max(2, keepdims=True), scores.shape)
    else:
      scores = np.broadcast_to(probs.max(1, keepdims=True), scores.shape)
  # np.argsort(stable) over blocks listed newest first: a tie keeps the newer block
  picks = np.argsort(-scores, axis=-1, kind='stable')[..., :topk]
  return np.vectorize(lambda i: blocks[i])(picks)


@pytest.mark.parametrize('mode', landmark.RETRIEVAL)
@pytest.mark.parametrize('completed,tied', [(9, False), (9, True), (3, False)])
def test_retrieval_picks_the_reference_blocks(mode, completed, tied):
  """More blocks cached than retrieved (k=2 of up to 5), an evicted ring (9 blocks through 7 segments), a
  partial chunk (padding and an incomplete block's landmark among the queries) and, with `tied`, the
  layer-0 case of identical older landmark keys: the blocks picked are the reference's, and the invalid
  queries have no say in them."""
  topk, mem_blocks, ring, heads, dim, n_queries = 2, 5, 7, 2, 8, 6
  attention = landmark.LandmarkAttention(num_heads=heads, head_dim=dim, block_size=BLOCK, topk=topk,
                                         mem_blocks=mem_blocks, retrieval=mode)
  keys = jax.random.split(jax.random.key(completed + tied), 3)
  q = 3 * jax.random.normal(keys[0], (2, n_queries, heads, dim))
  ring_k = jax.random.normal(keys[1], (2, ring, BLOCK + 1, heads, dim))
  if tied:   # every segment holds the same landmark key
    ring_k = ring_k.at[:, :, -1].set(ring_k[:, :1, -1])
  ages = np.array([completed - 1 - (completed - 1 - s) % ring for s in range(ring)])
  ring_v = jnp.broadcast_to(jnp.asarray(ages, jnp.float32)[None, :, None, None, None], ring_k.shape)
  query_valid = np.array([True, True, True, False, True, False])
  retrieve = jax.jit(lambda q: attention._retrieve(q, ring_k, ring_v, completed, jnp.asarray(query_valid)))
  _, v_sel, valid = retrieve(q)
  picked = np.where(valid, np.asarray(v_sel[..., 0, 0]), -1).astype(int)      # [b, h, q, k] block ages
  expected = reference_choice(q, ring_k[:, :, -1], completed, query_valid, mode=mode, topk=topk,
                              mem_blocks=mem_blocks, block_len=BLOCK + 1)
  expected = np.where(expected >= 0, expected, -1)
  picked_sets = np.sort(picked, -1)[:, :, query_valid]
  np.testing.assert_array_equal(picked_sets, np.sort(expected, -1)[:, :, query_valid])
  # What the padding and the incomplete landmark hold does not move the valid queries' choice.
  noise = 10 * jax.random.normal(keys[2], q.shape)
  _, v_moved, _ = retrieve(jnp.where(query_valid[None, :, None, None], q, noise))
  np.testing.assert_array_equal(np.asarray(v_moved)[:, :, query_valid], np.asarray(v_sel)[:, :, query_valid])


def test_landmarks_are_never_scored_and_gate_later_blocks():
  """One logit per regular token (landmark outputs are dropped before the readout, whose vocabulary
  has no landmark id); a block's landmark influences later blocks only."""
  model = tiny_model()
  tokens = jax.random.randint(jax.random.key(1), (2, 3 * BLOCK + 2), 0, 40)
  params = init(model, tokens)
  logits = forward(model, params, tokens)
  assert logits.shape == (2, tokens.shape[1], 40)
  moved = {**params, 'stack': {**params['stack'], 'landmark': jax.random.normal(jax.random.key(2), (32,))}}
  logits2 = forward(model, moved, tokens)
  np.testing.assert_allclose(logits[:, :BLOCK], logits2[:, :BLOCK], atol=1e-6)
  assert np.abs(logits[:, BLOCK:] - logits2[:, BLOCK:]).max() > 1e-4   # small weights at init: small effect


@pytest.mark.parametrize('inference', ['full', 'cached'])
def test_causal(inference):
  model = tiny_model(inference=inference, topk=1, mem_blocks=2)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 40)
  params = init(model, tokens)
  assert_causal(model, params, tokens, 40)


def test_cached_chunks_and_decoding_equal_the_full_forward_at_training_length():
  """With k covering every cached block, retrieval (per token and head, per head, per token) picks them
  all at their true positions: chunked inference, and decoding a prompt then one token at a time (a
  carried partial block), equal the full pass."""
  kwargs = dict(local_len=2 * BLOCK, mem_blocks=6, topk=6)
  model = tiny_model(**kwargs)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 40)
  params = init(model, tokens)
  full = forward(model, params, tokens)
  for retrieval in landmark.RETRIEVAL:
    cached = forward(tiny_model(inference='cached', retrieval=retrieval, **kwargs), params, tokens)
    np.testing.assert_allclose(cached, full, atol=1e-5, err_msg=retrieval)
  cached_model = tiny_model(inference='cached', **kwargs)
  step = sampling.decode_step_fn(cached_model)
  logits, cache = step(params, sampling.init_cache(cached_model, 2, 24), tokens[:, :5], jax.random.key(0))
  decoded = [logits]
  for t in range(5, 24):
    logits, cache = step(params, cache, tokens[:, t:t + 1], jax.random.key(0))
    decoded.append(logits)
  np.testing.assert_allclose(jnp.stack(decoded, 1), full[:, 4:], atol=1e-5)


def test_memory_is_bounded_and_retrieval_limits_what_is_read():
  """The decode cache has the same size for any length; with fewer retrieved than cached blocks the
  long-range context changes (retrieval is not a no-op) while logits stay finite."""
  model = tiny_model(inference='cached', local_len=2 * BLOCK, mem_blocks=3, topk=1)
  shapes = lambda n: [x.shape for x in jax.tree.leaves(sampling.init_cache(model, 1, n))]
  assert shapes(64) == shapes(4096)
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 40)
  params = init(model, tokens)
  limited = forward(model, params, tokens)
  full = forward(tiny_model(), params, tokens)
  assert np.isfinite(limited).all()
  np.testing.assert_allclose(limited[:, :2 * BLOCK], full[:, :2 * BLOCK], atol=1e-5)   # first chunk: no memory
  assert not np.allclose(limited[:, -BLOCK:], full[:, -BLOCK:], atol=1e-3)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match='model.topk'):
    tiny_model(topk=5, mem_blocks=2)
  with pytest.raises(ValueError, match='model.inference'):
    tiny_model(landmarks=False, inference='cached')


def test_cli_trains_evaluates_beyond_training_length_and_samples(make_config, tmp_path):
  config = make_config('landmark')
  workdir = str(tmp_path / 'run')
  assert trainer.Trainer(config, workdir).run()['step'] == config.train.steps
  long_eval = ['--config.train.seq_len=96', '--config.train.batch_size=2', '--config.model.inference=cached',
               '--config.model.local_len=8', '--config.model.mem_blocks=4', '--config.model.topk=2']
  out = run_module('train.evaluate', '--workdir', workdir, '--max_batches', '2', *long_eval)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert np.isfinite(result['bpb']) and result['tokens'] == 2 * 2 * 96
  out = run_module('train.sample', '--workdir', workdir, '--prompt', 'def ', '--max_new_tokens', '60',
                   '--config.model.local_len=8', '--config.model.mem_blocks=4')
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('def ') and len(out.stdout) > 30

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_causal, run_module

import models
from models import layers, lexinvariant, sampling
from train import setup as setup_lib, trainer

RNGS = {'lexinvariant': jax.random.key(5)}


def build(**kw):
  cfg = models.default_config('lexinvariant')
  # A non-zero embedding scale, so that the tables reach the residual stream from the start.
  cfg.update(**{**dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=24, embed_scale_init=1.0),
                **kw})
  model = models.build(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 50)
  params = nn.meta.unbox(jax.jit(model.init)({'params': jax.random.key(1), **RNGS}, tokens))['params']
  return model, params, tokens


def nll(model, params, tokens, **kw):
  logits, _ = model.apply({'params': params}, tokens[:, :-1], **kw)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]


def test_permuting_the_vocabulary_leaves_the_loss_unchanged():
  model, params, tokens = build()
  tables = lexinvariant.random_tables(jax.random.key(2), 2, 50, 32)
  perm = jax.random.permutation(jax.random.key(3), 50)
  # π(x) read through table E is x read through E∘π: the same loss for every token, given the key.
  np.testing.assert_allclose(nll(model, params, perm[tokens], tables=tables),
                             nll(model, params, tokens, tables=tables[:, perm]), atol=1e-4)
  # The key decides the tables: the same key gives the same losses, another key other losses.
  np.testing.assert_array_equal(nll(model, params, tokens, rngs=RNGS), nll(model, params, tokens, rngs=RNGS))
  assert not np.allclose(nll(model, params, tokens, rngs=RNGS),
                         nll(model, params, tokens, rngs={'lexinvariant': jax.random.key(6)}), atol=1e-3)
  # A standard model with learned embeddings is not invariant.
  std, std_params, _ = build(embedding='learned')
  assert not np.allclose(nll(std, std_params, perm[tokens]), nll(std, std_params, tokens), atol=1e-3)


def test_same_token_same_vector_within_a_sequence_and_not_across():
  model, params, _ = build()
  tokens = jnp.array([[3, 7, 3, 9, 7, 3], [3, 7, 3, 9, 7, 3]])
  _, state = model.apply({'params': params}, tokens, rngs=RNGS, mutable=['intermediates'])
  emb = state['intermediates']['embeddings'][0]
  np.testing.assert_array_equal(emb[0, 0], emb[0, 2])
  np.testing.assert_array_equal(emb[0, 1], emb[0, 4])
  assert not np.allclose(emb[0, 0], emb[0, 1])
  assert not np.allclose(emb[0], emb[1])   # the same sequence twice in a batch: two tables


@pytest.mark.parametrize('kw', [dict(embedding='learned'), dict(embed_affine='scalar')])   # default: test_models
def test_causality_of_the_variants(kw):
  assert_causal(*build(**kw), vocab_size=50, rngs=RNGS)


def test_permuted_tokens_of_the_regularised_variant():
  tokens = jax.random.randint(jax.random.key(0), (64, 200), 0, 50)
  draw = lambda prob: lexinvariant.draw_permutations(jax.random.key(1), 64, 200, 50, prob)
  np.testing.assert_array_equal(lexinvariant.permute_tokens(tokens, *draw(0.0)), tokens)
  full = lexinvariant.permute_tokens(tokens, *draw(1.0))
  for row, image in zip(np.asarray(tokens), np.asarray(full)):   # one bijection per sequence
    mapping = dict(zip(row, image))
    assert all(mapping[a] == b for a, b in zip(row, image)) and len(set(mapping.values())) == len(mapping)
  partial = lexinvariant.permute_tokens(tokens, *draw(0.2))
  changed = float(jnp.mean(partial != tokens))
  assert 0.15 < changed < 0.2   # p, less the tokens a permutation maps to themselves (1/50)
  # Only in training: evaluation sees the true tokens.
  model, params, tokens = build(embedding='learned', permute_prob=0.2)
  np.testing.assert_array_equal(model.apply({'params': params}, tokens, rngs=RNGS)[0],
                                model.apply({'params': params}, tokens, rngs={'lexinvariant': jax.random.key(9)})[0])


def lm_nll(logits, targets):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def test_regularised_variant_is_a_normal_lm_on_the_permuted_sequence():
  """App. G: with p = 1 every token of the window, targets included, becomes π(token). Over two symbols π
  is the identity or the swap, so each row's training NLL (scored at the batch's targets, as the trainer
  does) is the standard model's NLL on the window or on its swap."""
  model, params, _ = build(vocab_size=2, embedding='learned', permute_prob=1.0)
  window = jax.random.randint(jax.random.key(4), (8, 25), 0, 2)
  inputs, targets = window[:, :-1], window[:, 1:]
  trained = lm_nll(model.apply({'params': params}, inputs, train=True, rngs=RNGS)[0], targets)
  plain = lm_nll(model.apply({'params': params}, inputs)[0], targets)
  swapped = lm_nll(model.apply({'params': params}, 1 - inputs)[0], 1 - targets)
  assert not np.allclose(plain, swapped, atol=1e-3)
  is_swap = [not np.allclose(t, p, atol=1e-5) for t, p in zip(trained, plain)]
  assert 0 < sum(is_swap) < len(is_swap)   # both permutations occur in this batch
  np.testing.assert_allclose(trained, np.where(np.array(is_swap)[:, None], swapped, plain), atol=1e-5)


def test_regularised_variant_replaces_a_target_with_the_next_inputs_coin(monkeypatch):
  """At p < 1 the target of position t is replaced exactly when input t + 1 is: the permuted window."""
  model, params, _ = build(embedding='learned', permute_prob=0.5)
  window = jax.random.randint(jax.random.key(4), (2, 25), 0, 50)
  perms = jnp.stack([jax.random.permutation(jax.random.key(i), 50) for i in (7, 8)])
  replaced = jax.random.bernoulli(jax.random.key(9), 0.5, window.shape)
  monkeypatch.setattr(lexinvariant, 'draw_permutations', lambda key, batch, positions, vocab, prob: (perms, replaced))
  permuted = lexinvariant.permute_tokens(window, perms, replaced)
  trained = lm_nll(model.apply({'params': params}, window[:, :-1], train=True, rngs=RNGS)[0], window[:, 1:])
  expected = lm_nll(model.apply({'params': params}, permuted[:, :-1])[0], permuted[:, 1:])
  np.testing.assert_allclose(trained, expected, atol=1e-5)


def naive_bucket(relative, bidirectional, num_buckets, max_distance):
  n, bucket = -relative, 0
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  exact = num_buckets // 2
  if n < exact:
    return bucket + n
  large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [False, True])
def test_relative_position_buckets_follow_t5(bidirectional):
  relative = np.arange(-300, 300)
  got = layers.relative_position_bucket(jnp.asarray(relative), bidirectional=bidirectional, num_buckets=32,
                                        max_distance=128)
  np.testing.assert_array_equal(got, [naive_bucket(r, bidirectional, 32, 128) for r in relative])


def test_cached_generation_equals_full_forward():
  model, params, tokens = build()
  prompt, key = np.asarray(tokens[0, :5]), jax.random.key(0)
  greedy = sampling.Sampling(temperature=0)
  generated = model.generate(params, [prompt], 10, key=key, sampling=greedy)[0]
  full = np.concatenate([prompt, generated])
  rngs = model.stream_keys(sampling.stream_key(key))   # the table the generation used
  logits, _ = model.apply({'params': params}, jnp.asarray(full)[None], rngs=rngs)
  np.testing.assert_array_equal(generated, np.argmax(logits[0, 4:-1], axis=-1))
  np.testing.assert_array_equal(generated, sampling.generate(model, params, [prompt], 10, key=key, sampling=greedy,
                                                            cached=False)[0])


def test_trains_and_evaluates_over_several_tables(make_config, tmp_path):
  config = make_config('lexinvariant', **{'train.steps': 3})
  trainer.Trainer(config, str(tmp_path)).run()
  out = run_module('train.evaluate', '--workdir', str(tmp_path), '--max_batches', '2', '--draws', '3',
                   '--per_position')
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['draws'] == 3 and result['loss_std'] > 0   # each draw is another set of tables
  assert len(result['nll_by_position']) == config.train.seq_len
  assert np.mean(result['nll_by_position']) == pytest.approx(result['loss'], rel=1e-3)   # full windows
  out = run_module('train.sample', '--workdir', str(tmp_path), '--prompt', 'def ', '--max_new_tokens', '5')
  assert out.returncode == 0 and out.stdout.startswith('def '), out.stderr


def test_evaluation_draws_fresh_tables_for_every_batch_reproducibly(make_config, tmp_path):
  """Each evaluation batch gets its own key of the model's streams (so its own tables), a fixed function of
  (seed, draw, batch index): two batches see different tables, two evaluations the same ones."""
  setup = setup_lib.Setup(make_config('lexinvariant'), str(tmp_path))
  state = setup.init_state()
  params = {**state['params'], 'embed_scale': jnp.ones_like(state['params']['embed_scale'])}   # tables reach h
  eval_step, keys = setup.make_eval_step(), []

  def recording_step(params, model_state, batch, key):
    keys.append(jax.random.key_data(key))
    return eval_step(params, model_state, batch, key)

  evaluate = lambda draw: setup.evaluate(recording_step, params, state['model_state'], 'valid', 2, draw=draw)
  first, again = evaluate(0), evaluate(0)
  assert first == again and len(keys) == 4
  np.testing.assert_array_equal(np.stack(keys[:2]), np.stack(keys[2:]))
  tokens = jnp.asarray(next(iter(setup.dataset.eval_batches('valid', 1, setup.rows)))['tokens'])
  logits = lambda key: setup.model.apply({'params': params}, tokens,
                                         rngs=setup.model.stream_keys(jax.random.wrap_key_data(key)))[0]
  assert not np.allclose(logits(keys[0]), logits(keys[1]), atol=1e-3)
  assert evaluate(1)['loss'] != first['loss']   # another draw, other tables


def test_the_ciphered_probe_enciphers_each_sequence_with_its_own_key(make_config, tmp_path):
  """experiments.lexinvariant's `ciphered` probe: the lowercase letters of each sequence go through a bijection
  of its own (inputs and targets alike, every other id unchanged), reproducibly, and Setup.evaluate scores the
  enciphered batches."""
  from experiments import lexinvariant as experiment
  setup = setup_lib.Setup(make_config('lexinvariant', **{'model.embedding': 'learned'}), str(tmp_path))
  letters = experiment.lowercase_ids(setup.dataset.tokenizer)
  transform = functools.partial(experiment.encipher, letters=letters, vocab=setup.model.vocab_size)
  batch = next(iter(setup.dataset.eval_batches('valid', 1, setup.rows)))
  ciphered = transform(batch, 0)
  np.testing.assert_array_equal(ciphered['tokens'][:, 1:], ciphered['targets'][:, :-1])
  is_letter = np.isin(batch['tokens'], letters)
  assert is_letter.mean() > 0.3
  np.testing.assert_array_equal(ciphered['tokens'][~is_letter], batch['tokens'][~is_letter])
  keys = []
  for plain, secret, letter in zip(batch['tokens'], ciphered['tokens'], is_letter):
    pairs = set(zip(plain[letter].tolist(), secret[letter].tolist()))
    assert len(pairs) == len({p for p, _ in pairs}) == len({s for _, s in pairs})   # one-to-one
    assert {s for _, s in pairs} <= set(letters.tolist())
    keys.append(pairs)
  assert len({frozenset(k) for k in keys}) == len(keys)   # a key per sequence
  np.testing.assert_array_equal(transform(batch, 0)['tokens'], ciphered['tokens'])
  assert not np.array_equal(transform(batch, 1)['tokens'], ciphered['tokens'])
  state, eval_step = setup.init_state(), setup.make_eval_step()
  evaluate = lambda transform: setup.evaluate(eval_step, state['params'], state['model_state'], 'valid', 1,
                                              transform=transform)['loss']
  assert evaluate(lambda batch, index: batch) == evaluate(None) != evaluate(transform)

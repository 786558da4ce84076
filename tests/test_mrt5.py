"""ByT5 / MrT5: span corruption, the delete gate, soft against hard deletion, the PI controller,
decoder causality, generation, FLOPs and the CLIs (continued training from a ByT5 run)."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_MODELS, run_module

import models
from models.formats import seq2seq
from models.mrt5 import ByT5, hard_bucket_sizes, pi_controller_update
from models.sampling import Sampling
from train import config as config_lib, restore, trainer

TEXT = (b'The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest '
        b'structure in Paris. Its base is square, measuring 125 metres on each side.')
SEQ = 32


def build(deletion='gate', **overrides):
  config = models.default_config('mrt5')
  config.update(vocab_size=257, **{**TINY_MODELS['mrt5'], 'deletion': deletion, **overrides})
  return models.build(config)


def text_batch(model, rows=4, pad_row_to=None):
  """Span-corruption examples over windows of TEXT; row 1 optionally cut to `pad_row_to` bytes."""
  raw = np.frombuffer(TEXT, np.uint8).astype(np.int32)
  windows = np.stack([raw[r * 7:r * 7 + SEQ + 1] for r in range(rows)])
  valid = np.ones_like(windows, bool)
  if pad_row_to is not None:
    valid[1, pad_row_to:] = False
  return seq2seq.make_batch(windows, valid, task='span_corruption', noise_density=model.noise_density,
                            mean_span=model.mean_span)


@functools.lru_cache
def initial_variables(model):
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_inputs(4, SEQ).items()}
  keys = {'params': jax.random.key(0), 'dropout': jax.random.key(1), 'deletion': jax.random.key(2)}
  return jax.jit(lambda: nn.meta.unbox(model.init(keys, **batch)))()


def init(model, gate_kernel_scale=0.0, bias_table_scale=1.0):
  """Parameters with the gate kernel drawn at `gate_kernel_scale` (0: zeros) and the relative
  position tables scaled (so that positions visibly matter)."""
  variables = initial_variables(model)
  params = dict(variables['params'])
  if 'gate' in params:
    kernel = gate_kernel_scale * jax.random.normal(jax.random.key(3), params['gate']['kernel'].shape)
    params['gate'] = {**params['gate'], 'kernel': kernel}
  for name in ('encoder_bias', 'decoder_bias'):
    params[name] = {'table': params[name]['table'] * bias_table_scale}
  return {**variables, 'params': params}


@functools.lru_cache
def jitted_apply(model):
  rngs = {'dropout': jax.random.key(1), 'deletion': jax.random.key(2)}
  return jax.jit(lambda variables, enc, dec: model.apply(variables, enc, dec, rngs=rngs))


def forward(model, variables, batch):
  return jitted_apply(model)(variables, batch['encoder_tokens'], batch['decoder_tokens'])


def test_span_corruption_reassembles_the_text_and_fits_the_static_widths():
  rng = np.random.default_rng(0)
  raw = np.frombuffer(TEXT[:129], np.uint8).astype(np.int32)
  inputs, targets = seq2seq.span_corrupt(raw, rng, 0.15, 3.0)
  noise, spans = seq2seq.span_counts(129, 0.15, 3.0)
  assert (noise, spans) == (19, 6)
  assert inputs[-1] == targets[-1] == seq2seq.EOS
  assert len(targets) == seq2seq.decoder_length('span_corruption', 128, 0.15, 3.0) == noise + spans + 1
  assert len(inputs) == 129 - noise + spans + 1 <= 128
  fills, pieces = {}, np.split(targets[:-1], np.flatnonzero(targets[:-1] >= 256 - spans))
  for piece in pieces[1:]:
    fills[int(piece[0])] = piece[1:].tolist()
  assert sorted(fills) == [seq2seq.sentinel(s) for s in reversed(range(spans))]
  rebuilt = [b for t in inputs[:-1] for b in (fills[int(t)] if t in fills else [int(t)])]
  assert rebuilt == raw.tolist()
  # Batches: decoder input is the target shifted right behind the start id; weights mark the target.
  batch = text_batch(build(), pad_row_to=5)
  assert (batch['decoder_tokens'][:, 0] == seq2seq.PAD).all()
  np.testing.assert_array_equal(batch['decoder_tokens'][:, 1:], batch['targets'][:, :-1] * batch['weights'][:, 1:])
  np.testing.assert_array_equal(batch['bytes'], batch['weights'].sum(1))
  assert batch['weights'][1].sum() < batch['weights'][0].sum()


def test_vowel_removal_examples():
  windows, valid = np.ones((2, 66), np.int32), np.ones((2, 66), bool)
  windows[1] = 2   # the window's bytes seed the string
  batch = seq2seq.make_batch(windows, valid, task='vowel_removal', noise_density=0.15, mean_span=20)
  for row in range(2):
    letters = bytes(batch['encoder_tokens'][row, :-1].tolist())
    assert len(letters) == 64 and letters.isalpha() and batch['encoder_tokens'][row, -1] == seq2seq.EOS
    kept = bytes(t for t in batch['targets'][row][batch['weights'][row] > 0][:-1].tolist())
    assert kept == bytes(c for c in letters if c not in b'aeiou')
  assert batch['encoder_tokens'][0].tolist() != batch['encoder_tokens'][1].tolist()


def test_gate_range_and_initial_keep():
  model = build()
  batch = text_batch(model, pad_row_to=10)
  front = jax.jit(lambda variables: model.apply(variables, batch['encoder_tokens'], method=ByT5.encode_front))
  _, valid, _, gate = front(init(model))
  # The zero-kernel start: w = 0, b = 1, so G = k·σ(-1) ≈ -8.07 on every token: nothing deleted; pads at k.
  np.testing.assert_allclose(gate[valid], model.gate_scale * jax.nn.sigmoid(-1.0), rtol=1e-6)
  np.testing.assert_array_equal(gate[~valid], model.gate_scale)
  _, aux = forward(model, init(model), batch)
  assert aux['mrt5/deletion_rate'] == 0 and aux['mrt5/encoder_length_fraction'] == 1
  _, _, _, gate = front(init(model, gate_kernel_scale=3.0))
  assert (gate >= model.gate_scale).all() and (gate <= 0).all()
  assert 0.1 < float((gate[valid] < model.gate_scale / 2).mean()) < 0.9


def test_hard_deletion_equals_soft_deletion_in_the_limit():
  """With every gate at exactly 0 or k, dropping the deleted tokens (shorter tensors) gives the logits of
  adding k to their attention logits. (Random and fixed deletion only set G to 0 or k, then share this path.)"""
  model = build()
  variables = init(model, gate_kernel_scale=1e3)   # saturates the sigmoid: G is 0 or k
  batch = text_batch(model, pad_row_to=20)
  hard, aux = forward(model, variables, batch)
  soft, _ = forward(model.clone(eval_deletion='soft'), variables, batch)
  assert 0.2 < aux['mrt5/deletion_rate'] < 0.8
  assert aux['mrt5/encoder_length_fraction'] < 1
  np.testing.assert_allclose(hard, soft, atol=1e-5)


@pytest.mark.parametrize('keeps_gate_bias', [False, True])
def test_hard_deletion_keeps_original_relative_positions(keeps_gate_bias):
  """Hard deletion (gathered, bucketed) equals the masked reference: the full sequence with deleted
  tokens treated as padding at their original positions, and the kept tokens' gate values dropped
  (official) or kept as key biases; renumbering the kept tokens would differ. With gates away from 0
  and k, hard deletion (official) differs from soft: the gap the paper measures."""
  model = build(hard_keeps_gate_bias=keeps_gate_bias)
  variables = init(model, gate_kernel_scale=3.0, bias_table_scale=100.0)
  batch = text_batch(model)
  hard, aux = forward(model, variables, batch)
  assert aux['mrt5/encoder_length_fraction'] < 1

  def reference(renumber):
    h, valid, positions, gate = model.apply(variables, batch['encoder_tokens'], method=ByT5.encode_front)
    keep = valid & ~model.deleted(gate, valid)
    kept_bias = gate if keeps_gate_bias else None
    if renumber:
      positions = jnp.cumsum(keep, axis=1) - 1
    encoded, _ = model.apply(variables, h, keep, positions, kept_bias, method=ByT5.encode_back)
    return model.apply(variables, encoded, keep, kept_bias, batch['decoder_tokens'], method=ByT5.decode)[0]

  np.testing.assert_allclose(hard, reference(False), atol=1e-5)
  assert not np.allclose(hard, reference(True), atol=1e-3)
  soft, _ = forward(model.clone(eval_deletion='soft'), variables, batch)
  assert np.allclose(hard, soft, atol=1e-3) == keeps_gate_bias


@pytest.mark.parametrize('deletion', ['gate', 'random', 'fixed'])
def test_pads_never_count_as_kept(deletion):
  model = build(deletion, target_deletion=0.5)
  variables = init(model, gate_kernel_scale=3.0)
  batch = text_batch(model, pad_row_to=6)
  h, valid, positions, gate = model.apply(variables, batch['encoder_tokens'], method=ByT5.encode_front,
                                          rngs={'deletion': jax.random.key(2)})
  assert not valid[1, 8:].any() and (gate[~valid] == model.gate_scale).all()
  deleted = model.deleted(gate, valid)
  _, aux = forward(model, variables, batch)
  assert aux['mrt5/deletion_rate'] == pytest.approx(float(deleted.sum() / valid.sum()), rel=1e-6)
  kept_most = int((valid & ~deleted).sum(1).max())   # the hard path's length holds the kept, never the pads
  length = min(s for s in hard_bucket_sizes(SEQ, model.hard_buckets) if s >= kept_most)
  assert aux['mrt5/encoder_length_fraction'] == pytest.approx(length / SEQ)


def test_fixed_deletion_takes_a_share_of_every_word():
  model = build('fixed', target_deletion=0.5)
  tokens = jnp.asarray([list(b'abcd ef, g') + [seq2seq.EOS, 0, 0]], jnp.int32)
  gate = model.apply(init(model), tokens, method=ByT5.encode_front)[3]
  deleted = np.asarray(gate[0] == model.gate_scale)
  #                 a  b  c  d  _  e  f  ,  _  g  eos pad pad
  assert deleted.tolist() == [1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1]


def test_pi_controller_drives_the_deletion_rate_to_the_target():
  """A toy gate: token j's deletion costs c_j ~ U(0, 2), so the rate settles where 30·α crosses the costs.
  The controller finds α: the paper's k_p alone leaves an offset of ~α/k_p; the integral term removes it."""
  k, target, n = -30.0, 0.5, 2000
  costs = jax.random.uniform(jax.random.key(0), (n,), maxval=2.0)

  def run(k_i, steps=3000):
    optimizer = optax.adam(0.05)

    def step(carry, _):
      theta, opt_state, terms = carry
      rate = (k * jax.nn.sigmoid(-theta) < k / 2).mean()
      terms = pi_controller_update(terms, rate, target, 0.5, k_i, 0.9)
      alpha = jnp.maximum(0.0, terms.sum())
      loss = lambda theta: (alpha * k * jax.nn.sigmoid(-theta) + costs * jax.nn.sigmoid(-theta)).mean()
      updates, opt_state = optimizer.update(jax.grad(loss)(theta), opt_state)
      return (theta + updates, opt_state, terms), rate

    theta = jnp.ones(n)   # G ≈ -8: everything kept
    _, rates = jax.jit(lambda: jax.lax.scan(step, (theta, optimizer.init(theta), jnp.zeros(2)), None, steps))()
    return float(rates[-200:].mean())

  paper = run(1e-5)
  assert 0.35 < paper < target
  assert run(1e-2) == pytest.approx(target, abs=0.02)


def test_deletion_tracks_the_target_rate_in_a_real_run(cache_dir, tmp_path):
  """A short run from scratch on vowel removal, where the decoder must read the encoder (so over-deleting
  costs loss, the only force against the gate loss: α is never negative). With the official Xavier gate
  init the PI controller's deletion rate ends within ±0.1 of δ = 0.4 (measured 0.39; δ = 0.3 / 0.5 / 0.7
  end at 0.32 / 0.42 / 0.49, the task resisting more deletion). This run with the zero init ends at 0.29."""
  from conftest import SHARED_DATA

  from experiments.configs import mrt5 as mrt5_configs
  config = mrt5_configs.get_config('tiny,vowel_mrt5')
  config.model.update(d_model=64, num_heads=2, d_ff=128, encoder_layers=2, decoder_layers=2, gate_layer=1,
                      gate_scale=-30.0, controller='pi', target_deletion=0.4, regularizer_delay=300)
  config.train.update(seq_len=13, batch_size=32, steps=900, warmup_steps=20, lr=3e-3, log_every=50,
                      eval_every=10_000)
  config.data.update(dir=str(SHARED_DATA / 'wikitext-2'), cache_dir=cache_dir)
  config.checkpoint.update(every=10_000, async_save=False)
  trainer.Trainer(config, str(tmp_path / 'run')).run()
  rates = [r['mrt5/deletion_rate'] for r in map(json.loads, open(tmp_path / 'run' / 'metrics.jsonl'))
           if 'mrt5/deletion_rate' in r]
  assert rates[5] < 0.1                                     # before the gate loss: (almost) nothing deleted
  assert np.mean(rates[-4:]) == pytest.approx(0.4, abs=0.1)


def test_training_updates_the_controller_and_reports_the_losses():
  model = build(regularizer_delay=1)
  variables = init(model)
  batch = text_batch(model)
  rngs = {'dropout': jax.random.key(1), 'deletion': jax.random.key(2)}
  apply = jax.jit(lambda v: model.apply(v, batch['encoder_tokens'], batch['decoder_tokens'], train=True, rngs=rngs,
                                        mutable=['controller']))
  (_, aux), state = apply(variables)
  assert aux['mrt5/alpha'] == 0 and int(state['controller']['step']) == 1   # the delay
  (_, aux), state = apply({**variables, **state})
  # Nothing deleted yet, so the error is δ: P = 0.1·k_p·δ, I = k_i·δ.
  np.testing.assert_allclose(state['controller']['terms'], [0.1 * 0.5 * 0.5, 1e-5 * 0.5], rtol=1e-5)
  assert aux['mrt5/alpha'] == pytest.approx(0.025 + 5e-6) and aux['loss/gate'] < 0 and aux['loss/score'] >= 0
  # Over the target (here every token deleted, δ = 0.5): the official α stays at 0, the two-sided one turns
  # negative, pushing the gates back up.
  over = init(model)
  over['params']['gate'] = {**over['params']['gate'], 'bias': jnp.full((1,), -1e3)}
  for two_sided in (False, True):
    apply = jax.jit(lambda v, m=model.clone(controller_two_sided=two_sided): m.apply(
        v, batch['encoder_tokens'], batch['decoder_tokens'], train=True, rngs=rngs, mutable=['controller']))
    (_, aux), _ = apply({**over, **state})
    assert aux['mrt5/deletion_rate'] == 1
    assert (aux['mrt5/alpha'] < 0) == two_sided and aux['mrt5/alpha'] <= 0


def test_decoder_is_causal_and_reads_the_encoder():
  model = build()
  variables = init(model)
  batch = text_batch(model)
  logits, _ = forward(model, variables, batch)
  t = 3
  changed = {**batch, 'decoder_tokens': batch['decoder_tokens'].copy()}
  changed['decoder_tokens'][:, t + 1:] = 200
  later, _ = forward(model, variables, changed)
  np.testing.assert_allclose(logits[:, :t + 1], later[:, :t + 1], atol=1e-5)
  assert not np.allclose(logits[:, t + 1:], later[:, t + 1:], atol=1e-3)
  other = {**batch, 'encoder_tokens': np.roll(batch['encoder_tokens'], 1, axis=0)}
  # (At the start softmax₁ and G ≈ -8 leave the cross-attention little mass: small, but real, changes.)
  assert not np.allclose(logits[:, 0], forward(model, variables, other)[0][:, 0], atol=1e-6)


def test_greedy_generation_equals_the_teacher_forced_argmax():
  """Generation encodes once with exact hard deletion and decodes step by step; the bucketed full forward
  over what it produced picks the same tokens."""
  model = build()
  variables = init(model, gate_kernel_scale=3.0)
  prompt = np.frombuffer(b'The tower is 324 metres tall', np.uint8).astype(np.int32)
  out = model.generate(variables['params'], [prompt], model.decoder_length(SEQ), key=jax.random.key(0),
                       sampling=Sampling(temperature=0, vocab_limit=257),
                       model_state={'controller': variables['controller']})[0]
  assert len(out) >= 1
  encoder = np.zeros((1, SEQ), np.int32)
  encoder[0, :len(prompt) + 1] = np.append(prompt, seq2seq.EOS)
  decoder = np.zeros((1, model.decoder_length(SEQ)), np.int32)
  decoder[0, 1:len(out)] = out[:-1]
  batch = {'encoder_tokens': encoder, 'decoder_tokens': decoder}
  logits, aux = forward(model, variables, batch)
  assert aux['mrt5/deletion_rate'] > 0
  np.testing.assert_array_equal(np.asarray(logits[0, :len(out)].argmax(-1)), out)


def test_batched_generation_equals_each_prompt_alone():
  """Prompts of different lengths, padded in the encoder and each hard-deleted to its own kept tokens (the
  shorter rows masked): every row decodes as it does alone, up to its own eos."""
  model = build()
  variables = init(model, gate_kernel_scale=3.0)
  prompts = [np.frombuffer(text, np.uint8).astype(np.int32) for text in (b'The tower is 324 metres tall', b'Hi')]
  kwargs = dict(key=jax.random.key(0), sampling=Sampling(temperature=0, vocab_limit=257),
                model_state={'controller': variables['controller']})
  together = model.generate(variables['params'], prompts, 12, **kwargs)
  for row, prompt in enumerate(prompts):
    np.testing.assert_array_equal(together[row], model.generate(variables['params'], [prompt], 12, **kwargs)[0])


def test_flops_against_xla():
  model = build('none')
  variables = init(model)
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_inputs(1, 128).items()}
  xla = jax.jit(lambda v, e, d: model.apply(v, e, d)[0]).lower(
      variables, batch['encoder_tokens'], batch['decoder_tokens']).compile().cost_analysis()['flops']
  assert 0.8 < model.forward_flops_per_token(128) * 128 / xla < 1.1


def test_cli_continues_byt5_as_mrt5_evaluates_soft_and_hard_and_samples(make_config, tmp_path):
  from conftest import config_flags
  byt5_dir, workdir = tmp_path / 'byt5', str(tmp_path / 'mrt5')
  trainer.Trainer(make_config('byt5', **{'train.steps': 6}), str(byt5_dir)).run()
  config = make_config('mrt5', **{'train.steps': 6, 'train.init_from': str(byt5_dir)})
  out = run_module('train', *config_flags(config), '--workdir', workdir)
  assert out.returncode == 0, out.stderr
  assert 'newly initialised: gate/bias, gate/kernel, gate/norm/scale' in out.stderr
  metrics = [json.loads(line) for line in open(tmp_path / 'mrt5' / 'metrics.jsonl')]
  assert any(r.get('mrt5/alpha', 0) > 0 for r in metrics)
  results = {}
  for mode in ('hard', 'soft'):   # in-process: train.evaluate's command line is tested on other models
    saved = config_lib.load_workdir_config(workdir)
    saved.model.eval_deletion = mode
    setup, state = restore.load_run(saved, workdir)
    results[mode] = setup.evaluate(setup.make_eval_step(), state['params'], state['model_state'], 'valid', 2)
  assert 0 < results['hard']['bpb'] < 9 and 0 <= results['hard']['mrt5/deletion_rate'] <= 1
  assert 'mrt5/encoder_length_fraction' in results['hard'] and 'mrt5/encoder_length_fraction' not in results['soft']
  out = run_module('train.sample', '--workdir', workdir, '--prompt', 'def main(', '--max_new_tokens', '8',
                   '--temperature', '0')
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('def main(')

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_causal, run_module
from jax.sharding import PartitionSpec as P
from scipy.special import erf

import models
from models import tokenformer
from train import config as config_lib, restore, trainer
from train.grow import grow_run

EIGHT_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


def model_config(**kw):
  cfg = models.default_config('tokenformer')
  cfg.update(**{**dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, n_attn=12, n_ffn=48, max_len=24), **kw})
  return cfg


def build(**kw):
  model = models.build(model_config(**kw))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 50)
  return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))['params'], tokens


def naive_weights(scores, activation, tau):
  """Θ row by row in float64, straight from the paper's definitions."""
  gelu = lambda a: 0.5 * a * (1 + erf(a / math.sqrt(2)))
  rows = []
  for a in np.asarray(scores, np.float64).reshape(-1, scores.shape[-1]):
    if activation == 'l2_gelu':
      rows.append(gelu(tau * a / np.linalg.norm(a)))
    elif activation == 'gelu_l2':
      rows.append(tau * gelu(a) / np.linalg.norm(gelu(a)))
    else:
      rows.append(tau ** 2 * np.exp(a) / np.exp(a).sum())
  return np.stack(rows).reshape(scores.shape)


@pytest.mark.parametrize('activation', tokenformer.ACTIVATIONS)
def test_pattention_is_the_papers_modified_softmax(activation):
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  layer = tokenformer.Pattention(num_tokens=6, features=3, activation=activation)
  params = nn.meta.unbox(layer.init(jax.random.key(1), x))['params']
  scores = np.einsum('btd,nd->btn', x, params['keys'])   # no 1/sqrt(d)
  expected = naive_weights(scores, activation, math.sqrt(6)) @ np.asarray(params['values'], np.float64)
  np.testing.assert_allclose(layer.apply({'params': params}, x), expected, rtol=1e-4, atol=1e-5)


def test_parameter_count_of_the_124m_shape():
  cfg = models.default_config('tokenformer')
  cfg.update(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, n_attn=576, n_ffn=2304)
  counts = models.param_counts(models.build(cfg))
  layers = 2 * 768 * (4 * 576 + 2304) * 12   # keys and values of five Pattentions per layer
  assert counts['non_embedding_params'] == layers + 2 * 768   # + the final LayerNorm; block norms have none
  assert counts['params'] == layers + 50304 * 768 + 2 * 768
  assert round(counts['params'] / 1e6, 1) == 123.6


def test_released_initialisations():
  model, params, _ = build(d_model=64, num_layers=4, n_attn=64, n_ffn=256)
  ffn = params['block_0']['ffn']
  assert np.std(ffn['keys']) == pytest.approx(0.02, rel=0.1)
  assert np.std(ffn['values']) == pytest.approx(2 / (4 * math.sqrt(64)), rel=0.1)
  model, params, _ = build(d_model=64, num_layers=4, n_attn=64, n_ffn=256, param_init='fan_in')
  ffn = params['block_0']['ffn']
  assert np.std(ffn['keys']) == pytest.approx(1 / math.sqrt(64), rel=0.1)
  assert np.std(ffn['values']) == pytest.approx(1 / math.sqrt(256), rel=0.1)
  assert np.std(params['embed']['embedding']) == pytest.approx(1.0, rel=0.1)


def test_block_has_no_biases_and_non_parametric_norms():
  _, params, _ = build()
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert not [n for n in names if 'bias' in n and 'final_norm' not in n]
  assert not [n for n in names if 'norm1' in n or 'norm2' in n]
  assert "['final_norm']['scale']" in names and "['final_norm']['bias']" in names


@pytest.mark.parametrize('kw', [dict(rope_fraction=0.0), dict(activation='softmax')])   # default: test_models
def test_causality_of_the_variants(kw):
  assert_causal(*build(**kw), vocab_size=50)


def test_rotary_fraction_changes_the_model():
  model, params, tokens = build(rope_fraction=0.25)
  nope, _, _ = build(rope_fraction=0.0)
  assert not np.allclose(model.apply({'params': params}, tokens)[0], nope.apply({'params': params}, tokens)[0],
                         atol=1e-4)


def test_flops_per_token_close_to_compiler_count():
  # Wide enough that the matmuls dominate: XLA also counts Θ's elementwise work (erf, the row norm).
  model, params, _ = build(vocab_size=256, d_model=256, n_attn=64, n_ffn=256)
  tokens = jnp.zeros((1, 64), jnp.int32)
  cost = jax.jit(lambda p: model.apply({'params': p}, tokens)[0]).lower(params).compile().cost_analysis()
  xla_per_token = cost['flops'] / 64
  full_attention_extra = 2 * 2 * 256 * 64 / 2 * 2   # the causal half XLA also counts, per layer
  assert 0.92 < (model.forward_flops_per_token(64) + full_attention_extra) / xla_per_token < 1.05


def grow_tiny(key_init, pin_tau, add_tokens=20):
  """Logits of a tiny model before and after growing it; the grown params and config."""
  model, params, tokens = build()
  cfg = tokenformer.TokenFormer.grown_config(model_config(), add_tokens, pin_tau)
  big = models.build(cfg)
  fresh = nn.meta.unbox(big.init(jax.random.key(7), tokens))['params']
  grown = tokenformer.TokenFormer.grown_params(params, fresh, key_init)
  return model.apply({'params': params}, tokens)[0], big.apply({'params': grown}, tokens)[0], grown, params


def test_zero_keys_with_pinned_tau_preserve_the_function():
  before, after, grown, old = grow_tiny('zeros', pin_tau=True)
  np.testing.assert_allclose(after, before, atol=1e-5)
  keys, values = grown['block_0']['ffn']['keys'], grown['block_0']['ffn']['values']
  assert keys.shape == (48 + 80, 32)   # the feed-forward grows by 4x the attention's tokens
  np.testing.assert_array_equal(keys[:48], old['block_0']['ffn']['keys'])
  assert not np.any(keys[48:]) and np.all(np.std(values[48:]) > 0)   # values random: the keys get gradient
  # The paper's caveats: τ = √n that follows the new n, or random new keys, change the function.
  assert not np.allclose(grow_tiny('zeros', pin_tau=False)[1], before, atol=1e-3)
  assert not np.allclose(grow_tiny('random', pin_tau=True)[1], before, atol=1e-3)


def adam_state(state):
  return next(s for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))


def schedule_count(state):
  return next(s.count for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda s: isinstance(
      s, optax.ScaleByScheduleState)) if isinstance(s, optax.ScaleByScheduleState))


def test_grow_cli_defaults_preserve_the_function_with_a_fresh_optimizer(make_config, tmp_path):
  """`python -m train.grow` with no recipe flags is the paper's function-preserving recipe: zero new keys, τ
  pinned (the logits before and after agree to float32 rounding) and a fresh optimizer, as the official
  loaders start (step 0, zero moments)."""
  config = make_config('tokenformer', **{'train.steps': 4})
  trainer.Trainer(config, str(tmp_path / 'small')).run()
  out = run_module('train.grow', '--from', str(tmp_path / 'small'), '--to', str(tmp_path / 'big'), '--add_tokens', '8')
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['n_attn'] == config.model.n_attn + 8 and summary['n_ffn'] == config.model.n_ffn + 32
  assert summary['train_offset'] == 4 * config.train.batch_size   # the data continues where A stopped
  small_setup, small = restore.load_run(config, str(tmp_path / 'small'))
  big_config = config_lib.load_workdir_config(str(tmp_path / 'big'))
  big_setup, big = restore.load_run(big_config, str(tmp_path / 'big'))
  tokens = jnp.asarray(small_setup.dataset.train_batch(0)['tokens'])
  logits = lambda setup, state: setup.model.apply({'params': state['params']}, tokens)[0]
  np.testing.assert_allclose(logits(big_setup, big), logits(small_setup, small), rtol=1e-5, atol=1e-6)

  assert int(big['step']) == 0 and int(schedule_count(big)) == 0   # a fresh schedule
  assert int(adam_state(small).count) == 4 and int(adam_state(big).count) == 0   # and a fresh Adam
  assert not any(np.any(m) for m in jax.tree.leaves((adam_state(big).mu, adam_state(big).nu)))

  # `python -m train` takes the grown run's own config and trains on from step 0.
  out = run_module('train', '--workdir', str(tmp_path / 'big'), '--config.train.steps=2')
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['start_step'] == 0 and result['step'] == 2 and np.isfinite(result['loss'])

  with pytest.raises(config_lib.ConfigError, match='already holds checkpoints; grow into a new directory$'):
    grow_run(str(tmp_path / 'small'), str(tmp_path / 'big'), 8)

  # The other recipes: the paper's main runs (random new tokens, τ = √n of the new n) change the function;
  # `pad` keeps the trained moments and Adam's count, zeros for the new tokens.
  grow_run(str(tmp_path / 'small'), str(tmp_path / 'main'), 8, key_init='random', pin_tau=False)
  main_config = config_lib.load_workdir_config(str(tmp_path / 'main'))
  assert main_config.model.tau_attn == main_config.model.tau_ffn == 0   # √n, following n
  main_setup, main = restore.load_run(main_config, str(tmp_path / 'main'))
  assert not np.allclose(logits(main_setup, main), logits(small_setup, small), atol=1e-3)
  grow_run(str(tmp_path / 'small'), str(tmp_path / 'pad'), 8, optimizer='pad')
  padded = restore.load_run(config_lib.load_workdir_config(str(tmp_path / 'pad')), str(tmp_path / 'pad'))[1]
  assert int(schedule_count(padded)) == 0 and int(adam_state(padded).count) == 4
  old_mu, new_mu = adam_state(small).mu['block_0']['ffn']['keys'], adam_state(padded).mu['block_0']['ffn']['keys']
  np.testing.assert_array_equal(new_mu[:old_mu.shape[0]], old_mu)
  assert not np.any(new_mu[old_mu.shape[0]:])


def test_grow_refuses_other_models(make_config, tmp_path):
  trainer.Trainer(make_config('transformer', **{'train.steps': 1}), str(tmp_path / 'gpt')).run()
  with pytest.raises(config_lib.ConfigError, match="^model 'transformer' cannot grow by parameter tokens$"):
    grow_run(str(tmp_path / 'gpt'), str(tmp_path / 'x'), 8)


def test_grow_keeps_a_sharded_checkpoint_sharded(tmp_path):
  out = run_module('_grow_sharded', str(tmp_path), env=EIGHT_DEVICES)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['keys_spec'] == result['values_spec'] == str(P('tensor', 'fsdp'))
  assert result['keys_shape'] == [96 + 4 * 8, 32]   # the feed-forward's n_ffn grew by 4x8
  assert result['loss_after'] == pytest.approx(result['loss_before'], abs=1e-5)
  assert result['adam_count'] == 0 and result['adam_mu_abs_sum'] == 0   # --optimizer reset


def test_grown_rows_of_the_scaling_experiment_run_the_papers_recipes():
  from experiments import tokenformer_scaling
  rows = {row.name: row for row in tokenformer_scaling.declare('tiny', 'runs').rows}
  recipe = lambda name: rows[name].prepare[rows[name].prepare.index('--key_init'):]
  assert recipe('B-zeros') == recipe('B-gentle') == ('--key_init', 'zeros', '--pin_tau', '--optimizer', 'reset')
  assert recipe('B-random') == ('--key_init', 'random', '--nopin_tau', '--optimizer', 'reset')   # the main runs

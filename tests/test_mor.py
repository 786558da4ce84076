import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_causal, config_flags, run_module

import models
from models import mor, sampling

VOCAB = 50


def module(name='mor', **kw):
  cfg = models.default_config(name)
  cfg.update(vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64, **({} if name == 'llama' else dict(num_layers=8)))
  cfg.update(**kw)
  return models.build(cfg)


def build(name='mor', **kw):
  model = module(name, **kw)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, VOCAB)
  variables = nn.meta.unbox(jax.jit(model.init)({'params': jax.random.key(1)}, tokens))
  return model, variables.pop('params'), variables, tokens


def selections(model, params, tokens, train=False):
  apply = jax.jit(lambda p, t: model.apply({'params': p}, t, train=train, mutable=['intermediates']))
  (_, aux), state = apply(params, tokens)
  return np.asarray(state['intermediates']['selected'][0]), aux


def test_sharing_schemes_map_layers_as_the_spec_table():
  # L = 9, N_r = 3 (spec §3.1): Cycle (0,1,2)x3, Sequence (0,0,0),(1,1,1),(2,2,2).
  assert mor.layer_plan(9, 3, 'cycle') == [f'block_{i}' for i in (0, 1, 2, 0, 1, 2, 0, 1, 2)]
  assert mor.layer_plan(9, 3, 'sequence') == [f'block_{i}' for i in (0, 0, 0, 1, 1, 1, 2, 2, 2)]
  # The middle schemes keep the first and last layer unique: 1 + 2 x 3 + 1.
  assert mor.layer_plan(8, 3, 'middle_cycle') == ['first'] + [f'block_{i}' for i in (0, 1, 0, 1, 0, 1)] + ['last']
  assert mor.layer_plan(8, 3, 'middle_sequence') == ['first'] + [f'block_{i}' for i in (0, 0, 0, 1, 1, 1)] + ['last']
  # The parameters hold the pool once: 4 unique blocks for 8 unrolled layers, 6 for a vanilla 6-layer model.
  _, params, _, _ = build('recursive', num_layers=8, sharing='middle_sequence')
  assert sorted(k for k in params if k.startswith(('block', 'first', 'last'))) == ['block_0', 'block_1', 'first', 'last']
  _, vanilla, _, _ = build('llama')
  assert sorted(k for k in vanilla if k.startswith('block')) == [f'block_{i}' for i in range(6)]
  with pytest.raises(ValueError, match='num_recursions=3 must divide'):
    build('recursive', num_layers=9, sharing='middle_cycle')
  with pytest.raises(ValueError, match='needs a cycle sharing scheme'):
    build('mor', sharing='middle_sequence')


def test_topk_capacities_and_hierarchical_filtering():
  model, params, _, tokens = build()
  selected, aux = selections(model, params, tokens, train=True)
  # Capacities 1, 2/3, 1/3 of 24 tokens, per sequence.
  np.testing.assert_array_equal(selected.sum(-1), [[24, 24], [16, 16], [8, 8]])
  assert (selected[1] <= selected[0]).all() and (selected[2] <= selected[1]).all()   # nested
  np.testing.assert_allclose([aux[f'mor/utilisation_r{r}'] for r in (1, 2, 3)], [1, 2 / 3, 1 / 3], rtol=1e-6)
  # Custom capacities; at evaluation with thresholds the selection is σ > 0.5 among the survivors.
  custom, params2, _, _ = build(capacities='1,0.5,0.25')
  np.testing.assert_array_equal(selections(custom, params2, tokens, train=True)[0].sum(-1), [[24, 24], [12, 12], [6, 6]])
  evaluated, _ = selections(model.clone(eval_routing='threshold'), params, tokens)
  assert evaluated[0].all() and (evaluated[2] <= evaluated[1]).all() and 0 < evaluated[1].sum() < evaluated[1].size
  with pytest.raises(ValueError, match='non-increasing'):
    build(capacities='1,0.3,0.6')


def test_evaluation_routes_by_the_training_topk_by_default():
  """The official code evaluates with the training top-k: the default evaluation forward is the training
  one (routing is the only difference), over the whole window, so not causal; eval_routing=threshold is the
  causal σ > 0.5 routing (its causality: test_models and the variants below)."""
  model, params, _, tokens = build()
  evaluated = model.apply({'params': params}, tokens)[0]
  np.testing.assert_allclose(evaluated, model.apply({'params': params}, tokens, train=True)[0], atol=1e-6)
  np.testing.assert_array_equal(selections(model, params, tokens)[0].sum(-1), [[24, 24], [16, 16], [8, 8]])
  assert not np.allclose(model.clone(eval_routing='threshold').apply({'params': params}, tokens)[0], evaluated,
                         atol=1e-4)
  later_changed = tokens.at[:, 12:].set((tokens[:, 12:] + 5) % VOCAB)   # can move an earlier token's depth
  assert not np.allclose(model.apply({'params': params}, later_changed)[0][:, :12], evaluated[:, :12], atol=1e-6)


def test_the_experiment_reports_topk_and_threshold_numbers(monkeypatch):
  from experiments import mor as experiment
  calls = []
  monkeypatch.setattr(experiment.runner, 'evaluate', lambda workdir, **kw: calls.append(kw) or {'ppl': 3.0, 'bpb': 1.5})
  rows = {row.name: row for row in experiment.declare('tiny', 25, 0).rows}
  routed = {name for name, row in rows.items() if 'threshold' in row.probes}
  assert routed == {'mor2-flops', 'mor3-flops', 'mor3_kvshare-flops', 'mor3-tokens'}   # the expert-choice rows
  value = rows['mor3-flops'].probes['threshold']({'workdir': 'runs/x'})
  assert value == {'valid_ppl': 3.0, 'valid_bpb': 1.5, 'test_ppl': 3.0, 'test_bpb': 1.5}
  assert calls == [dict(split=split, max_batches=25, overrides=['model.eval_routing=threshold'])
                   for split in ('valid', 'test')]
  row = dict(name='mor3-flops', valid_ppl=2.0, test_ppl=2.1, tokens_per_sec=1.0, peak_memory_bytes=None,
             probes={'threshold': {'value': {**value, 'test_ppl': 3.1}}})
  table = experiment.sections([row])
  assert table[2].split(' | ')[2:6] == ['valid_ppl', 'test_ppl', 'valid_ppl_threshold', 'test_ppl_threshold']
  assert table[4].split(' | ')[2:6] == ['2', '2.1', '3', '3.1']


@pytest.mark.parametrize('kw', [dict(), dict(kv_sharing=True, num_recursions=2, num_layers=6)])
def test_gathered_topk_equals_the_dense_reference_forward_and_backward(kw):
  """The gather/scatter fast path (`gather=True`) against the masked dense reference: logits, auxiliary
  terms and the parameter gradients."""
  model, params, _, tokens = build(**kw)
  dense = model.clone(gather=False)
  forward = lambda m: jax.jit(lambda p: m.apply({'params': p}, tokens, train=True))(params)
  (logits, aux), (ref_logits, ref_aux) = forward(model), forward(dense)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  for key in aux:
    np.testing.assert_allclose(aux[key], ref_aux[key], atol=1e-6, err_msg=key)
  grads = lambda m: jax.jit(jax.grad(lambda p: m.apply({'params': p}, tokens, train=True)[0].std()))(params)
  for a, b in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(dense))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_kv_sharing_attends_every_token_at_deeper_recursions():
  model, params, _, tokens = build(kv_sharing=True)
  plain = build()[0]
  assert not np.allclose(model.apply({'params': params}, tokens, train=True)[0],
                         plain.apply({'params': params}, tokens, train=True)[0], atol=1e-4)


@pytest.mark.parametrize('router', ['expert', 'token'])
def test_gradient_reaches_the_router(router):
  model, params, _, tokens = build(router=router)

  def lm_loss(p):   # the language-model loss alone: the routers learn through their gates
    logits, _ = model.apply({'params': p}, tokens[:, :-1], train=True)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean()

  grads = jax.jit(jax.grad(lm_loss))(params)
  names = [f'router_{r}' for r in range(3)] if router == 'expert' else ['router']
  for name in names:
    assert np.abs(grads[name]['kernel']).max() > 0, name


def test_auxiliary_losses():
  model, params, _, tokens = build()
  logits, aux = model.apply({'params': params}, tokens, train=True)
  assert 0 < aux['loss/router_bce'] < 1e-3 * 3 * 1.0   # three BCEs near ln 2 at init, times 1e-3
  _, aux_z = build(z_loss_coef=1e-3)[0].apply({'params': params}, tokens, train=True)
  assert aux_z['loss/router_z'] > 0
  token, tparams, _, _ = build(router='token')
  _, taux = token.apply({'params': tparams}, tokens, train=True)
  np.testing.assert_allclose(sum(taux[f'mor/depth_{i}_fraction'] for i in (1, 2, 3)), 1.0, rtol=1e-6)
  # Switch balancing: 0.1 · N Σ f_i P_i is 0.1 at perfect balance and larger otherwise (here at init ~0.1).
  assert 0.09 < taux['loss/router_balance'] < 0.2
  # Loss-free balancing moves the selection bias towards under-loaded depths.
  free, fparams, state, _ = build(router='token', token_balancing='loss_free')
  (_, faux), new_state = free.apply({'params': fparams, **state}, tokens, train=True, mutable=['router_state'])
  load = np.array([faux[f'mor/depth_{i}_fraction'] for i in (1, 2, 3)])
  np.testing.assert_allclose(new_state['router_state']['bias'], 1e-3 * np.sign(load.mean() - load), atol=1e-9)


@pytest.mark.parametrize('kw', [dict(router='token'),
                                dict(kv_sharing=True, num_kv_heads=2, eval_routing='threshold')])   # default: test_models
def test_causality_in_evaluation_of_the_variants(kw):
  # (Cached decoding equal to the full pass, below, also shows that the full pass never looks ahead.)
  model, params, _, tokens = build('mor', **kw)
  assert_causal(model, params, tokens, VOCAB)


# (Generation itself, and the loss-free token router's state in it, are in the CLI test below.)
@pytest.mark.parametrize('name,kw', [('recursive', dict(sharing='middle_sequence')), ('mor', {}),
                                     ('mor', dict(kv_sharing=True, num_kv_heads=2))])
def test_cached_decode_equals_full_forward(name, kw):
  """Decoding routes by σ > 0.5 even when evaluation routes by the top-k (the default): it equals the full
  causal pass."""
  model, params, state, tokens = build(name, eval_routing='topk', **kw)
  causal = model.clone(eval_routing='threshold')
  full, _ = causal.apply({'params': params, **state}, tokens)
  if name == 'mor' and kw.get('router', 'expert') == 'expert':   # the test means something: some tokens skip
    skipped = selections(causal, params, tokens)[0]
    assert 0 < skipped[1:].sum() < skipped[1:].size
  cache = sampling.init_cache(model, 2, tokens.shape[1])   # as `train.sample` builds it
  # A prompt chunk of 10, then one token per call: every position's logits equal the full pass.
  chunks = [(0, 10)] + [(t, t + 1) for t in range(10, tokens.shape[1])]
  step = jax.jit(lambda variables, chunk: model.apply(variables, chunk, decode=True, mutable=['cache']))
  for start, stop in chunks:
    (logits, _), updated = step({'params': params, 'cache': cache, **state}, tokens[:, start:stop])
    cache = updated['cache']
    np.testing.assert_allclose(logits, full[:, start:stop], atol=2e-5, err_msg=f'positions {start}:{stop}')


def test_flops_against_a_hand_count():
  d, ff, vocab, seq, heads, kv = 32, 64, VOCAB, 24, 4, 2
  head_dim = d // heads
  linear = 2 * (d * head_dim * (2 * heads + 2 * kv) + 3 * d * ff)   # q, o, k, v and SwiGLU's three matrices
  attention = 2 * d * seq                                          # QK^T + AV, causal half
  readout = 2 * d * vocab
  vanilla = module('llama', num_kv_heads=kv)
  assert vanilla.forward_flops_per_token(seq) == 6 * (linear + attention) + readout
  recursive = module('recursive', num_kv_heads=kv)                  # 1 + 2 x 3 + 1
  assert recursive.forward_flops_per_token(seq) == 8 * (linear + attention) + readout
  expert = module('mor', num_kv_heads=kv)
  caps = (1, 2 / 3, 1 / 3)
  hand = 2 * (linear + attention) + readout + sum(2 * (c * linear + c * c * attention) for c in caps)
  hand += 2 * d * (1 + 1 + 2 / 3)   # the routers score the candidates of each recursion
  np.testing.assert_allclose(expert.forward_flops_per_token(seq), hand, rtol=1e-12)
  shared = module('mor', num_kv_heads=kv, kv_sharing=True)
  kv_proj = 4 * d * head_dim * kv
  hand_shared = (2 * (linear + attention) + readout + 2 * (linear + attention) + 2 * d * (1 + 1 + 2 / 3)
                 + sum(2 * c * (linear - kv_proj + attention) for c in caps[1:]))
  np.testing.assert_allclose(shared.forward_flops_per_token(seq), hand_shared, rtol=1e-12)
  token = module('mor', router='token', num_kv_heads=kv)
  np.testing.assert_allclose(token.forward_flops_per_token(seq), hand - 2 * d * (1 + 1 + 2 / 3) + 2 * d * 3,
                             rtol=1e-12)
  # Against XLA's count for the vanilla model: matmuls dominate; at d = 32 XLA's count of norms, RoPE and
  # softmax adds ~15%.
  xla = jax.jit(lambda p, t: vanilla.apply({'params': p}, t)[0]).lower(
      build('llama', num_kv_heads=kv)[1], jnp.zeros((1, seq), jnp.int32)).compile().cost_analysis()['flops']
  assert 0.8 < vanilla.forward_flops_per_token(seq) * seq / xla < 1.1


def test_trains_and_samples_through_the_clis(make_config, tmp_path):
  # Token-choice with the loss-free bias: a non-parameter state that training updates and sampling reads.
  # (Expert-choice trains through the same CLI in the sharding test.)
  config = make_config('mor', **{'model.router': 'token', 'model.token_balancing': 'loss_free', 'train.steps': 4})
  workdir = str(tmp_path / 'run')
  result = run_module('train', *config_flags(config), '--workdir', workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  assert any('mor/depth_1_fraction' in m for m in metrics)
  from train import restore
  state = restore.load_run(config, workdir)[1]
  assert np.abs(state['model_state']['router_state']['bias']).max() > 0   # the bias moved
  result = run_module('train.sample', '--workdir', workdir, '--prompt', 'def ', '--max_new_tokens', '5',
                      '--temperature', '0')
  assert result.returncode == 0 and result.stdout.startswith('def '), result.stderr[-3000:]

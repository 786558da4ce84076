"""Compiling for a TPU slice from this CPU host (train.aot): the quickstart and a sharded TokenFormer compile for
the smallest topology, fit, resolve 'auto' for the TPU, and lay out every large parameter as the rule table
says (a golden file: tests/golden/tpu_specs.json, rewritten with UPDATE_GOLDEN=1)."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config

pytest.importorskip('libtpu', reason="needs libtpu: pip install -e '.[test]'")

from experiments.configs import quickstart  # noqa: E402
from models import layers  # noqa: E402
from train import aot, config as config_lib, setup as setup_lib, sharding, trainer  # noqa: E402

TOPOLOGY = 'v5e:2x2'   # the smallest slice: 4 chips
GOLDEN_SPECS = ROOT / 'tests' / 'golden' / 'tpu_specs.json'


def test_quickstart_compiles_and_fits():
  report = aot.compile_for(quickstart.get_config(), TOPOLOGY)
  assert report['fits'] and report['chips'] == 4 and report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  for step in ('train', 'eval', 'decode'):
    assert 0 < report[step]['total_bytes'] < report['capacity_bytes'], step
  # 'auto' follows the target, not this CPU host
  assert (report['dtype'], report['remat']) == ('bfloat16', 'full')
  assert 'all-reduce' in report['train']['collectives']   # the data-parallel gradient sum
  assert report['train']['pallas_kernels'] >= 2   # splash attention, forward and backward
  assert 0 < report['mfu'] < 1 and report['step_s'] > 0


def sharded_tokenformer():
  """TokenFormer with scanned layers on fsdp=2 x tensor=2: parameter tokens, embeddings and stacked layers
  all over 1 MB."""
  return tiny_config('tokenformer', **{
      'model.d_model': 256, 'model.num_heads': 4, 'model.n_attn': 1024, 'model.n_ffn': 2048, 'model.max_len': 128,
      'model.vocab_size': 2048, 'model.scan_layers': True, 'model.dtype': 'auto', 'model.remat': 'auto',
      'model.attention_impl': 'auto', 'train.seq_len': 128, 'train.batch_size': 8,
      'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2})


def test_sharded_parameters_follow_the_rule_table():
  config = sharded_tokenformer()
  setup = setup_lib.Setup(config, None, devices=aot.topology_devices(TOPOLOGY), load_data=False)
  compiled = trainer.Trainer(config, None, setup=setup).compile_train_step(setup.abstract_state,
                                                                           setup.abstract_batch())
  assert aot.memory_of(compiled)['total_bytes'] < aot.CHIPS['v5e'].hbm_bytes
  params = setup.abstract_state['params']
  compiled_params = compiled.input_shardings[0][0]['params']
  specs = {}
  for (path, leaf), compiled_sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                             jax.tree.leaves(compiled_params)):
    if leaf.size * leaf.dtype.itemsize <= 2 ** 20:
      continue
    name = jax.tree_util.keystr(path)
    assert compiled_sharding.is_equivalent_to(leaf.sharding, leaf.ndim), name
    assert not leaf.sharding.is_fully_replicated, f'{name} {leaf.shape} is on every chip whole'
    specs[name] = [list(axis) if isinstance(axis, tuple) else axis for axis in leaf.sharding.spec]
  assert len(specs) >= 5
  if os.environ.get('UPDATE_GOLDEN'):
    GOLDEN_SPECS.write_text(json.dumps(specs, indent=1, sort_keys=True) + '\n')
  assert specs == json.loads(GOLDEN_SPECS.read_text())


def test_activations_are_split_over_the_batch_axes(monkeypatch):
  """The models' activation hints (layers.constrain) take effect in the train step: without them XLA kept whole
  micro-batches on every chip under FSDP (3x the temporaries here, 11x at the paper shape on v5e:4x4)."""
  config = quickstart.get_config()
  config.model.scan_layers = True
  config.mesh.update(data=1, fsdp=4)
  temporaries = lambda: aot.compile_for(config, TOPOLOGY, eval_step=False, decode_step=False)['train']['temp_bytes']
  constrained = temporaries()
  monkeypatch.setattr(sharding, 'activation_rules', lambda mesh: contextlib.nullcontext())
  assert 2 * constrained < temporaries()


def test_a_program_that_does_not_fit_is_reported_not_raised():
  config = quickstart.get_config()   # a small model whose logits take 13 GB a chip in float32
  config.model.update(vocab_size=50304, max_len=1024)
  config.train.update(batch_size=256, seq_len=1024)
  report = aot.compile_for(config, TOPOLOGY, eval_step=False, decode_step=False)
  assert not report['fits']
  assert report['train']['needed_temp_bytes'] > report['train']['available_bytes'] > 10 * 2 ** 30
  assert 'does not fit' in aot.format_table(report)


@pytest.mark.parametrize('topology, message', [
    ('v9:2x2', 'is not CHIP:AxB[xC]'), ('v5e:3x3', 'not divisible'), ('v5e', 'is not CHIP:AxB[xC]')])
def test_bad_topology_is_one_line(topology, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace('[', r'\[')):
    aot.topology_devices(topology)


def test_cli_errors_are_one_line_and_exit_2():
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  done = subprocess.run([sys.executable, '-m', 'train.aot', '--config', 'experiments/configs/quickstart.py',
                         '--topology', TOPOLOGY, '--config.mesh.data=3'], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == ("error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 "
                                                  "devices, but 4 are available")


def test_missing_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)   # import libtpu now raises ImportError
  with pytest.raises(config_lib.ConfigError, match=r"pip install 'jax\[tpu\]=="):
    aot.topology_devices(TOPOLOGY)


def test_out_of_memory_message_is_parsed():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries '
             '(56.02G) exceeds available HBM (15.75G).')
  assert aot.out_of_memory(message) == (int(56.02 * 2 ** 30), int(15.75 * 2 ** 30))
  assert aot.out_of_memory('INVALID_ARGUMENT: something else') is None


def test_matmul_flops_counts_every_scanned_layer_and_the_costliest_branch():
  x, w = jnp.zeros((8, 16)), jnp.zeros((5, 16, 16))
  scanned = jax.make_jaxpr(lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0])(x, w)
  assert aot.matmul_flops(scanned) == 5 * 2 * 8 * 16 * 16
  branches = jax.make_jaxpr(lambda p, x: jax.lax.cond(p, lambda x: x @ x.T @ x, lambda x: x, x))(True, x)
  assert aot.matmul_flops(branches) == 2 * 8 * 16 * 8 + 2 * 8 * 8 * 16
  q = jnp.zeros((1, 384, 2, 32))   # splash: 2 heads x 3 x 3 tiles of 128, each two 128 x 32 x 128 products
  kernel = jax.make_jaxpr(lambda q: layers.dot_product_attention(q, q, q, is_causal=True, impl='splash'))(q)
  assert aot.matmul_flops(kernel) == 2 * 3 * 3 * 2 * (2 * 128 * 32 * 128)
  rematted = jax.make_jaxpr(jax.grad(lambda w: jax.checkpoint(lambda w: (x @ w).sum())(w)))(w[0])
  assert aot.matmul_flops(rematted) == 2 * (2 * 8 * 16 * 16)   # the backward's one matmul and the forward


def test_collectives_are_counted_by_kind():
  hlo = '\n'.join([
      '%all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}',
      '%ag-start = (f32[2], f32[8]) all-gather-start(f32[2]{0} %q), dimensions={0}',
      '%ag-done = f32[8]{0} all-gather-done((f32[2], f32[8]) %ag-start)',
      '%fusion = f32[8]{0} fusion(f32[8]{0} %ag-done), calls=%fused_all-reduce_like_name'])
  assert aot.collective_counts(hlo) == {'all-gather': 1, 'all-reduce': 1}


def test_cost_estimate_prefers_the_larger_bound():
  cost = {'flops': 1e12, 'bytes_accessed': 1e12, 'optimal_seconds': -5.0}
  estimate = aot.step_estimate(cost, 1e12, 5e11, peak=1e14, bandwidth=1e12, tokens_per_device=1000)
  assert estimate['step_s'] == pytest.approx(1.0) and estimate['step_source'] == 'xla roofline'   # memory-bound
  undercounted = aot.step_estimate({**cost, 'flops': 1e10}, 1e12, 5e11, peak=1e14, bandwidth=1e12,
                                   tokens_per_device=1000)
  assert undercounted['step_s'] == pytest.approx(0.01) and 'scanned' in undercounted['step_source']
  assert np.isclose(undercounted['mfu'], 0.5)

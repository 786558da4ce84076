"""The rule table on 8 forced CPU devices: a (data=2, fsdp=2, tensor=2) mesh trains like 1 device."""

import json

import pytest
from conftest import config_flags, run_module
from jax.sharding import PartitionSpec as P

import models
from train import sharding, trainer

EIGHT_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


def one_name_per_module() -> list[str]:
  """Registered names of the same module (llama, recursive and mor; byt5 and mrt5) are the same code with
  other defaults: each module trains once, under the name of its file where that is registered."""
  by_module = {}
  for name in models.names():
    module = models.model_class(name).__module__.rsplit('.', 1)[-1]
    if by_module.get(module) != module:
      by_module[module] = name
  return sorted(by_module.values())


MODELS = one_name_per_module()


@pytest.fixture(scope='module')
def specs(tmp_path_factory):
  """Every model's parameter PartitionSpecs on the 2x2x2 mesh, from one 8-device process."""
  out = run_module('_print_specs', json.dumps(MESH), str(tmp_path_factory.mktemp('specs')), ','.join(MODELS),
                   env=EIGHT_DEVICES)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_large_parameter_of_any_registered_model_is_unsharded(specs):
  assert set(specs['large_unsharded']) == set(models.names())   # at the arena's small shape (d=384)
  assert {name: paths for name, paths in specs['large_unsharded'].items() if paths} == {}


def test_mesh_shape_fills_and_rejects():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match='does not divide'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='at most one'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)


@pytest.mark.parametrize('model', MODELS)
def test_2x2x2_mesh_trains_like_one_device(model, make_config, tmp_path, specs):
  config = make_config(model, **{'train.steps': 4})
  single = trainer.Trainer(config, str(tmp_path / 'one')).run()
  sharded_config = make_config(model, **{'train.steps': 4, **MESH})
  out = run_module('train', *config_flags(sharded_config), '--workdir', str(tmp_path / 'eight'), env=EIGHT_DEVICES)
  assert out.returncode == 0, out.stderr
  losses = lambda run: [r['loss'] for r in map(json.loads, open(tmp_path / run / 'metrics.jsonl')) if 'loss' in r]
  # Step 1 sees identical parameters and data: only summation order differs (the activation hints make the
  # partitioner split contractions over fsdp and tensor). Later steps add up rounding through the optimizer,
  # hence the looser check on the last step and the evaluation. Grassmann's Plücker normalisation p / ||p||
  # turns float32 rounding of near-zero p at initialisation into a 4e-4 gap at step 1, and into 1e-3 after
  # four steps for TokenFormer's normalised Pattention scores too; MoR's gated scatter-adds over three
  # recursions reorder more sums (its step-1 gap is ~6e-6).
  step_one = {'mor': 2e-5, 'grassmann': 1e-3}.get(model, 1e-6)
  assert losses('eight')[0] == pytest.approx(losses('one')[0], rel=step_one)
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  later = 3e-3 if model in ('grassmann', 'tokenformer') else 1e-3
  assert sharded['loss'] == pytest.approx(single['loss'], rel=later)
  assert sharded['eval_loss'] == pytest.approx(single['eval_loss'], rel=later)

  # The layout the rules produce: every matrix is split over fsdp and/or tensor.
  specs = specs['tiny'][model]
  embed = {"['embed']['embedding']": P('tensor', 'fsdp')}
  expected = {
      'transformer': {**embed, "['block_0']['attention']['query']['kernel']": P('fsdp', 'tensor', None),
                      "['block_0']['mlp']['down']['kernel']": P('tensor', 'fsdp')},
      'grassmann': {**embed, "['block_0']['mixing']['plucker_proj']['kernel']": P('tensor', 'fsdp'),
                    "['block_0']['mlp']['down']['kernel']": P('tensor', 'fsdp')},
      'tokenformer': {**embed, "['block_0']['attention']['query']['keys']": P('tensor', 'fsdp'),
                      "['block_0']['ffn']['values']": P('tensor', 'fsdp')},
      'lexinvariant': {"['block_0']['attention']['query']['kernel']": P('fsdp', 'tensor', None),
                       "['position_bias']['table']": P(None, 'tensor')},   # random tables: no embedding
      'mor': {**embed, "['block_0']['attention']['key']['kernel']": P('fsdp', 'tensor', None),
              "['router_1']['kernel']": P('fsdp', None)},
      'landmark': {"['stack']['embed']['embedding']": P('tensor', 'fsdp'),
                   "['stack']['block_0']['attention']['query']['kernel']": P('fsdp', 'tensor', None),
                   "['stack']['landmark']": P('fsdp')},
      'hat': {"['byte_embed']['embedding']": P('tensor', 'fsdp'), "['word_up']['kernel']": P('fsdp', 'tensor'),
              "['backbone']['block_0']['attention']['query']['kernel']": P('fsdp', 'tensor', None),
              "['decoder']['block_0']['mlp']['down']['kernel']": P('tensor', 'fsdp')},
      'mrt5': {**embed, "['encoder_0']['self_attention']['query']['kernel']": P('fsdp', 'tensor', None),
               "['decoder_1']['cross_attention']['out']['kernel']": P('tensor', None, 'fsdp'),
               "['decoder_0']['mlp']['down']['kernel']": P('tensor', 'fsdp'), "['gate']['kernel']": P('fsdp', None),
               "['readout']['kernel']": P('fsdp', 'tensor')},
  }[model]
  assert {k: specs[k] for k in expected} == {k: str(v) for k, v in expected.items()}
  unsharded_matrices = [k for k, s in specs.items() if k.endswith(("['kernel']", "['keys']", "['values']"))
                        and s == str(P())]
  assert not unsharded_matrices

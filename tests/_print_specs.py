"""Run with 8 forced CPU devices; argv = mesh overrides (JSON), a scratch directory, comma-separated
model names. Prints {'tiny': each named model's parameter PartitionSpecs in its tiny config,
'large_unsharded': for every registered model at the arena's `small` shape, its parameters over 1 MB
left unsharded}."""
import json
import math
import os
import sys

import flax.linen as nn
import jax
from conftest import tiny_config

import models
from experiments.configs import arena
from train import setup as setup_lib, sharding

assert jax.device_count() == 8
mesh_overrides = json.loads(sys.argv[1])
specs = {}
for model in sys.argv[3].split(','):
  setup = setup_lib.Setup(tiny_config(model, **mesh_overrides), os.path.join(sys.argv[2], model))
  specs[model] = {jax.tree_util.keystr(path): str(s.spec) for path, s in
                  jax.tree_util.tree_leaves_with_path(setup.state_shardings['params'])}
mesh = sharding.make_mesh(tiny_config(**mesh_overrides).mesh)
large_unsharded = {}
for name in models.names():
  config = arena.shaped(name, **arena.shape_of('small'))
  boxed = models.abstract_variables(arena.model_of(config))['params']
  shardings = sharding.logical_shardings(boxed, mesh)
  large_unsharded[name] = [
      jax.tree_util.keystr(path) for (path, leaf), shard in
      zip(jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed)), jax.tree.leaves(shardings))
      if math.prod(leaf.shape) * leaf.dtype.itemsize > 2**20 and shard.is_fully_replicated]
print(json.dumps({'tiny': specs, 'large_unsharded': large_unsharded}))

"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters and optimizer state
sharded), tensor (Megatron-style model parallel over heads, MLP width and vocabulary).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models import layers

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axes. Parameters: vocab/embed/mlp/heads/kv/pos/norm; activations: batch,
# length, act_*. The first rule naming a logical axis wins; a mesh axis already used by an earlier
# dimension of the same array is skipped (flax semantics), so ('batch', ..., 'act_embed') stays valid.
LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('pos', None),
    ('norm', None),
    ('rank', None),          # Grassmann reduction width (small)
    ('plucker', 'tensor'),   # Grassmann Plücker features
    ('gate_in', 'tensor'),   # Grassmann gate input [h; g]
    ('ptokens', 'tensor'),   # TokenFormer parameter tokens
    ('rel_buckets', None),   # T5 relative position buckets
    ('layers', None),        # the stacked layers of a scanned stack (model.scan_layers)
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_ptokens', 'tensor'),
    ('act_vocab', 'tensor'),
)


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, int, int]:
  """Resolve -1 (fill) in (data, fsdp, tensor); raise when the mesh does not match the devices."""
  dims = [int(mesh_config[a]) for a in MESH_AXES]
  if sum(d == -1 for d in dims) > 1:
    raise ValueError('at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1')
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f'mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, dims))}')
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if n_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, dims))} does not divide the {n_devices} devices')
    dims[dims.index(-1)] = n_devices // known
  if int(np.prod(dims)) != n_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, '
                     f'but {n_devices} are available')
  return tuple(dims)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: every device of the job; a TPU topology's
  devices when compiling ahead of time, `train.aot`), laid out along the chips' interconnect."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def activation_rules(mesh: Mesh):
  """While a step is traced: the models' activation hints (`layers.constrain`) constrain on `mesh` by the
  rule table. Without them XLA alone decides how activations split, and under FSDP it kept whole
  micro-batches on every chip (16x the activations on v5e:4x4, results/tpu-aot.md)."""
  return layers.activation_sharding(mesh, LOGICAL_AXIS_RULES)


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree of (abstract) boxed variables, from their logical names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble a global array from each process's own rows."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def process_rows(global_batch_size: int) -> slice:
  """The rows of the global batch this process loads (contiguous, in process order)."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(f'train.batch_size={global_batch_size} must divide over {n} processes')
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)

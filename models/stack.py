"""The layer stack every architecture shares: the loop over blocks, rematerialisation with a named policy,
and an optional scan over layers.

A block is a Linen module called as `block(x, context)` that returns the new `x`, or `(x, extra)` when it
reports something per layer (T5's attention-score penalties). `Context` carries what every block of the
stack sees besides its input; its Python fields (train, decode, cache_slot) are static pytree metadata,
so `nn.remat` and `nn.scan` need no static argument numbers.

Rematerialisation (`model.remat`, one of REMAT_POLICIES): `none` keeps every activation; `full` keeps
only each block's input and recomputes the rest in the backward pass; `dots` keeps the matmul outputs
(recomputing the cheap elementwise work); `dots_no_batch` keeps only matmuls without batch dimensions
(the projections, not attention's scores). `auto` in a config is resolved by `train.config`: `full` on
GPU and TPU, `none` on CPU.

Scanning (`model.scan_layers`): one `nn.scan` over identical blocks, parameters stacked along a leading
`layers` axis. It compiles one block instead of `num_layers`, so compile time stops growing with depth;
the parameter tree differs from the unrolled stack's (`block/...` stacked, instead of `block_0`, ...).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

REMAT_POLICIES: dict[str, Callable | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f'model.remat={policy!r} must be one of {", ".join(REMAT_POLICIES)}')


@struct.dataclass
class Context:
  """What a block sees besides its input. Arrays (or None) are traced; the rest is static."""
  mask: jax.Array | None = None           # [batch, 1|heads, q, k] boolean, True = may attend
  positions: jax.Array | None = None      # [batch, length] token positions (RoPE, relative bias)
  bias: jax.Array | None = None           # additive attention bias [batch|1, heads, q, k]
  kv_inputs: jax.Array | None = None      # block inputs to take keys and values from instead of x
  kv_positions: jax.Array | None = None
  kv_valid: jax.Array | None = None       # [batch, kv] keys that may be attended at all
  train: bool = struct.field(pytree_node=False, default=False)
  decode: bool = struct.field(pytree_node=False, default=False)
  cache_slot: str = struct.field(pytree_node=False, default='')   # one decode cache per use of a shared block


def remat(block: type[nn.Module], policy: str, *, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`block` rematerialised under the named policy (the class itself for 'none')."""
  check_remat(policy)
  if policy == 'none':
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


class _ScanCell(nn.Module):
  """One block as a scan body: (x, context) -> (x, extra)."""
  block: type[nn.Module]
  kwargs: dict

  @nn.compact
  def __call__(self, x, context):
    out = self.block(**self.kwargs, name='block')(x, context)
    return out if isinstance(out, tuple) else (out, None)


def apply_blocks(block: type[nn.Module], x, context: Context, *, num_layers: int, remat_policy: str = 'none',
                 scan: bool = False, layer_kwargs: Callable[[int], dict] | None = None, name: str = 'block',
                 **kwargs: Any):
  """Run `num_layers` blocks `block(**kwargs, **layer_kwargs(i))` over x. Call it inside a compact method:
  unrolled, the blocks are the caller's submodules `{name}_0`, `{name}_1`, ...; scanned, one submodule
  `name` holds them stacked. Returns x, or (x, per-layer extras stacked on a leading axis) when the block
  reports extras."""
  if scan:
    if layer_kwargs is not None:
      raise ValueError('model.scan_layers needs identical layers (this model configures each layer apart)')
    cell = remat(_ScanCell, remat_policy)
    scanned = nn.scan(cell, variable_axes={True: 0}, split_rngs={True: True}, in_axes=nn.broadcast,
                      length=num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, extras = scanned(block=block, kwargs=kwargs, name=name)(x, context)
    return x if extras is None else (x, extras)
  block_cls = remat(block, remat_policy)
  extras = []
  for i in range(num_layers):
    out = block_cls(**kwargs, **(layer_kwargs(i) if layer_kwargs else {}), name=f'{name}_{i}')(x, context)
    x, extra = out if isinstance(out, tuple) else (out, None)
    extras.append(extra)
  if extras[0] is None:
    return x
  return x, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *extras)

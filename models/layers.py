"""Shared layers for every architecture.

Every parameter is created through `logical(init, axes)` so that it carries logical axis names;
`train/sharding.py` holds the one table that maps those names onto the (data, fsdp, tensor) mesh.
Logical names used here:
  vocab, embed, mlp, heads, kv (per-head width), pos (learned positions), norm (norm scales/biases).
Activations are constrained with `batch`, `length`, `act_embed`, `act_heads`, `act_mlp`, `act_vocab`.
Architectures add their own names (e.g. TokenFormer's `ptokens`), each with a rule in the table.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash,
  splash_attention_mask as splash_masks,
)

Dtype = Any
Initializer = Callable[..., jax.Array]

default_init = nn.initializers.normal(stddev=0.02)


def logical(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Wrap an initializer so the parameter it makes carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


# (mesh, logical axis rules) while a training or evaluation step is traced (`activation_sharding`).
_ACTIVATION_SHARDING = contextvars.ContextVar('activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules):
  """Within: `constrain` pins activations to `mesh` by the logical axis `rules`. Passing the mesh to each
  constraint, rather than setting a global one, leaves parameter unboxing alone (flax would constrain the
  flat kernels DenseGeneral initialises by their 3-axis names)."""
  token = _ACTIVATION_SHARDING.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation (a no-op outside `activation_sharding`)."""
  active = _ACTIVATION_SHARDING.get()
  if active is None:
    return x
  mesh, rules = active
  return nn.with_logical_constraint(x, tuple(axes), rules=rules, mesh=mesh)


def token_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general`, with a dense layer's dot (trailing lhs axes against leading rhs axes) written as one
  [tokens, in] x [in, out] matmul. XLA:CPU runs the backward of a dot over [batch, length, ...] inputs or
  [in, heads, head_dim] kernels up to 3x slower (experiments.bench); GPU and TPU compilers canonicalise a
  dense dot to this same 2-D form, and the reshapes merge or split only the sharded axes' major side."""
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  free = lhs.ndim - len(lhs_contract)
  dot = functools.partial(jax.lax.dot_general, precision=precision, preferred_element_type=preferred_element_type)
  if (lhs_batch or tuple(lhs_contract) != tuple(range(free, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(len(rhs_contract)))):
    return dot(lhs, rhs, dimension_numbers)
  inner = math.prod(lhs.shape[free:])
  out = dot(lhs.reshape(-1, inner), rhs.reshape(inner, -1), (((1,), (0,)), ((), ())))
  return out.reshape(*lhs.shape[:free], *rhs.shape[len(rhs_contract):])


def dense(features: int | Sequence[int], axes: Sequence[str | None], *, axis: int | Sequence[int] = -1,
          use_bias: bool = True, dtype: Dtype = jnp.float32, kernel_init: Initializer = default_init,
          name: str | None = None) -> nn.DenseGeneral:
  """A DenseGeneral whose kernel has logical names `axes` (input axes then output axes)."""
  n_in = 1 if isinstance(axis, int) else len(axis)
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype,
      kernel_init=logical(kernel_init, axes),
      bias_init=logical(nn.initializers.zeros_init(), axes[n_in:]), dot_general=token_dot_general,
      name=name)


def norm(kind: str, *, dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
         epsilon: float = 1e-5, name: str | None = None) -> nn.Module:
  """LayerNorm or RMSNorm with logically named parameters."""
  if kind == 'layernorm':
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_bias=use_bias, use_scale=use_scale,
                        scale_init=logical(nn.initializers.ones_init(), ('norm',)),
                        bias_init=logical(nn.initializers.zeros_init(), ('norm',)), name=name)
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, use_scale=use_scale,
                      scale_init=logical(nn.initializers.ones_init(), ('norm',)), name=name)
  raise ValueError(f'unknown norm {kind!r} (layernorm or rmsnorm)')


class Embed(nn.Module):
  """Token embedding; `attend` gives the tied readout logits."""
  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_init

  def setup(self):
    self.embedding = self.param('embedding', logical(self.embedding_init, ('vocab', 'embed')),
                                (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return constrain(x, ('batch', 'length', 'act_embed'))

  def attend(self, x: jax.Array) -> jax.Array:
    logits = jnp.einsum('...d,vd->...v', x, self.embedding.astype(self.dtype))
    return constrain(logits, ('batch', 'length', 'act_vocab'))


class LearnedPositions(nn.Module):
  max_len: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    table = self.param('embedding', logical(default_init, ('pos', 'embed')),
                       (self.max_len, self.features), jnp.float32)
    return jnp.take(table, positions, axis=0).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0, fraction: float = 1.0) -> jax.Array:
  """Rotary position embedding on the first `fraction` of the head dims.

  x: [batch, length, heads, head_dim]; positions: [batch, length] (any integers, so tokens can keep
  their original positions after being gathered or deleted).
  """
  head_dim = x.shape[-1]
  rot = int(head_dim * fraction) // 2 * 2
  if rot == 0:
    return x
  freqs = base ** (-jnp.arange(0, rot, 2, dtype=jnp.float32) / rot)            # [rot/2]
  angles = positions[..., None].astype(jnp.float32) * freqs                    # [b, l, rot/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]   # [b, l, 1, rot/2]
  x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
  x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return jnp.concatenate([rotated, x_pass], axis=-1)


def relative_position_bucket(relative: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's buckets for key position - query position: exact for small distances, logarithmic up to
  `max_distance`, one bucket beyond. Bidirectional splits the buckets between the two directions."""
  distance = -relative                      # > 0: the key is in the past
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (distance < 0) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  exact = num_buckets // 2
  log_scaled = exact + (jnp.log(jnp.maximum(distance, 1) / exact) / jnp.log(max_distance / exact)
                        * (num_buckets - exact)).astype(relative.dtype)
  return bucket + jnp.where(distance < exact, distance, jnp.minimum(log_scaled, num_buckets - 1))


class RelativePositionBias(nn.Module):
  """T5 relative position bias: a learned scalar per (bucket, head), added to the attention logits."""
  num_heads: int
  bidirectional: bool = False
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[batch, q], [batch, k] -> bias [batch, heads, q, k]."""
    table = self.param('table', logical(default_init, ('rel_buckets', 'heads')), (self.num_buckets, self.num_heads),
                       jnp.float32)
    buckets = relative_position_bucket(k_positions[:, None, :] - q_positions[:, :, None],
                                       bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    return jnp.moveaxis(table[buckets], -1, 1)


def sequence_positions(module: nn.Module, length: int, decode: bool) -> jax.Array:
  """[1, length] positions of the tokens fed now: 0.. in a forward pass; when decoding they continue
  from a count kept in `module`'s 'cache' collection."""
  positions = jnp.arange(length)[None]
  if not decode:
    return positions
  index = module.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
  positions = positions + index.value
  if not module.is_initializing():
    index.value = index.value + length
  return positions


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """[batch, 1, q, k] boolean mask: key position <= query position."""
  return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


def padding_mask(q_valid: jax.Array, k_valid: jax.Array) -> jax.Array:
  """[batch, 1, q, k] boolean mask from per-position validity."""
  return q_valid[:, None, :, None] & k_valid[:, None, None, :]


def reference_attention(q, k, v, mask=None, bias=None):
  """Plain softmax attention, the naive reference for every fast path.

  q: [b, q, h, d], k/v: [b, k, h, d], mask: bool broadcastable to [b, h, q, k], bias: additive, same.
  A query whose keys are all masked gets zeros.
  """
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
  if bias is not None:
    scores = scores + bias
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  weights = jnp.nan_to_num(weights)   # rows with every key masked
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


# `model.attention_impl`; `auto` in a config is resolved by `train.config` for the target platform
# (einsum on CPU, splash on TPU, fused on GPU).
ATTENTION_IMPLS = ('reference', 'einsum', 'fused', 'xla', 'cudnn', 'splash')
SPLASH_BLOCKS = (512, 256, 128)   # the splash kernel's tile along both lengths: the largest dividing them


def check_attention_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl={impl!r} must be one of {", ".join(ATTENTION_IMPLS)}')


def dot_product_attention(q, k, v, mask=None, bias=None, is_causal: bool = False, impl: str = 'fused'):
  """Attention over [b, q|k, h, d] by the named implementation (`ATTENTION_IMPLS`):
    reference  `reference_attention`, the naive definition every other path is tested against
    einsum     two einsums and a softmax: on CPU the fused path's forward and backward ran 2.5x slower
               at 2,048 tokens (results/bench-cpu-before.md)
    fused      `jax.nn.dot_product_attention`, which picks cuDNN flash attention on GPU where shapes
               allow and XLA elsewhere; `is_causal` masks by index inside the kernel (no [q, k] mask)
    xla, cudnn `jax.nn.dot_product_attention` forced to that implementation
    splash     TPU: the Pallas splash kernel (`splash_attention`) for causal self-attention without mask or
               bias, at lengths that are a multiple of 128; `fused` (XLA) for every other call
  A query with every key masked averages the values (zeros for `reference`)."""
  if impl == 'splash':
    self_attention = q.shape[1] == k.shape[1] and q.shape[1] % SPLASH_BLOCKS[-1] == 0
    if is_causal and mask is None and bias is None and self_attention:
      return splash_attention(q, k, v)
    impl = 'fused'
  if impl in ('fused', 'xla', 'cudnn'):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal,
                                        implementation=None if impl == 'fused' else impl)
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    mask = causal if mask is None else mask & causal
  if impl == 'reference':
    return reference_attention(q, k, v, mask=mask, bias=bias)
  # einsum. Not `reference_attention`: its -inf fill and NaN clean-up make the backward 40% slower at 128 tokens.
  scores = jnp.einsum('bqhd,bkhd->bhqk', q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
  if bias is not None:
    scores = scores + bias
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


def splash_attention(q, k, v):
  """Causal attention over [b, len, h, d] (as many key as query heads) by the Pallas TPU splash kernel: it
  skips the blocks above the diagonal and never materialises [len, len] scores, forward or backward. Under
  `activation_sharding` it runs on each shard of the batch and heads (shard_map: a Pallas kernel is not
  partitioned by XLA); on a CPU mesh or host it runs in the Pallas interpreter (the tests)."""
  length, head_dim = q.shape[1], q.shape[-1]
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  active = _ACTIVATION_SHARDING.get()
  platform = active[0].devices.flat[0].platform if active else jax.default_backend()
  if platform not in ('tpu', 'cpu'):
    raise ValueError(f'model.attention_impl=splash is a TPU kernel (on {platform}: fused or cudnn)')

  def attend(q, k, v):   # [b, h, len, d] on one shard
    kernel = splash.make_splash_mha(
        splash_masks.MultiHeadMask([splash_masks.CausalMask((length, length))] * q.shape[1]), head_shards=1,
        q_seq_shards=1,
        block_sizes=splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                      block_kv_dq=block),
        interpret=platform != 'tpu')
    return jax.vmap(kernel)(q, k, v)

  if active:
    mesh, rules = active
    spec = nn.logical_to_mesh_axes(('batch', 'act_heads', None, None), rules)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = attend(heads_first(q * head_dim ** -0.5), heads_first(k), heads_first(v))
  return heads_first(out)


class Attention(nn.Module):
  """Multi-head (optionally grouped-query) attention with optional RoPE and a KV cache.

  mask: boolean [batch, 1|heads, q, k] (True = may attend). With `decode=True` the layer keeps
  `cached_key`/`cached_value`/`cache_index` in the 'cache' collection; feed a prompt chunk first,
  then one token at a time; the mask is then built from positions (causal). `kv_valid` [batch, kv]
  marks keys that may be attended at all (kept with the cache when decoding); `cache_slot` suffixes the
  cache names, so that one layer applied several times (shared recursive layers) keeps a cache per use.
  `causal`: without a mask, query i attends keys 0..i by index (the fused kernel's causal mode; the
  positions must be the indices, as in a plain decoder); decoding still masks by cache position.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  use_bias: bool = True
  use_rope: bool = False
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  out_init: Initializer = default_init
  causal: bool = False
  impl: str = 'fused'   # ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x, kv_inputs=None, *, mask=None, bias=None, positions=None, kv_positions=None,
               kv_valid=None, decode: bool = False, train: bool = False, cache_slot: str = ''):
    kv_inputs = x if kv_inputs is None else kv_inputs
    kv_heads = self.num_kv_heads or self.num_heads
    q = self.project_in(x, self.num_heads, 'query')
    k = self.project_in(kv_inputs, kv_heads, 'key')
    v = self.project_in(kv_inputs, kv_heads, 'value')
    batch, length = x.shape[0], x.shape[1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if decode:
      k, v, positions, kv_positions, mask, kv_valid = self._update_cache(k, v, positions.shape[1], kv_valid,
                                                                         cache_slot)
    elif kv_positions is None:
      kv_positions = positions if kv_inputs is x else jnp.broadcast_to(
          jnp.arange(kv_inputs.shape[1]), kv_inputs.shape[:2])
    is_causal = self.causal and not decode
    if is_causal and (mask is not None or kv_valid is not None):
      raise ValueError('causal attention takes no other mask')
    if kv_valid is not None:
      valid = kv_valid[:, None, None, :]
      mask = valid if mask is None else mask & valid
    if self.use_rope:
      q = rope(q, positions, base=self.rope_base, fraction=self.rope_fraction)
      if not decode:   # cached keys were rotated when written
        k = rope(k, kv_positions, base=self.rope_base, fraction=self.rope_fraction)
    if kv_heads != self.num_heads:
      k = jnp.repeat(k, self.num_heads // kv_heads, axis=2)
      v = jnp.repeat(v, self.num_heads // kv_heads, axis=2)
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    out = dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal, impl=self.impl)
    out = nn.Dropout(self.dropout)(out, deterministic=not train)
    return constrain(self.project_out(out, x.shape[-1]), ('batch', 'length', 'act_embed'))

  # The projections; an architecture with other projections (TokenFormer's Pattention) overrides these.
  def project_in(self, x, heads: int, name: str) -> jax.Array:
    """[batch, length, embed] -> [batch, length, heads, head_dim]."""
    return dense((heads, self.head_dim), ('embed', 'heads', 'kv'), use_bias=self.use_bias, dtype=self.dtype,
                 name=name)(x)

  def project_out(self, out, features: int) -> jax.Array:
    """[batch, length, heads, head_dim] -> [batch, length, features]."""
    return dense(features, ('heads', 'kv', 'embed'), axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                 kernel_init=self.out_init, name='out')(out)

  def _update_cache(self, k, v, length, kv_valid, slot):
    """Write the new keys/values (and validity) at the cache index; return the full cache, positions, causal
    mask and key validity."""
    index = cache_index(self, slot)
    start = index.value
    q_positions = jnp.broadcast_to(start + jnp.arange(length), k.shape[:1] + (length,))
    if self.use_rope and not self.is_initializing():   # store keys already rotated at their absolute positions
      k = rope(k, q_positions, base=self.rope_base, fraction=self.rope_fraction)
    full = append_to_cache(self, index, slot, key=k, value=v, **({} if kv_valid is None else {'valid': kv_valid}))
    k_positions = jnp.broadcast_to(jnp.arange(full['key'].shape[1]), k.shape[:1] + full['key'].shape[1:2])
    return (full['key'], full['value'], q_positions, k_positions, causal_mask(q_positions, k_positions),
            full.get('valid'))


def cache_index(module: nn.Module, slot: str = '') -> nn.Variable:
  """The count of positions written to `module`'s decode cache (`slot`: one cache per use of the module)."""
  return module.variable('cache', f'cache_index{slot}', lambda: jnp.zeros((), jnp.int32))


def append_to_cache(module: nn.Module, index: nn.Variable, slot: str = '', **new: jax.Array) -> dict[str, jax.Array]:
  """Write each `new` array [batch, length, ...] into `module`'s cache `cached_{name}{slot}` at `index` (its
  `cache_index`) and advance it; return the whole caches. Initialising, the caches take the new arrays'
  shapes (the decode length) and the new arrays come back unchanged."""
  caches = {name: module.variable('cache', f'cached_{name}{slot}', jnp.zeros, x.shape, x.dtype)
            for name, x in new.items()}
  if module.is_initializing():
    return new
  write = lambda cache, x: jax.lax.dynamic_update_slice(cache, x.astype(cache.dtype),
                                                        (0, index.value) + (0,) * (cache.ndim - 2))
  for name, x in new.items():
    caches[name].value = write(caches[name].value, x)
  index.value = index.value + next(iter(new.values())).shape[1]
  return {name: cache.value for name, cache in caches.items()}


class Mlp(nn.Module):
  """Feed-forward: `gelu` (two matrices), or gated with three: `swiglu`, `geglu` (T5.1.1's gated GELU)."""
  hidden: int
  kind: str = 'gelu'
  use_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  out_init: Initializer = default_init
  in_init: Initializer = default_init

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    up = dense(self.hidden, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.in_init,
               name='up')(x)
    if self.kind == 'gelu':
      h = nn.gelu(up, approximate=False)
    elif self.kind in ('swiglu', 'geglu'):
      gate = dense(self.hidden, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.in_init,
                   name='gate')(x)
      h = (nn.silu(gate) if self.kind == 'swiglu' else nn.gelu(gate, approximate=True)) * up
    else:
      raise ValueError(f'unknown mlp kind {self.kind!r} (gelu, swiglu or geglu)')
    h = constrain(h, ('batch', 'length', 'act_mlp'))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    out = dense(x.shape[-1], ('mlp', 'embed'), use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.out_init,
                name='down')(h)
    return constrain(out, ('batch', 'length', 'act_embed'))


def mlp_matmul_params(d_model: int, hidden: int, kind: str) -> int:
  """Weights in one feed-forward (for analytic FLOPs)."""
  return (3 if kind in ('swiglu', 'geglu') else 2) * d_model * hidden


# Analytic parameter counts of the shared layers (each model's `analytic_param_count` adds them up).

def norm_param_count(kind: str, width: int, *, use_bias: bool = True, use_scale: bool = True) -> int:
  return width * (use_scale + (use_bias and kind == 'layernorm'))


def mlp_param_count(d_model: int, hidden: int, kind: str, *, use_bias: bool) -> int:
  gated = kind in ('swiglu', 'geglu')
  return mlp_matmul_params(d_model, hidden, kind) + use_bias * ((1 + gated) * hidden + d_model)


def attention_param_count(d_model: int, num_heads: int, *, use_bias: bool, num_kv_heads: int | None = None) -> int:
  """Query, key, value and output projections with head width d_model / num_heads."""
  inner = d_model // num_heads * num_heads
  kv_inner = d_model // num_heads * (num_kv_heads or num_heads)
  return 2 * d_model * (inner + kv_inner) + use_bias * (inner + 2 * kv_inner + d_model)


def block_param_count(d_model: int, num_heads: int, d_ff: int, *, norm: str, mlp: str, use_bias: bool,
                      num_kv_heads: int | None = None) -> int:
  """One `Block`."""
  return (attention_param_count(d_model, num_heads, use_bias=use_bias, num_kv_heads=num_kv_heads)
          + mlp_param_count(d_model, d_ff, mlp, use_bias=use_bias)
          + 2 * norm_param_count(norm, d_model, use_bias=use_bias))


def decoder_flops_per_token(d_model: int, num_layers: int, d_ff: int, mlp: str, vocab_size: int,
                            seq_len: int) -> float:
  """Forward matmul FLOPs per token of a stack of `Block`s with a (tied or not) readout."""
  per_layer = 2 * (4 * d_model ** 2 + mlp_matmul_params(d_model, d_ff, mlp))
  per_layer += 2 * d_model * seq_len   # QK^T and AV: 2 * 2 * d * T per token, halved for the causal mask
  return num_layers * per_layer + 2 * d_model * vocab_size


def residual_init(num_layers: int) -> Initializer:
  """GPT-2's init of the projections into the residual stream: N(0, 0.02 / sqrt(2 * layers))."""
  return nn.initializers.normal(0.02 / math.sqrt(2 * num_layers))


class Block(nn.Module):
  """Attention then feed-forward, each around a residual: pre-norm (x + f(norm(x))) or post-norm
  (norm(x + f(x)), the original Transformer). Called as `block(x, context)` (`models.stack.Context`):
  the context's mask, positions, bias and key/value inputs (normalised here like x) go to `Attention`."""
  d_model: int
  num_heads: int
  d_ff: int
  prenorm: bool = True
  norm: str = 'layernorm'
  mlp: str = 'gelu'
  use_rope: bool = False
  use_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  out_init: Initializer = default_init
  num_kv_heads: int | None = None   # grouped-query attention
  causal: bool = False              # mask=None attends causally by index (Attention.causal)
  attention_impl: str = 'fused'

  @nn.compact
  def __call__(self, x, context):
    c = context
    attention = Attention(
        num_heads=self.num_heads, head_dim=self.d_model // self.num_heads, num_kv_heads=self.num_kv_heads,
        use_rope=self.use_rope, use_bias=self.use_bias, dropout=self.dropout, dtype=self.dtype,
        out_init=self.out_init, causal=self.causal, impl=self.attention_impl, name='attention')
    mlp = Mlp(hidden=self.d_ff, kind=self.mlp, use_bias=self.use_bias, dropout=self.dropout, dtype=self.dtype,
              out_init=self.out_init, name='mlp')
    norm1 = norm(self.norm, dtype=self.dtype, use_bias=self.use_bias, name='norm1')
    norm2 = norm(self.norm, dtype=self.dtype, use_bias=self.use_bias, name='norm2')
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not c.train)
    attend = lambda y, kv=None: attention(y, kv, mask=c.mask, bias=c.bias, positions=c.positions,
                                          kv_positions=c.kv_positions, kv_valid=c.kv_valid, decode=c.decode,
                                          train=c.train, cache_slot=c.cache_slot)
    if self.prenorm:
      x = x + drop(attend(norm1(x), None if c.kv_inputs is None else norm1(c.kv_inputs)))
      return x + drop(mlp(norm2(x), train=c.train))
    x = norm1(x + drop(attend(x, c.kv_inputs)))
    return norm2(x + drop(mlp(x, train=c.train)))


"""Causal Grassmann LM: attention-free sequence mixing through Plücker coordinates
("Attention Is Not What You Need", arXiv 2512.19428; ../shared/specs/grassmann-tokenformer-mor.md §1).

Mixing at position t (decisions where the paper is ambiguous, each a config switch):
  z_t = W_red h_t + b_red                                    (d -> r)
  for each offset Δ of the layer with t - Δ >= 0: p = Plücker(z_t, z_{t-Δ})  (C(r,2) features; the
    partner is t - Δ, never t + Δ, which would leak the future), normalised p / max(||p||, eps)
  g_t = W_plü mean_Δ(p̂) + b_plü; g_t = 0 where no offset has a partner (t < min offset).
    W_plü is shared over offsets, so averaging before projecting equals projecting then averaging
    (tested) and costs one projection instead of |offsets|.
  α_t = σ(W_gate [h_t; g_t] + b_gate);  mix_t = α_t h_t + (1 - α_t) g_t
Block, post-LN (paper): ĥ = Dropout(LN(mix(h))); out = LN(ĥ + Dropout(FFN(ĥ))).
Block, pre-LN (`prenorm=True`): h = x + Dropout(mix(LN(x)) - LN(x)); out = h + Dropout(FFN(LN(h))), so the
  residual stream carries x and the mixer contributes its blend's change.
Offsets: `schedule='all'` uses every entry of `offsets` in every layer (6-layer paper model);
  `schedule='per_layer'` gives layer i the single offset offsets[i] (the 12-layer list 1,1,2,2,...,16,16).
Cost is O(L * (d r + r² + d²)) per layer: no L x L tensor, static shapes. Decoding keeps each layer's last
max(offsets) reduced vectors (`cached_mean_plucker`), so a generated token costs the same at any length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, stack
from models.registry import LanguageModel, register

PAPER_OFFSETS = (1, 2, 4, 8, 12, 16)
PAPER_12_LAYER_SCHEDULE = (1, 1, 2, 2, 4, 4, 8, 8, 12, 12, 16, 16)


def plucker(u: jax.Array, v: jax.Array) -> jax.Array:
  """Plücker coordinates p_ij = u_i v_j - u_j v_i over i < j (row-major) of the plane spanned by u, v.

  Built from static slices, one row i at a time: an index-array gather would turn into a scatter-add
  in the backward pass, which is slow on XLA:CPU.
  """
  rows = [u[..., i:i + 1] * v[..., i + 1:] - u[..., i + 1:] * v[..., i:i + 1] for i in range(u.shape[-1] - 1)]
  return jnp.concatenate(rows, axis=-1)


def normalise(p: jax.Array, eps: float) -> jax.Array:
  """p / max(||p||, eps), written so the gradient at p = 0 (a position without a partner) is finite."""
  return p * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(p), axis=-1, keepdims=True), eps * eps))


def shift_right(z: jax.Array, offset: int) -> jax.Array:
  """z_{t - offset} at position t (zeros where t < offset), along axis 1."""
  return jnp.pad(z, ((0, 0), (offset, 0), (0, 0)))[:, :z.shape[1]]


def mean_plucker(z: jax.Array, offsets: tuple[int, ...], eps: float) -> tuple[jax.Array, jax.Array]:
  """(mean over valid offsets of the normalised Plücker features [b, l, C(r,2)], valid count [l])."""
  length = z.shape[1]
  positions = jnp.arange(length)
  total = jnp.zeros((*z.shape[:2], z.shape[-1] * (z.shape[-1] - 1) // 2), z.dtype)
  count = jnp.zeros(length, z.dtype)
  for offset in offsets:
    if offset >= length:
      continue
    p = normalise(plucker(z, shift_right(z, offset)).astype(jnp.float32), eps)
    valid = (positions >= offset).astype(z.dtype)
    total = total + p.astype(z.dtype) * valid[None, :, None]
    count = count + valid
  return total / jnp.maximum(count, 1)[None, :, None], count


def reference_mean_plucker(z: jax.Array, offsets: tuple[int, ...], eps: float) -> tuple[jax.Array, jax.Array]:
  """`mean_plucker` written from the definition: each position gathers its partner t - Δ by index, the
  coordinates p_ij = u_i v_j - u_j v_i over an index list of the pairs i < j, p / max(||p||, eps), and the
  mean over the offsets whose partner exists. The naive reference of the fast path (`mixing_impl`)."""
  length, rank = z.shape[1], z.shape[-1]
  i, j = jnp.triu_indices(rank, k=1)
  positions = jnp.arange(length)
  features, valid = [], []
  for offset in offsets:
    u, v = z, jnp.take(z, jnp.maximum(positions - offset, 0), axis=1)
    p = (u[..., i] * v[..., j] - u[..., j] * v[..., i]).astype(jnp.float32)
    features.append(p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), eps))
    valid.append(positions >= offset)
  valid = jnp.stack(valid).astype(jnp.float32)                       # [offsets, length]
  count = valid.sum(0)
  total = jnp.einsum('obld,ol->bld', jnp.stack(features), valid)
  return (total / jnp.maximum(count, 1)[None, :, None]).astype(z.dtype), count.astype(z.dtype)


MIXING_IMPLS = {'shifted': mean_plucker, 'reference': reference_mean_plucker}


def cached_mean_plucker(z: jax.Array, history: jax.Array, start: jax.Array, offsets: tuple[int, ...],
                        eps: float) -> tuple[jax.Array, jax.Array]:
  """`mean_plucker` of the new reduced vectors z [b, n, r] at positions start.., their partners read from
  `history` [b, max(offsets), r] (the vectors of the positions just before them) or from z itself."""
  extended = jnp.concatenate([history, z], axis=1)
  span, length = history.shape[1], z.shape[1]
  positions = start + jnp.arange(length)
  total = jnp.zeros((*z.shape[:2], z.shape[-1] * (z.shape[-1] - 1) // 2), z.dtype)
  count = jnp.zeros(length, z.dtype)
  for offset in offsets:
    partner = extended[:, span - offset:span - offset + length]
    valid = (positions >= offset).astype(z.dtype)
    total = total + normalise(plucker(z, partner).astype(jnp.float32), eps).astype(z.dtype) * valid[None, :, None]
    count = count + valid
  return total / jnp.maximum(count, 1)[None, :, None], count


class GrassmannMixing(nn.Module):
  """With `decode=True` the layer keeps the last max(offsets) reduced vectors in the 'cache' collection:
  O(1) work per generated token, whatever the length so far; `positions` [batch, n] are the new tokens'."""
  d_model: int
  rank: int
  offsets: tuple[int, ...]
  eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  impl: str = 'shifted'   # MIXING_IMPLS

  @nn.compact
  def __call__(self, h, *, positions=None, decode: bool = False):
    z = layers.dense(self.rank, ('embed', 'rank'), dtype=self.dtype, name='reduce')(h)
    if decode:
      history = self.variable('cache', 'history', jnp.zeros, (z.shape[0], max(self.offsets), self.rank), z.dtype)
      p_mean, count = cached_mean_plucker(z, history.value, positions[0, 0], self.offsets, self.eps)
      if not self.is_initializing():
        history.value = jnp.concatenate([history.value, z], axis=1)[:, -history.value.shape[1]:]
    else:
      p_mean, count = MIXING_IMPLS[self.impl](z, self.offsets, self.eps)
    g = layers.dense(self.d_model, ('plucker', 'embed'), dtype=self.dtype, name='plucker_proj')(p_mean)
    g = g * (count > 0).astype(g.dtype)[None, :, None]
    gate_in = jnp.concatenate([h, g], axis=-1)
    alpha = nn.sigmoid(layers.dense(self.d_model, ('gate_in', 'embed'), dtype=self.dtype, name='gate')(gate_in))
    return layers.constrain(alpha * h + (1 - alpha) * g, ('batch', 'length', 'act_embed'))


class GrassmannBlock(nn.Module):
  d_model: int
  d_ff: int
  rank: int
  offsets: tuple[int, ...]
  prenorm: bool
  eps: float
  dropout: float
  dtype: layers.Dtype
  mixing_impl: str = 'shifted'

  @nn.compact
  def __call__(self, x, context):
    train = context.train
    mixing = GrassmannMixing(d_model=self.d_model, rank=self.rank, offsets=self.offsets, eps=self.eps,
                             dtype=self.dtype, impl=self.mixing_impl, name='mixing')
    mix = lambda y: mixing(y, positions=context.positions, decode=context.decode)
    mlp = layers.Mlp(self.d_ff, dtype=self.dtype, name='mlp')
    norm1 = layers.norm('layernorm', dtype=self.dtype, name='norm1')
    norm2 = layers.norm('layernorm', dtype=self.dtype, name='norm2')
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    if self.prenorm:
      y = norm1(x)
      x = x + drop(mix(y) - y)
      return x + drop(mlp(norm2(x), train=train))
    h = drop(norm1(mix(x)))
    return norm2(h + drop(mlp(h, train=train)))


@register('grassmann')
class GrassmannLM(LanguageModel):
  """Causal Grassmann LM: token + learned position embeddings, Grassmann blocks, tied readout."""
  # paper: the 12-layer model of Table 2 (spec grassmann-tokenformer-mor.md §1.2)
  presets = {'tiny': dict(d_model=32, num_layers=2, d_ff=64, max_len=32, rank=8, offsets=(1, 2, 4), dropout=0.0),
             'paper': dict(d_model=256, num_layers=12, d_ff=1024, max_len=256, rank=32, schedule='per_layer',
                           offsets=(1, 1, 2, 2, 4, 4, 8, 8, 12, 12, 16, 16), prenorm=False, dropout=0.1)}

  @classmethod
  def arena_layout(cls, *, d_model, depth, heads):
    return dict(num_layers=depth, d_ff=4 * d_model, rank=d_model // 8)
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 6
  d_ff: int = 1024
  rank: int = 32
  offsets: tuple = PAPER_OFFSETS
  schedule: str = 'all'        # 'all': every offset in every layer; 'per_layer': offsets[i] in layer i
  prenorm: bool = False        # the paper's block is post-LN
  eps: float = 1e-6
  max_len: int = 1024
  dropout: float = 0.1
  dtype: str = 'float32'
  mixing_impl: str = 'shifted'   # shifted (static shifts and slices) | reference (gathers by index)
  remat: str = 'none'            # stack.REMAT_POLICIES
  scan_layers: bool = False      # schedule='all' only: per_layer gives every layer its own offset

  def validate(self):
    super().validate()
    stack.check_remat(self.remat)
    if self.mixing_impl not in MIXING_IMPLS:
      raise ValueError(f'model.mixing_impl={self.mixing_impl!r} must be one of {", ".join(MIXING_IMPLS)}')
    if self.scan_layers and self.schedule == 'per_layer':
      raise ValueError('model.scan_layers needs identical layers: use model.schedule=all')
    if self.schedule not in ('all', 'per_layer'):
      raise ValueError(f"model.schedule={self.schedule!r} must be 'all' or 'per_layer'")
    if self.schedule == 'per_layer' and len(self.offsets) != self.num_layers:
      raise ValueError(f'model.schedule=per_layer needs one offset per layer: {len(self.offsets)} offsets '
                       f'for model.num_layers={self.num_layers}')
    if not self.offsets or min(self.offsets) < 1:
      raise ValueError(f'model.offsets={tuple(self.offsets)} must be positive (the partner of t is t - offset)')
    if self.rank < 2:
      raise ValueError(f'model.rank={self.rank} must be at least 2')

  def layer_offsets(self, layer: int) -> tuple[int, ...]:
    return (self.offsets[layer],) if self.schedule == 'per_layer' else tuple(self.offsets)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False):
    dtype = jnp.dtype(self.dtype)
    embed = layers.Embed(self.vocab_size, self.d_model, dtype=dtype, name='embed')
    positions = jnp.broadcast_to(layers.sequence_positions(self, tokens.shape[1], decode), tokens.shape)
    x = embed(tokens) + layers.LearnedPositions(self.max_len, self.d_model, dtype=dtype, name='pos_embed')(positions)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    per_layer = self.schedule == 'per_layer'
    x = stack.apply_blocks(
        GrassmannBlock, x, stack.Context(positions=positions, train=train, decode=decode),
        num_layers=self.num_layers, remat_policy=self.remat,
        scan=self.scan_layers, layer_kwargs=(lambda i: {'offsets': self.layer_offsets(i)}) if per_layer else None,
        **({} if per_layer else {'offsets': tuple(self.offsets)}), d_model=self.d_model, d_ff=self.d_ff,
        rank=self.rank, prenorm=self.prenorm, eps=self.eps, dropout=self.dropout, dtype=dtype,
        mixing_impl=self.mixing_impl)
    x = layers.norm('layernorm', dtype=dtype, name='final_norm')(x)
    return embed.attend(x).astype(jnp.float32), {}

  def analytic_param_count(self) -> int:
    d, r = self.d_model, self.rank
    mixing = (d * r + r) + (r * (r - 1) // 2 * d + d) + (2 * d * d + d)   # reduce, Plücker projection, gate
    block = mixing + layers.mlp_param_count(d, self.d_ff, 'gelu', use_bias=True) + 2 * layers.norm_param_count(
        'layernorm', d)
    return (self.vocab_size + self.max_len) * d + self.num_layers * block + layers.norm_param_count('layernorm', d)

  def forward_flops_per_token(self, seq_len: int) -> float:
    n_plucker = self.rank * (self.rank - 1) // 2
    per_layer = 0
    for i in range(self.num_layers):
      n_offsets = len([o for o in self.layer_offsets(i) if o < seq_len])
      per_layer += 2 * (self.d_model * self.rank + n_plucker * self.d_model + 2 * self.d_model * self.d_model
                        + 2 * self.d_model * self.d_ff) + 3 * n_plucker * n_offsets   # 2 products + a difference
    return per_layer + 2 * self.d_model * self.vocab_size


class WindowedGrassmannMixing(nn.Module):
  """Bidirectional multi-head Grassmann mixing for encoders: tokens are grouped in non-overlapping
  windows (stride = window); each token pairs with every other valid token of its window, per head."""
  d_model: int
  d_proj: int
  num_heads: int
  window: int
  eps: float = 1e-6

  @nn.compact
  def __call__(self, h, mask):
    batch, length, _ = h.shape
    pad = -length % self.window
    h_pad = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(mask, ((0, 0), (0, pad))).reshape(batch, -1, self.window)               # [b, n, w]
    rank = self.d_proj // self.num_heads
    z = layers.dense((self.num_heads, rank), ('embed', 'heads', 'rank'), name='reduce')(h_pad)
    z = z.reshape(batch, -1, self.window, self.num_heads, rank)                              # [b, n, w, H, r]
    p = normalise(plucker(z[:, :, :, None], z[:, :, None, :]), self.eps)                      # [b, n, w, w, H, C]
    pair_ok = valid[:, :, :, None] & valid[:, :, None, :] & ~jnp.eye(self.window, dtype=bool)
    weights = pair_ok.astype(h.dtype)[..., None, None]
    p_mean = (p * weights).sum(3) / jnp.maximum(weights.sum(3), 1)                          # [b, n, w, H, C]
    g = layers.dense(self.d_model, ('heads', 'plucker', 'embed'), axis=(-2, -1), name='plucker_proj')(p_mean)
    g = (g * pair_ok.any(-1)[..., None]).reshape(batch, -1, self.d_model)[:, :length]
    alpha = nn.sigmoid(layers.dense(self.d_model, ('gate_in', 'embed'), name='gate')(jnp.concatenate([h, g], -1)))
    return alpha * h + (1 - alpha) * g



class GrassmannPairHead(nn.Module):
  """The paper's SNLI head, on top of any encoder's token features (frozen or not).

  Our reading of its description (d_proj=64, window 8 stride 8, d_model=256, 2 mixing layers, 4 mixing
  heads, d_ff=512): project features to d_model; `num_layers` post-LN blocks of windowed multi-head
  Grassmann mixing + GELU feed-forward, shared by both sentences; masked mean pooling to u, v; the
  normalised Plücker coordinates of the pair (u, v) reduced to d_proj, projected to d_model; a 2-layer
  classifier over [u, v, |u - v|, u * v, pair feature].
  """
  num_classes: int = 3
  d_model: int = 256
  d_proj: int = 64
  window: int = 8
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 512
  dropout: float = 0.1
  eps: float = 1e-6

  def setup(self):
    self.input_proj = layers.dense(self.d_model, ('embed', 'mlp'), name='input_proj')
    self.mixers = [WindowedGrassmannMixing(self.d_model, self.d_proj, self.num_heads, self.window, self.eps,
                                           name=f'mixing_{i}') for i in range(self.num_layers)]
    self.mlps = [layers.Mlp(self.d_ff, name=f'mlp_{i}') for i in range(self.num_layers)]
    self.norms = [(layers.norm('layernorm', name=f'norm1_{i}'), layers.norm('layernorm', name=f'norm2_{i}'))
                  for i in range(self.num_layers)]
    self.pair_reduce = layers.dense(self.d_proj, ('embed', 'rank'), name='pair_reduce')
    self.pair_proj = layers.dense(self.d_model, ('plucker', 'embed'), name='pair_proj')
    self.hidden = layers.dense(self.d_model, ('mlp', 'embed'), name='hidden')
    self.classify = layers.dense(self.num_classes, ('embed', None), name='classify')
    self.drop = nn.Dropout(self.dropout)

  def encode(self, features, mask, train):
    h = self.input_proj(features)
    for mix, mlp, (norm1, norm2) in zip(self.mixers, self.mlps, self.norms):
      h = self.drop(norm1(mix(h, mask)), deterministic=not train)
      h = norm2(h + self.drop(mlp(h, train=train), deterministic=not train))
    weights = mask.astype(h.dtype)[..., None]
    return (h * weights).sum(1) / jnp.maximum(weights.sum(1), 1)

  def __call__(self, premise, premise_mask, hypothesis, hypothesis_mask, *, train: bool = False):
    u = self.encode(premise, premise_mask, train)
    v = self.encode(hypothesis, hypothesis_mask, train)
    p = plucker(self.pair_reduce(u), self.pair_reduce(v))
    pair = self.pair_proj(normalise(p, self.eps))
    x = jnp.concatenate([u, v, jnp.abs(u - v), u * v, pair], axis=-1)
    x = self.drop(nn.gelu(self.hidden(x)), deterministic=not train)
    return self.classify(x)

"""TokenFormer (arXiv 2410.23168): every linear projection is a Pattention over learnable parameter tokens.

Pattention(n, d_in, d_out) attends from the input to n parameter tokens: keys K [n, d_in], values
V [n, d_out], scores A = X Kᵀ (no 1/√d), each row L2-normalised over the n tokens and scaled by τ
(√n by default), then GeLU; output = scores · V. It is a bias-free two-layer MLP with that row-wise
activation, which is how it is written here.

Because GeLU(0) = 0 and zero scores leave a row's L2 norm unchanged, appending parameter tokens with
zero keys keeps the function exactly when τ is pinned (`tau_attn`/`tau_ffn`), which is what
`python -m train.grow` relies on to scale a trained model up (paper §3.3, App. B).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers, stack
from models.registry import LanguageModel, register

ACTIVATIONS = ('l2_gelu', 'gelu_l2', 'softmax')
INITS = ('neox', 'fan_in')


def pattention_weights(scores: jax.Array, activation: str, tau: float, *, epsilon: float = 1e-5,
                       gelu_approximate: bool = False) -> jax.Array:
  """The modified softmax Θ over the last (parameter-token) axis, in float32.

  l2_gelu (the paper's): GeLU(τ · A / ‖A‖₂); gelu_l2: τ · GeLU(A) / ‖GeLU(A)‖₂; softmax: τ² · softmax(A)
  (exp then L1, times n at the default τ = √n, as the released code's softmax variant). The norm is
  √(‖·‖² + ε²): the released JAX port adds ε to the norm; this form also has a finite gradient at 0.
  """
  scores = scores.astype(jnp.float32)
  gelu = functools.partial(jax.nn.gelu, approximate=gelu_approximate)
  l2 = lambda a: a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + epsilon ** 2)
  if activation == 'l2_gelu':
    return gelu(tau * l2(scores))
  if activation == 'gelu_l2':
    return tau * l2(gelu(scores))
  if activation == 'softmax':
    return tau ** 2 * jax.nn.softmax(scores, axis=-1)
  raise ValueError(f'unknown Pattention activation {activation!r} ({", ".join(ACTIVATIONS)})')


class Pattention(nn.Module):
  """Token-parameter attention: [..., d_in] -> [..., features] through `num_tokens` parameter tokens."""
  num_tokens: int
  features: int
  activation: str = 'l2_gelu'
  tau: float = 0.0               # 0: √num_tokens, which follows the token count when the layer grows
  gelu_approximate: bool = False
  key_init: layers.Initializer = layers.default_init
  value_init: layers.Initializer = layers.default_init
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    keys = self.param('keys', layers.logical(self.key_init, ('ptokens', 'embed')),
                      (self.num_tokens, x.shape[-1]), jnp.float32)
    values = self.param('values', layers.logical(self.value_init, ('ptokens', 'embed')),
                        (self.num_tokens, self.features), jnp.float32)
    scores = jnp.einsum('...d,nd->...n', x.astype(self.dtype), keys.astype(self.dtype))
    scores = layers.constrain(scores, ('batch', 'length', 'act_ptokens'))
    tau = self.tau or math.sqrt(self.num_tokens)
    weights = pattention_weights(scores, self.activation, tau, gelu_approximate=self.gelu_approximate)
    out = jnp.einsum('...n,nd->...d', weights.astype(self.dtype), values.astype(self.dtype))
    return layers.constrain(out, ('batch', 'length', 'act_embed'))


class PattentionAttention(layers.Attention):
  """Causal multi-head attention whose Q, K, V and output projections are Pattentions."""
  pattention: Callable[..., Pattention] = Pattention   # Pattention with everything but the shape bound

  def project_in(self, x, heads, name):
    y = self.pattention(features=heads * self.head_dim, name=name)(x)
    return y.reshape(*y.shape[:-1], heads, self.head_dim)

  def project_out(self, out, features):
    return self.pattention(features=features, name='out')(out.reshape(*out.shape[:-2], -1))


class TokenFormerBlock(nn.Module):
  """Pre-norm block with non-parametric LayerNorms: x + MHA(LN(x)), then + FFN(LN(x)), FFN one Pattention."""
  num_heads: int
  rope_fraction: float
  attn_pattention: Callable[..., Pattention]
  ffn_pattention: Callable[..., Pattention]
  dtype: layers.Dtype
  attention_impl: str = 'fused'

  @nn.compact
  def __call__(self, x, context):
    d_model = x.shape[-1]
    attention = PattentionAttention(
        num_heads=self.num_heads, head_dim=d_model // self.num_heads, use_bias=False,
        use_rope=self.rope_fraction > 0, rope_fraction=self.rope_fraction, dtype=self.dtype,
        pattention=self.attn_pattention, impl=self.attention_impl, name='attention')
    norm = lambda name: layers.norm('layernorm', dtype=self.dtype, use_bias=False, use_scale=False, name=name)
    x = x + attention(norm('norm1')(x), mask=context.mask, positions=context.positions, decode=context.decode,
                      train=context.train)
    return x + self.ffn_pattention(features=d_model, name='ffn')(norm('norm2')(x))


@register('tokenformer')
class TokenFormer(LanguageModel):
  """Decoder-only TokenFormer. Defaults follow the released NeoX configs (rotary on 25% of head dims,
  l2_gelu with exact GeLU, keys N(0, 0.02), values N(0, 2/(layers·√d)))."""
  # paper: the 354M stage of progressive scaling (spec grassmann-tokenformer-mor.md §2.4; 124M has n_attn 576, n_ffn 2304)
  presets = {'tiny': dict(d_model=32, num_layers=2, num_heads=2, n_attn=24, n_ffn=96, max_len=32),
             'paper': dict(d_model=768, num_layers=12, num_heads=12, n_attn=2140, n_ffn=8560, max_len=1024,
                           activation='l2_gelu', gelu_approximate=False, rope_fraction=0.0, param_init='fan_in')}
  arena_knob = 'n_ffn'
  grows_by_tokens = True

  @classmethod
  def arena_layout(cls, *, d_model, depth, heads):
    return dict(num_layers=depth, num_heads=heads, n_attn=d_model, n_ffn=4 * d_model)
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  n_attn: int = 256             # parameter tokens of each of the Q, K, V and output Pattentions
  n_ffn: int = 1024             # parameter tokens of the feed-forward Pattention (4 · n_attn in the paper)
  tau_attn: float = 0.0         # pinned τ of the attention Pattentions; 0 = √n_attn (train.grow pins it by default)
  tau_ffn: float = 0.0          # pinned τ of the feed-forward Pattention; 0 = √n_ffn
  activation: str = 'l2_gelu'   # l2_gelu (paper) | gelu_l2 | softmax (ablation, paper Table 4)
  gelu_approximate: bool = False
  param_init: str = 'neox'      # neox (released Pile configs) | fan_in (the released JAX port)
  rope_fraction: float = 0.25   # head dims with rotary positions; 0 = no positions at all (the JAX port)
  max_len: int = 2048           # only bounds train.seq_len; rotary needs no table
  dtype: str = 'float32'
  attention_impl: str = 'fused'   # layers.ATTENTION_IMPLS
  remat: str = 'none'             # stack.REMAT_POLICIES
  scan_layers: bool = False

  def validate(self):
    super().validate()
    layers.check_attention_impl(self.attention_impl)
    stack.check_remat(self.remat)
    if min(self.n_attn, self.n_ffn) <= 0:
      raise ValueError('model.n_attn and model.n_ffn must be positive')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation={self.activation!r} must be one of {", ".join(ACTIVATIONS)}')
    if self.param_init not in INITS:
      raise ValueError(f'model.param_init={self.param_init!r} must be one of {", ".join(INITS)}')
    if not 0 <= self.rope_fraction <= 1:
      raise ValueError(f'model.rope_fraction={self.rope_fraction} must be in [0, 1]')

  def _pattention(self, num_tokens: int, tau: float, dtype) -> Callable[..., Pattention]:
    if self.param_init == 'neox':
      key_init = nn.initializers.normal(0.02)
      value_init = nn.initializers.normal(2 / (self.num_layers * math.sqrt(self.d_model)))
    else:   # fan-in variance scaling: keys std 1/√d_in, values std 1/√n
      key_init = nn.initializers.normal(1 / math.sqrt(self.d_model))
      value_init = nn.initializers.normal(1 / math.sqrt(num_tokens))
    return functools.partial(Pattention, num_tokens=num_tokens, activation=self.activation, tau=tau,
                             gelu_approximate=self.gelu_approximate, key_init=key_init, value_init=value_init,
                             dtype=dtype)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False):
    dtype = jnp.dtype(self.dtype)
    fan_in = self.param_init == 'fan_in'
    embed = layers.Embed(self.vocab_size, self.d_model, dtype=dtype, name='embed',
                         embedding_init=nn.initializers.normal(1.0 if fan_in else 0.02))
    x = embed(tokens)
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = None if decode else layers.causal_mask(positions, positions)   # decoding masks by cache position
    x = stack.apply_blocks(
        TokenFormerBlock, x, stack.Context(mask=mask, positions=positions, train=train, decode=decode),
        num_layers=self.num_layers, remat_policy=self.remat, scan=self.scan_layers, num_heads=self.num_heads,
        rope_fraction=self.rope_fraction, attn_pattention=self._pattention(self.n_attn, self.tau_attn, dtype),
        ffn_pattention=self._pattention(self.n_ffn, self.tau_ffn, dtype), dtype=dtype,
        attention_impl=self.attention_impl)
    x = layers.norm('layernorm', dtype=dtype, name='final_norm')(x)
    logits = embed.attend(x)
    if fan_in:   # N(0, 1) embeddings: the tied readout is scaled back by 1/√d
      logits = logits / math.sqrt(self.d_model)
    return logits.astype(jnp.float32), {}

  def analytic_param_count(self) -> int:
    """Keys and values of 4 attention Pattentions and the feed-forward one per layer (the norms carry none)."""
    d = self.d_model
    return self.vocab_size * d + self.num_layers * 2 * d * (4 * self.n_attn + self.n_ffn) + 2 * d

  def forward_flops_per_token(self, seq_len: int) -> float:
    # A Pattention does X·Kᵀ and Θ·V: 2 FLOPs per parameter; causal QKᵀ and AV: 2 · d · T.
    per_layer = 2 * 2 * self.d_model * (4 * self.n_attn + self.n_ffn) + 2 * self.d_model * seq_len
    return self.num_layers * per_layer + 2 * self.d_model * self.vocab_size

  # ------------------------------------------------------------------ progressive scaling (train.grow)
  @staticmethod
  def grown_config(model_config: ml_collections.ConfigDict, add_tokens: int,
                   pin_tau: bool) -> ml_collections.ConfigDict:
    """`add_tokens` more parameter tokens in every attention Pattention, 4x that in the feed-forward.
    `pin_tau` keeps the τ the model was trained with, so that zero new keys preserve the function."""
    grown = ml_collections.ConfigDict(model_config.to_dict())
    if pin_tau:
      grown.tau_attn = grown.tau_attn or math.sqrt(grown.n_attn)
      grown.tau_ffn = grown.tau_ffn or math.sqrt(grown.n_ffn)
    grown.n_attn += add_tokens
    grown.n_ffn += 4 * add_tokens
    return grown

  @staticmethod
  def grown_params(old, fresh, key_init: str):
    """The trained parameter tokens first, then new ones from `fresh` (the grown model's own init). With
    key_init='zeros' the new keys are zero: their scores are 0 and GeLU(0) = 0, so they add nothing until
    trained; their values stay random so that the keys receive gradient."""
    if key_init not in ('zeros', 'random'):
      raise ValueError(f'key_init={key_init!r} must be zeros or random')

    def grow(path, old_leaf, fresh_leaf):
      if key_init == 'zeros' and path[-1].key == 'keys':
        fresh_leaf = jnp.zeros_like(fresh_leaf)
      return fresh_leaf.at[tuple(slice(0, n) for n in old_leaf.shape)].set(old_leaf)

    return jax.tree_util.tree_map_with_path(grow, old, fresh)

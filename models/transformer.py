"""GPT-style decoder-only Transformer LM: the size-matched baseline of every table."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import layers
from models.registry import LanguageModel, register


def decoder_flops_per_token(d_model: int, num_layers: int, d_ff: int, mlp: str, vocab_size: int,
                            seq_len: int) -> float:
  """Forward matmul FLOPs per token of a decoder of these blocks with a (tied or not) readout."""
  per_layer = 2 * (4 * d_model ** 2 + layers.mlp_matmul_params(d_model, d_ff, mlp))
  per_layer += 2 * d_model * seq_len   # QK^T and AV: 2 * 2 * d * T per token, halved for the causal mask
  return num_layers * per_layer + 2 * d_model * vocab_size


class Block(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int
  prenorm: bool
  norm: str
  mlp: str
  use_rope: bool
  use_bias: bool
  dropout: float
  dtype: layers.Dtype
  out_init: layers.Initializer
  num_kv_heads: int | None = None   # grouped-query attention
  causal: bool = False              # mask=None attends causally by index (layers.Attention.causal)

  @nn.compact
  def __call__(self, x, mask, positions, decode, train, bias=None, kv_inputs=None, **attention_kwargs):
    """`kv_inputs`: the block inputs to take keys and values from instead of `x` (normalised here like
    `x`); `attention_kwargs` go to `layers.Attention` (kv_positions, kv_valid, cache_slot)."""
    attention = layers.Attention(
        num_heads=self.num_heads, head_dim=self.d_model // self.num_heads, num_kv_heads=self.num_kv_heads,
        use_rope=self.use_rope, use_bias=self.use_bias, dropout=self.dropout, dtype=self.dtype,
        out_init=self.out_init, causal=self.causal, name='attention')
    mlp = layers.Mlp(hidden=self.d_ff, kind=self.mlp, use_bias=self.use_bias, dropout=self.dropout,
                     dtype=self.dtype, out_init=self.out_init, name='mlp')
    norm1 = layers.norm(self.norm, dtype=self.dtype, use_bias=self.use_bias, name='norm1')
    norm2 = layers.norm(self.norm, dtype=self.dtype, use_bias=self.use_bias, name='norm2')
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    attend = lambda y, kv=None: attention(y, kv, mask=mask, bias=bias, positions=positions, decode=decode,
                                          train=train, **attention_kwargs)
    if self.prenorm:
      x = x + drop(attend(norm1(x), None if kv_inputs is None else norm1(kv_inputs)))
      x = x + drop(mlp(norm2(x), train=train))
    else:   # post-LN (original Transformer)
      x = norm1(x + drop(attend(x, kv_inputs)))
      x = norm2(x + drop(mlp(x, train=train)))
    return x


@register('transformer')
class Transformer(LanguageModel):
  """Decoder-only Transformer. `prenorm` switches pre-LN/post-LN, `positions` learned/rope."""
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 1024
  max_len: int = 1024
  prenorm: bool = True
  norm: str = 'layernorm'
  mlp: str = 'gelu'
  positions: str = 'learned'
  use_bias: bool = True
  tied_embeddings: bool = True
  final_norm: bool = True      # pre-LN needs it; post-LN keeps it too (as the reference parameter counts do)
  dropout: float = 0.0
  dtype: str = 'float32'
  remat: bool = False

  def validate(self):
    super().validate()
    if self.positions not in ('learned', 'rope'):
      raise ValueError(f"model.positions={self.positions!r} must be 'learned' or 'rope'")
    if self.norm not in ('layernorm', 'rmsnorm'):
      raise ValueError(f"model.norm={self.norm!r} must be 'layernorm' or 'rmsnorm'")
    if self.mlp not in ('gelu', 'swiglu'):
      raise ValueError(f"model.mlp={self.mlp!r} must be 'gelu' or 'swiglu'")

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False):
    dtype = jnp.dtype(self.dtype)
    embed = layers.Embed(self.vocab_size, self.d_model, dtype=dtype, name='embed')
    x = embed(tokens)
    positions = jnp.broadcast_to(layers.sequence_positions(self, tokens.shape[1], decode), tokens.shape)
    if self.positions == 'learned':
      x = x + layers.LearnedPositions(self.max_len, self.d_model, dtype=dtype, name='pos_embed')(positions)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    # GPT-2 scales the residual output projections by 1/sqrt(2 * layers).
    out_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.num_layers))
    block_cls = nn.remat(Block, static_argnums=(4, 5)) if self.remat else Block
    for i in range(self.num_layers):
      x = block_cls(self.d_model, self.num_heads, self.d_ff, self.prenorm, self.norm, self.mlp,
                    self.positions == 'rope', self.use_bias, self.dropout, dtype, out_init, causal=True,
                    name=f'block_{i}')(x, None, positions, decode, train)
    if self.final_norm:
      x = layers.norm(self.norm, dtype=dtype, use_bias=self.use_bias, name='final_norm')(x)
    if self.tied_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=dtype, name='readout')(x)
    return logits.astype(jnp.float32), {}

  def forward_flops_per_token(self, seq_len: int) -> float:
    return decoder_flops_per_token(self.d_model, self.num_layers, self.d_ff, self.mlp, self.vocab_size, seq_len)

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return cls.config_from_fields()

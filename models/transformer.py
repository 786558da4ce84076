"""GPT-style decoder-only Transformer LM: the size-matched baseline of every table."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models import layers, stack
from models.registry import LanguageModel, register


@register('transformer')
class Transformer(LanguageModel):
  """Decoder-only Transformer. `prenorm` switches pre-LN/post-LN, `positions` learned/rope."""
  # paper: GPT-2 small, the size-matched baseline of TokenFormer's 124M (and the issue-20 TPU measurement)
  presets = {'tiny': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32),
             'paper': dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072, max_len=1024)}
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
  attention_impl: str = 'fused'   # layers.ATTENTION_IMPLS
  remat: str = 'none'             # stack.REMAT_POLICIES
  scan_layers: bool = False

  def validate(self):
    super().validate()
    layers.check_attention_impl(self.attention_impl)
    stack.check_remat(self.remat)
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
    x = stack.apply_blocks(
        layers.Block, x, stack.Context(positions=positions, train=train, decode=decode),
        num_layers=self.num_layers, remat_policy=self.remat, scan=self.scan_layers,
        d_model=self.d_model, num_heads=self.num_heads, d_ff=self.d_ff, prenorm=self.prenorm, norm=self.norm,
        mlp=self.mlp, use_rope=self.positions == 'rope', use_bias=self.use_bias, dropout=self.dropout, dtype=dtype,
        out_init=layers.residual_init(self.num_layers), causal=True, attention_impl=self.attention_impl)
    if self.final_norm:
      x = layers.norm(self.norm, dtype=dtype, use_bias=self.use_bias, name='final_norm')(x)
    if self.tied_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=dtype, name='readout')(x)
    return logits.astype(jnp.float32), {}

  def analytic_param_count(self) -> int:
    d = self.d_model
    block = layers.block_param_count(d, self.num_heads, self.d_ff, norm=self.norm, mlp=self.mlp,
                                     use_bias=self.use_bias)
    return (self.vocab_size * d * (1 if self.tied_embeddings else 2) + (self.positions == 'learned') * self.max_len * d
            + self.num_layers * block + self.final_norm * layers.norm_param_count(self.norm, d, use_bias=self.use_bias))

  def forward_flops_per_token(self, seq_len: int) -> float:
    return layers.decoder_flops_per_token(self.d_model, self.num_layers, self.d_ff, self.mlp, self.vocab_size, seq_len)

"""Lexinvariant language models (arXiv 2305.16349): no fixed token embeddings.

`embedding='random'` (the paper's model): every sequence gets a fresh table E [vocab, d] with entries
N(0, 1), drawn from the `lexinvariant` RNG stream; the input is E(x)·scale + bias (learned) and the
readout uses the same table, logits_v = ⟨h, E(v)⟩, with no learned token biases. The model is then
invariant to any permutation of the vocabulary: a symbol's identity is visible only through its repeats.
`embedding='learned'` is the standard model; with `permute_prob=p` it is the regularised variant (App. G):
in training each sequence draws a vocabulary permutation π, each token x of its window becomes π(x) with
probability p, and the model is trained as a normal LM on that permuted sequence, targets included (a
target is the next input token, replaced or not by the same coin). The targets are permuted by reordering
the logits of each position: softmax(logits)[π(y)] scored at the batch's y is the NLL of π(y), exactly.

Both start alike: learned embeddings are also initialised N(0, 1), and, as in T5's tied readout, the
final hidden state is scaled by d^-1/2 before the dot product with the table.
Positions come only from a T5 relative position bias shared by all layers (no absolute positions).
Memory: the tables are [batch, vocab, d] floats, like the [batch, length, vocab] logits: fine for
characters (128-257) and an 8k BPE vocabulary at small d; the whole table is needed for the readout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, stack
from models.registry import LanguageModel, register

STREAM = 'lexinvariant'


def random_tables(key: jax.Array, batch: int, vocab_size: int, features: int) -> jax.Array:
  """One N(0, I) embedding table per sequence: [batch, vocab, features]. Row v is drawn from its own key,
  so it does not depend on the vocabulary's size (which the mesh may pad)."""
  rows = jax.vmap(lambda v: jax.random.normal(jax.random.fold_in(key, v), (batch, features), jnp.float32))
  return jnp.swapaxes(rows(jnp.arange(vocab_size)), 0, 1)


def draw_permutations(key: jax.Array, batch: int, positions: int, vocab_size: int,
                      prob: float) -> tuple[jax.Array, jax.Array]:
  """One random vocabulary permutation π per sequence, [batch, vocab], and whether the token at each
  window position becomes its image π(token) (probability `prob`), [batch, positions]."""
  perm_key, coin_key = jax.random.split(key)
  perms = jax.vmap(lambda k: jax.random.permutation(k, vocab_size))(jax.random.split(perm_key, batch))
  return perms, jax.random.bernoulli(coin_key, prob, (batch, positions))


def permute_tokens(tokens: jax.Array, perms: jax.Array, replaced: jax.Array) -> jax.Array:
  """π(token) where `replaced`, else the token (tokens and `replaced` [batch, length], perms [batch, vocab])."""
  return jnp.where(replaced, jnp.take_along_axis(perms, tokens, axis=1), tokens)


def permute_targets(logits: jax.Array, perms: jax.Array, replaced: jax.Array) -> jax.Array:
  """Logits under which the target y scores as π(y) where `replaced` [batch, length]: position v of the
  result holds the logit of π(v). The softmax is permuted with it, so NLL and argmax are those of π(y)."""
  permuted = jnp.take_along_axis(logits, jnp.broadcast_to(perms[:, None, :], logits.shape), axis=-1)
  return jnp.where(replaced[..., None], permuted, logits)


@register('lexinvariant')
class Lexinvariant(LanguageModel):
  """Decoder-only Transformer (the baseline's pre-LN blocks) with T5 relative position bias and
  per-sequence random (or learned) embeddings."""
  rng_streams = ('dropout', STREAM)
  # paper: the 150M model (spec hat-mrt5-landmark-lexinvariant.md §4.1)
  presets = {'tiny': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32),
             'paper': dict(d_model=1024, num_layers=12, num_heads=8, d_ff=4096, max_len=512)}
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 1024
  max_len: int = 2048            # only bounds train.seq_len; relative positions need no table
  embedding: str = 'random'      # random (lexinvariant) | learned (standard)
  permute_prob: float = 0.0      # learned only: the regularised variant's p (0.2 in the paper)
  embed_affine: str = 'vector'   # the learned scale and bias on E(x): per dimension (vector) or scalar
  # The paper does not say how the scale starts. At 1 the residual stream carries E(x_t) itself, so the tied
  # readout first predicts "repeat the current token" (loss ~√d nats) and the tiny CPU model stayed at the
  # uniform loss for 550 steps; from 0 the model grows token identity into the stream as it learns to use it.
  embed_scale_init: float = 0.0
  num_buckets: int = 32          # T5 relative position buckets
  max_distance: int = 128
  dropout: float = 0.0
  dtype: str = 'float32'
  attention_impl: str = 'fused'   # layers.ATTENTION_IMPLS (the relative bias is an additive bias)
  remat: str = 'none'             # stack.REMAT_POLICIES
  scan_layers: bool = False

  def validate(self):
    super().validate()
    layers.check_attention_impl(self.attention_impl)
    stack.check_remat(self.remat)
    if self.embedding not in ('random', 'learned'):
      raise ValueError(f"model.embedding={self.embedding!r} must be 'random' or 'learned'")
    if self.embed_affine not in ('vector', 'scalar'):
      raise ValueError(f"model.embed_affine={self.embed_affine!r} must be 'vector' or 'scalar'")
    if not 0 <= self.permute_prob <= 1 or (self.permute_prob and self.embedding != 'learned'):
      raise ValueError('model.permute_prob must be in [0, 1], and only with model.embedding=learned')

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False, tables: jax.Array | None = None):
    """`tables` [batch, vocab, d] replaces the random draw (probes and tests)."""
    dtype = jnp.dtype(self.dtype)
    batch, length = tokens.shape
    if self.embedding == 'random':
      if tables is None:
        tables = random_tables(self.make_rng(STREAM), batch, self.vocab_size, self.d_model)
      tables = layers.constrain(tables, ('batch', 'act_vocab', 'act_embed'))
      affine_shape = (self.d_model,) if self.embed_affine == 'vector' else (1,)
      scale = self.param('embed_scale', layers.logical(nn.initializers.constant(self.embed_scale_init), ('norm',)),
                         affine_shape)
      shift = self.param('embed_bias', layers.logical(nn.initializers.zeros_init(), ('norm',)), affine_shape)
      x = (jnp.take_along_axis(tables, tokens[..., None], axis=1) * scale + shift).astype(dtype)
      self.sow('intermediates', 'embeddings', x)
      readout = lambda h: jnp.einsum('btd,bvd->btv', h, tables.astype(dtype))
    else:
      embed = layers.Embed(self.vocab_size, self.d_model, dtype=dtype, embedding_init=nn.initializers.normal(1.0),
                           name='embed')
      if train and self.permute_prob > 0:
        # One coin per window position (the 'lm' format's targets are the window shifted by one): coin t
        # replaces input t, coin t + 1 the target of position t, so both see the same permuted sequence.
        perms, replaced = draw_permutations(self.make_rng(STREAM), batch, length + 1, self.vocab_size,
                                            self.permute_prob)
        x = embed(permute_tokens(tokens, perms, replaced[:, :-1]))
        readout = lambda h: permute_targets(embed.attend(h), perms, replaced[:, 1:])
      else:
        x, readout = embed(tokens), embed.attend
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    positions = layers.sequence_positions(self, length, decode)   # the same for every row: one bias for the batch
    key_positions = positions
    if decode:   # keys are the cache slots; the initialising call's length is the cache's
      slots = self.variable('cache', 'slots', jnp.zeros, (length,), jnp.bool_)
      key_positions = jnp.arange(slots.value.shape[0])[None]
    bias = layers.RelativePositionBias(self.num_heads, num_buckets=self.num_buckets, max_distance=self.max_distance,
                                       name='position_bias')(positions, key_positions)
    mask = None if decode else layers.causal_mask(positions, key_positions)
    context = stack.Context(mask=mask, positions=jnp.broadcast_to(positions, (batch, length)), bias=bias.astype(dtype),
                            train=train, decode=decode)
    x = stack.apply_blocks(
        layers.Block, x, context, num_layers=self.num_layers, remat_policy=self.remat, scan=self.scan_layers,
        d_model=self.d_model, num_heads=self.num_heads, d_ff=self.d_ff, norm='layernorm', mlp='gelu',
        use_bias=True, dropout=self.dropout, dtype=dtype, out_init=layers.residual_init(self.num_layers),
        attention_impl=self.attention_impl)
    x = layers.norm('layernorm', dtype=dtype, name='final_norm')(x)
    self.sow('intermediates', 'hidden', x)     # the final hidden states, for probes
    # T5's tied readout: the output is scaled by d^-1/2, as the embeddings are N(0, 1).
    logits = layers.constrain(readout(x * self.d_model ** -0.5), ('batch', 'length', 'act_vocab'))
    return logits.astype(jnp.float32), {}

  def analytic_param_count(self) -> int:
    d = self.d_model
    embedding = (2 * (d if self.embed_affine == 'vector' else 1) if self.embedding == 'random'
                 else self.vocab_size * d)
    block = layers.block_param_count(d, self.num_heads, self.d_ff, norm='layernorm', mlp='gelu', use_bias=True)
    return (embedding + self.num_buckets * self.num_heads + self.num_layers * block
            + layers.norm_param_count('layernorm', d))

  def forward_flops_per_token(self, seq_len: int) -> float:
    return layers.decoder_flops_per_token(self.d_model, self.num_layers, self.d_ff, 'gelu', self.vocab_size, seq_len)

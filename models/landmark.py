"""Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300): block retrieval through attention.

A landmark entry follows every `block_size` regular tokens; the model inserts them itself (a learned
landmark vector, not a vocabulary id), block-aligned from the start of each window, which is the
spec's allowed simplification of the paper's insertion by global stream position. Landmark outputs are
dropped before the readout, so a block's last token predicts the next real token and no landmark is
ever predicted or scored: the paper's target remapping and loss masking, with the batch, loss and
bits per byte of every other model.

Attention is the grouped softmax (spec 3.2): per query, one softmax over its own block's regular keys
and earlier blocks' landmarks (the "local" group), one softmax inside each earlier block; a regular key
of an earlier block is weighted by its in-block share times that block's landmark weight. Landmark
values are never read; a landmark query never sees its own key.

Long inputs (evaluation with `inference=cached`, and every decode call) run in chunks of `local_len`
tokens. Each layer keeps a ring of the last `mem_blocks` complete blocks plus the current incomplete
one (keys unrotated, values). Per query and head the cached landmarks are scored, the `topk` blocks
retrieved (ties to the most recent block; only real queries vote in `retrieval='head'`) and attended,
with the local window, through the same grouped softmax at the paper's "stingy" RoPE positions. The
cache size depends on `mem_blocks`, not on the input length.

`landmarks=False` is the same model without landmarks (plain causal attention): the baseline.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, stack
from models.registry import LanguageModel, register

RETRIEVAL = ('token_and_head', 'head', 'token')
INFERENCE = ('full', 'cached')


def chunk_layout(n_before, length: int, block_size: int):
  """Where `length` regular tokens go when `n_before` were processed before them (int or traced).

  The window starts at the current (incomplete) block, which already holds `carry = n_before %
  block_size` tokens; a block spans block_size + 1 window slots, its landmark last. Returns
  (token_slots [length], landmark_slots [max_landmarks], carry); landmark j closes window block j.
  """
  carry = n_before % block_size
  t = carry + jnp.arange(length)
  token_slots = t // block_size * (block_size + 1) + t % block_size
  max_landmarks = (block_size - 1 + length) // block_size
  landmark_slots = jnp.arange(max_landmarks) * (block_size + 1) + block_size
  return token_slots, landmark_slots, carry


def _masked_softmax(scores, mask, axis):
  """Softmax over `axis` among masked-in entries; rows with none give zeros (not NaN)."""
  peak = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=axis, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  e = jnp.where(mask, jnp.exp(scores - jax.lax.stop_gradient(peak)), 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def grouped_attention(q, k, v, q_slots, kv_valid, block_len: int, retrieved=None):
  """The block-structured grouped softmax (the fast path).

  q: [b, q, h, d] (RoPE applied); k, v: [b, w, h, d] over a window of w = n * block_len slots that
  starts at a block boundary (block_len = block_size + 1, the landmark last); q_slots [q]: each query's
  window slot; kv_valid [b, w]: the slots holding a key. retrieved: None or (k, v, valid) of memory
  blocks earlier than the window, per query and head: [b, h, q, r, block_len, d] and valid [b, h, q, r].
  """
  batch, width, heads, dim = k.shape
  n_blocks = width // block_len
  scale = 1.0 / np.sqrt(dim)
  s = jnp.einsum('bqhd,bnjhd->bhqnj', q, k.reshape(batch, n_blocks, block_len, heads, dim)) * scale
  q_block, q_offset = (q_slots // block_len)[:, None, None], (q_slots % block_len)[:, None, None]
  k_block, k_offset = jnp.arange(n_blocks)[None, :, None], jnp.arange(block_len)[None, None, :]
  is_landmark = k_offset == block_len - 1
  valid = kv_valid.reshape(batch, 1, 1, n_blocks, block_len)
  own = (k_block == q_block) & (k_offset <= q_offset) & ~is_landmark
  earlier = k_block < q_block
  local, member = valid & (own | earlier & is_landmark), valid & earlier & ~is_landmark
  if retrieved is not None:
    k_ret, v_ret, ret_valid = retrieved
    s_ret = jnp.einsum('bqhd,bhqrjd->bhqrj', q, k_ret) * scale
    ret_valid = ret_valid[..., None]
    s = jnp.concatenate([s_ret.astype(s.dtype), s], axis=3)
    local = jnp.concatenate([jnp.broadcast_to(ret_valid & is_landmark, s_ret.shape),
                             jnp.broadcast_to(local, s.shape[:3] + local.shape[3:])], axis=3)
    member = jnp.concatenate([jnp.broadcast_to(ret_valid & ~is_landmark, s_ret.shape),
                              jnp.broadcast_to(member, s.shape[:3] + member.shape[3:])], axis=3)
  s = s.astype(jnp.float32)
  p_local = _masked_softmax(s, local, axis=(-2, -1))
  p_member = _masked_softmax(s, member, axis=-1)
  weights = jnp.where(is_landmark, 0.0, p_local + p_member * p_local[..., -1:])
  weights = weights.astype(v.dtype)
  n_retrieved = 0 if retrieved is None else k_ret.shape[3]
  out = jnp.einsum('bhqnj,bnjhd->bqhd', weights[:, :, :, n_retrieved:],
                   v.reshape(batch, n_blocks, block_len, heads, dim))
  if retrieved is not None:
    out = out + jnp.einsum('bhqrj,bhqrjd->bqhd', weights[:, :, :, :n_retrieved], v_ret)
  return out


def reference_grouped_attention(q, k, v, is_landmark, q_index, kv_valid):
  """The naive grouped softmax, written from the definition (spec 3.2) for any landmark layout.

  q: [b, q, h, d]; k, v: [b, k, h, d] in stream order; is_landmark, kv_valid [k]; q_index [q]: the
  stream position of each query. A key's block is the count of landmarks strictly before it.
  """
  block = jnp.cumsum(is_landmark) - is_landmark
  q_block = block[q_index][:, None]
  visible = (jnp.arange(k.shape[1])[None, :] <= q_index[:, None]) & kv_valid[None, :]
  local = visible & ((block == q_block) & ~is_landmark | is_landmark & (block < q_block))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])

  def softmax_in(group):
    e = jnp.where(group, jnp.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)

  p_local = softmax_in(local)
  weights = jnp.where(is_landmark, 0.0, p_local)
  for c in range(int(is_landmark.sum())):   # one group per earlier block c, gated by its landmark
    in_block = visible & ~is_landmark & (block == c) & (c < q_block)
    gate = (p_local * (is_landmark & (block == c))).sum(-1, keepdims=True)
    weights = weights + softmax_in(in_block) * gate
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def stingy_slots(chosen_age, valid, completed, topk: int):
  """Slots of the chosen blocks (sorted by age, invalid last) in the reserved prefix of min(completed,
  topk + 1) blocks: old blocks fill slots from the left, blocks among the latest `topk` from the right,
  so one slot stays empty between far and recent once topk + 1 blocks exist (spec 3.4)."""
  n_slots = jnp.minimum(completed, topk + 1)
  is_recent = valid & (chosen_age >= completed - topk)
  recent_rank = jnp.cumsum(is_recent, -1) - 1
  return jnp.where(is_recent, n_slots - is_recent.sum(-1, keepdims=True) + recent_rank, jnp.arange(topk))


def _rope_any(x, positions, base: float):
  """RoPE on [..., length, d] at integer positions broadcastable to x.shape[:-1]."""
  flat = x.reshape(-1, x.shape[-2], 1, x.shape[-1])
  pos = jnp.broadcast_to(positions, x.shape[:-1]).reshape(-1, x.shape[-2])
  return layers.rope(flat, pos, base=base).reshape(x.shape)


class LandmarkAttention(layers.Attention):
  """Grouped-softmax attention over a block-aligned window, with retrieval from a block memory."""
  block_size: int = 50
  topk: int = 2
  mem_blocks: int = 10
  retrieval: str = 'token_and_head'
  landmarks: bool = True   # False: plain causal attention (slots are then 0..length-1)

  @nn.compact
  def __call__(self, x, slots, slot_valid, window: int, memory=None, n_before=0):
    """x: [b, s, embed] new entries at window `slots` [s] (valid [s]); memory: None (a window from
    position 0, as in training) or (ring_k, ring_v) [b, ring, block_len, kv_heads, head_dim] with
    `n_before` regular tokens seen. Returns (output, updated memory)."""
    block_len = self.block_size + 1
    kv_heads = self.num_kv_heads or self.num_heads
    q = self.project_in(x, self.num_heads, 'query')
    k = self.project_in(x, kv_heads, 'key')
    v = self.project_in(x, kv_heads, 'value')
    batch = x.shape[0]
    write = jnp.where(slot_valid, slots, window)        # out of range: dropped
    scatter = lambda buf, new: buf.at[:, write].set(new.astype(buf.dtype), mode='drop')
    k_win = jnp.zeros((batch, window, kv_heads, self.head_dim), k.dtype)
    v_win = jnp.zeros_like(k_win)
    kv_valid = jnp.zeros((window,), bool).at[write].set(True, mode='drop')
    completed = n_before // self.block_size            # blocks closed before this call
    prefix = 0
    retrieved = None
    if memory is not None:
      ring_k, ring_v = memory
      ring = ring_k.shape[1]
      current = completed % ring
      carry = n_before % self.block_size
      carried = jnp.arange(block_len) < carry          # the current block's earlier tokens
      k_win = k_win.at[:, :block_len].set(jnp.where(carried[:, None, None], ring_k[:, current], 0))
      v_win = v_win.at[:, :block_len].set(jnp.where(carried[:, None, None], ring_v[:, current], 0))
      kv_valid = kv_valid.at[:block_len].max(carried)
      prefix = jnp.minimum(completed, self.topk + 1) * block_len
    k_win, v_win = scatter(k_win, k), scatter(v_win, v)
    q_rot = layers.rope(q, jnp.broadcast_to(prefix + slots, q.shape[:2]), base=self.rope_base)
    k_rot = layers.rope(k_win, jnp.broadcast_to(prefix + jnp.arange(window), k_win.shape[:2]), base=self.rope_base)
    repeat = lambda t: jnp.repeat(t, self.num_heads // kv_heads, axis=-2)
    if not self.landmarks:
      causal = layers.causal_mask(slots[None], jnp.arange(window)[None])
      out = layers.dot_product_attention(q_rot, repeat(k_rot), repeat(v_win), mask=causal & kv_valid, impl=self.impl)
      return self.project_out(out, x.shape[-1]), memory
    if memory is not None:
      retrieved = self._retrieve(q_rot, repeat(ring_k), repeat(ring_v), completed, slot_valid)
    if self.impl == 'reference' and memory is None:   # the naive definition, over the window in slot order
      is_landmark = np.arange(window) % block_len == self.block_size
      out = reference_grouped_attention(q_rot, repeat(k_rot), repeat(v_win), is_landmark, slots, kv_valid)
    else:
      out = grouped_attention(q_rot, repeat(k_rot), repeat(v_win), slots,
                              jnp.broadcast_to(kv_valid, (batch, window)), block_len, retrieved)
    out = self.project_out(out, x.shape[-1])
    if memory is not None:   # store the window's blocks (keys unrotated) in ring segments completed, completed+1, ...
      n_window_blocks = window // block_len
      segments = (completed + jnp.arange(n_window_blocks)) % ring
      reshape = lambda t: t.reshape(batch, n_window_blocks, block_len, *t.shape[2:])
      memory = (ring_k.at[:, segments].set(reshape(k_win)), ring_v.at[:, segments].set(reshape(v_win)))
    return out, memory

  def _retrieve(self, q, ring_k, ring_v, completed, query_valid):
    """Top-k memory blocks per query and head (or per head / per token), placed at stingy positions.

    q: [b, q, h, d] rotated at its position; ring_k/v: [b, ring, block_len, h, d] unrotated; query_valid
    [q]: the entries that hold a query (not a partial chunk's padding, not the landmark of a block still
    incomplete), the only ones that vote in `retrieval='head'`. Ties go to the most recent block (in layer
    0 every older landmark key is the same vector at the same scoring slot). Returns (k rotated, v,
    valid) as `grouped_attention` takes them.
    """
    block_len = self.block_size + 1
    ring = ring_k.shape[1]
    segments = jnp.arange(ring)
    age = completed - 1 - (completed - 1 - segments) % ring   # block index held by each segment
    candidate = (age >= 0) & (age >= completed - self.mem_blocks)
    n_slots = jnp.minimum(completed, self.topk + 1)
    recent = age >= completed - self.topk
    # Scoring: the latest k landmarks at their own slots among the last k, older ones at slot 0.
    score_slot = jnp.where(recent, n_slots - (completed - age), 0)
    landmark_k = _rope_any(jnp.moveaxis(ring_k[:, :, -1], 2, 1),        # [b, h, ring, d]
                           score_slot * block_len + block_len - 1, self.rope_base)
    scores = jnp.einsum('bqhd,bhrd->bhqr', q, landmark_k) / np.sqrt(q.shape[-1])
    scores = jnp.where(candidate, scores.astype(jnp.float32), -jnp.inf)
    if self.retrieval != 'token_and_head':   # one choice per head (max over tokens) or per token (over heads)
      probs = jax.nn.softmax(scores, axis=-1)
      if self.retrieval == 'head':
        probs = jnp.where(query_valid[:, None], probs, 0.0)
      axis = 2 if self.retrieval == 'head' else 1
      scores = jnp.where(candidate, jnp.broadcast_to(probs.max(axis, keepdims=True), scores.shape), -jnp.inf)
    # A stable sort over the segments in order of recency: equal scores keep the most recent block first.
    by_recency = jnp.argsort(-age)
    ranked = jnp.argsort(-scores[..., by_recency], axis=-1, stable=True)[..., :self.topk]   # [b, h, q, k]
    chosen = by_recency[ranked]
    valid = candidate[chosen]
    chosen_age = jnp.where(valid, age[chosen], jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(chosen_age, axis=-1)                            # time order, invalid last
    chosen, valid, chosen_age = (jnp.take_along_axis(t, order, -1) for t in (chosen, valid, chosen_age))
    slot = stingy_slots(chosen_age, valid, completed, self.topk)
    gather = jax.vmap(jax.vmap(lambda r, i: r[i]))                       # over batch, heads
    to_heads = lambda t: jnp.moveaxis(t, 3, 1)                           # [b, h, ring, block_len, d]
    b, h, nq, k = chosen.shape
    k_sel = gather(to_heads(ring_k), chosen.reshape(b, h, -1)).reshape(b, h, nq, k, block_len, -1)
    v_sel = gather(to_heads(ring_v), chosen.reshape(b, h, -1)).reshape(b, h, nq, k, block_len, -1)
    positions = slot[..., None] * block_len + jnp.arange(block_len)
    return _rope_any(k_sel, positions, self.rope_base), v_sel, valid


class LandmarkBlock(nn.Module):
  """Pre-LN block (the paper's GPT-2 layout) around landmark attention."""
  config: dict

  @nn.compact
  def __call__(self, x, slots, slot_valid, window, memory, n_before):
    c = self.config
    attention = LandmarkAttention(
        num_heads=c['num_heads'], head_dim=c['d_model'] // c['num_heads'], use_bias=False, use_rope=True,
        dtype=c['dtype'], out_init=c['out_init'], block_size=c['block_size'], topk=c['topk'],
        mem_blocks=c['mem_blocks'], retrieval=c['retrieval'], landmarks=c['landmarks'], impl=c['attention_impl'],
        name='attention')
    h, memory = attention(layers.norm('layernorm', use_bias=False, dtype=c['dtype'], name='norm1')(x),
                          slots, slot_valid, window, memory, n_before)
    x = x + h
    x = x + layers.Mlp(c['d_ff'], use_bias=False, dtype=c['dtype'], out_init=c['out_init'], name='mlp')(
        layers.norm('layernorm', use_bias=False, dtype=c['dtype'], name='norm2')(x))
    return x, memory


class LandmarkStack(nn.Module):
  """Embedding, blocks and readout over one window of regular tokens (one chunk when cached)."""
  config: dict

  @nn.compact
  def __call__(self, state, chunk):
    """state: (n_before, memory per layer or None); chunk: (tokens [b, c], n_valid). Returns
    (state after the chunk, logits [b, c, vocab])."""
    c = self.config
    n_before, memory = state
    tokens, n_valid = chunk
    batch, length = tokens.shape
    embed = layers.Embed(c['vocab_size'], c['d_model'], dtype=c['dtype'], name='embed')
    x = embed(tokens)
    slots, slot_valid, window = jnp.arange(length), jnp.arange(length) < n_valid, length
    if c['landmarks']:
      landmark = self.param('landmark', layers.logical(layers.default_init, ('embed',)), (c['d_model'],),
                            jnp.float32)
      token_slots, landmark_slots, carry = chunk_layout(n_before, length, c['block_size'])
      n_landmarks = landmark_slots.shape[0]
      slots = jnp.concatenate([token_slots, landmark_slots])
      slot_valid = jnp.concatenate([slot_valid, (jnp.arange(n_landmarks) + 1) * c['block_size'] <= carry + n_valid])
      x = jnp.concatenate([x, jnp.broadcast_to(landmark.astype(c['dtype']), (batch, n_landmarks, c['d_model']))],
                          axis=1)
      x = layers.constrain(x, ('batch', 'length', 'act_embed'))
      window = (n_landmarks + 1) * (c['block_size'] + 1)
    # Each layer reads and writes its own block memory, so the layers are looped here rather than by
    # `stack.apply_blocks` (whose blocks share one context); the remat policy is the shared one.
    block_cls = stack.remat(LandmarkBlock, c['remat'], static_argnums=(4,))   # the window length is static
    new_memory = []
    for i in range(c['num_layers']):
      x, layer_memory = block_cls(c, name=f'block_{i}')(
          x, slots, slot_valid, window, None if memory is None else memory[i], n_before)
      new_memory.append(layer_memory)
    x = layers.norm('layernorm', use_bias=False, dtype=c['dtype'], name='final_norm')(x[:, :length])
    logits = embed.attend(x).astype(jnp.float32)
    return (n_before + n_valid, None if memory is None else new_memory), logits


@register('landmark')
class LandmarkLM(LanguageModel):
  """GPT-2-like decoder (pre-LN, no biases, GELU, tied embeddings, RoPE) with landmark attention."""
  # paper: the PG-19 model (spec hat-mrt5-landmark-lexinvariant.md §3.3): blocks of 50 + 1 landmark
  presets = {'tiny': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, block_size=4, local_len=8, mem_blocks=4,
                          topk=2),
             'paper': dict(d_model=1024, num_layers=12, num_heads=8, d_ff=4096, block_size=50, local_len=250,
                           mem_blocks=40, topk=4)}
  vocab_size: int = 256
  d_model: int = 384
  num_layers: int = 6
  num_heads: int = 6
  d_ff: int = 1536
  block_size: int = 50         # regular tokens per block (ℓ_block); a landmark closes each
  landmarks: bool = True       # False: the same model with plain causal attention (the baseline)
  inference: str = 'full'      # evaluation: 'full' window, or 'cached' chunks with block retrieval
  local_len: int = 250         # ℓ_local: tokens per chunk in cached inference and decoding
  mem_blocks: int = 10         # complete blocks kept per layer (the cache size)
  topk: int = 2                # blocks retrieved per query (and head)
  retrieval: str = 'token_and_head'   # or 'head' (max over a chunk's tokens) / 'token' (max over heads)
  dtype: str = 'float32'
  # layers.ATTENTION_IMPLS: the baseline's plain attention; with landmarks, 'reference' runs the naive grouped
  # softmax over a window (training, inference='full') and any other the block-structured fast path
  attention_impl: str = 'fused'
  remat: str = 'none'                 # stack.REMAT_POLICIES

  def validate(self):
    super().validate()
    layers.check_attention_impl(self.attention_impl)
    stack.check_remat(self.remat)
    if self.inference not in INFERENCE:
      raise ValueError(f'model.inference={self.inference!r} must be one of {INFERENCE}')
    if self.retrieval not in RETRIEVAL:
      raise ValueError(f'model.retrieval={self.retrieval!r} must be one of {RETRIEVAL}')
    if self.block_size < 1 or self.local_len < 1:
      raise ValueError('model.block_size and model.local_len must be positive')
    if self.inference == 'cached' and not self.landmarks:
      raise ValueError("model.inference='cached' needs model.landmarks=True")
    if not 1 <= self.topk <= self.mem_blocks:
      raise ValueError(f'model.topk={self.topk} must be in 1..model.mem_blocks={self.mem_blocks}')

  @property
  def cached_decoding(self) -> bool:   # the block memory is the decode cache; the baseline has none
    return self.landmarks

  def _stack_config(self) -> dict:
    return dict(vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                num_heads=self.num_heads, landmarks=self.landmarks, d_ff=self.d_ff, block_size=self.block_size,
                topk=self.topk, mem_blocks=self.mem_blocks, retrieval=self.retrieval, dtype=jnp.dtype(self.dtype),
                out_init=layers.residual_init(self.num_layers), attention_impl=self.attention_impl,
                remat=self.remat)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False):
    config = self._stack_config()
    if decode and not self.landmarks:
      raise ValueError('the baseline (landmarks=False) has no decode cache: generate runs full forwards')
    if not decode and (train or self.inference == 'full'):
      _, logits = LandmarkStack(config, name='stack')((0, None), (tokens, tokens.shape[1]))
      return logits, {}
    return self._cached(tokens, config, decode), {}

  def _cached(self, tokens, config, decode: bool):
    """Chunks of `local_len` tokens through a scan, carrying the block memory (kept in the 'cache'
    collection between decode calls)."""
    batch, length = tokens.shape
    chunk = min(self.local_len, length)
    n_chunks = -(-length // chunk)
    head_dim = self.d_model // self.num_heads
    ring = self.mem_blocks + (self.block_size - 1 + self.local_len) // self.block_size + 1
    ring_shape = (batch, ring, self.block_size + 1, self.num_heads, head_dim)
    zeros = lambda: (jnp.int32(0), [(jnp.zeros(ring_shape, config['dtype']),) * 2 for _ in range(self.num_layers)])
    state = self.variable('cache', 'memory', zeros) if decode else None
    padded = jnp.pad(tokens, ((0, 0), (0, n_chunks * chunk - length))).reshape(batch, n_chunks, chunk)
    n_valid = jnp.minimum(length - jnp.arange(n_chunks) * chunk, chunk)
    scan = nn.scan(LandmarkStack, variable_broadcast='params', split_rngs={'params': False},
                   in_axes=((1, 0),), out_axes=1)
    final, logits = scan(config, name='stack')(state.value if decode else zeros(), (padded, n_valid))
    if decode and not self.is_initializing():
      state.value = final
    return logits.reshape(batch, n_chunks * chunk, -1)[:, :length]

  def analytic_param_count(self) -> int:
    d = self.d_model
    block = layers.block_param_count(d, self.num_heads, self.d_ff, norm='layernorm', mlp='gelu', use_bias=False)
    return self.vocab_size * d + self.landmarks * d + self.num_layers * block + d

  def forward_flops_per_token(self, seq_len: int) -> float:
    if not self.landmarks:
      return layers.decoder_flops_per_token(self.d_model, self.num_layers, self.d_ff, 'gelu', self.vocab_size, seq_len)
    entries = 1 + 1 / self.block_size   # landmarks run through every layer, never through the readout
    body = layers.decoder_flops_per_token(self.d_model, self.num_layers, self.d_ff, 'gelu', 0, round(seq_len * entries))
    return entries * body + 2 * self.d_model * self.vocab_size

"""Hierarchical autoregressive transformer (HAT, arXiv 2501.10322): bytes in, words inside.

Inputs are word-structured batches (`models.formats.words.py`): word_bytes [batch, words, bytes] and
word_lengths [batch, words] (0: a padding word, always after the real ones).
  1. Encoder: [W] then the word's bytes, bidirectional within the word (RoPE over the byte position);
     its output at [W], projected up to the backbone width, is the word embedding.
  2. Backbone: causal over the word embeddings (RoPE over the word index); its outputs projected down
     to the byte width are the predictive word embeddings p_i.
  3. Decoder: causal over [p_{i-1}; bytes of word i], predicting those bytes and then [W]. Word 0 of a
     window is decoded from a learned start vector (the paper leaves the first word open).
Every part is a Llama-style pre-norm block (RMSNorm, SwiGLU, RoPE, no biases). Logits are
[batch, words, bytes + 1, vocab]: byte ids 0-255, end of document [S] = 256 (the byte tokenizer's eos),
end of word [W] = 257.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, sampling as sampling_lib, stack
from models.formats import byte_ids, words as words_lib
from models.registry import LanguageModel, register

END_OF_DOCUMENT = byte_ids.EOS             # [S]: 256
END_OF_WORD = byte_ids.VOCAB_SIZE          # [W]: 257, the one symbol beyond the byte tokenizer


class Stack(nn.Module):
  """Llama-style pre-norm blocks (RMSNorm, SwiGLU, RoPE, no biases) and a final norm over [batch, length, width]."""
  width: int
  num_layers: int
  num_heads: int
  d_ff: int
  dropout: float
  dtype: layers.Dtype
  remat: str
  scan_layers: bool
  attention_impl: str

  @nn.compact
  def __call__(self, x, mask, positions, *, train: bool, decode: bool = False):
    x = stack.apply_blocks(
        layers.Block, x, stack.Context(mask=mask, positions=positions, train=train, decode=decode),
        num_layers=self.num_layers, remat_policy=self.remat, scan=self.scan_layers, d_model=self.width,
        num_heads=self.num_heads, d_ff=self.d_ff, norm='rmsnorm', mlp='swiglu', use_rope=True, use_bias=False,
        dropout=self.dropout, dtype=self.dtype, out_init=layers.residual_init(self.num_layers),
        attention_impl=self.attention_impl)
    return layers.norm('rmsnorm', dtype=self.dtype, name='final_norm')(x)


@register('hat')
class HAT(LanguageModel):
  """HAT. `byte_*` size the encoder and decoder, `d_model`/`num_layers`/... the word backbone;
  `max_words`/`max_word_bytes`/`splitter` shape the batches (see models.formats.words.py)."""
  batch_format = 'words'
  extra_output_symbols = 1   # [W]
  cached_decoding = False    # `generate` runs the word and byte loops (each with a KV cache of its own)
  # paper: HAT 1B (spec hat-mrt5-landmark-lexinvariant.md §1.1, §1.6): byte modules 3 x 768, backbone 18 x 2304,
  # SwiGLU at 8/3; 16,384-byte windows hold ~2,750 words at 5.97 bytes a word; words over 16 bytes are split
  presets = {'tiny': dict(byte_width=32, byte_heads=2, byte_ff=64, encoder_layers=1, decoder_layers=1, d_model=32,
                          num_layers=2, num_heads=2, d_ff=64, max_words=8, max_word_bytes=8),
             'paper': dict(byte_width=768, byte_heads=6, byte_ff=2048, encoder_layers=3, decoder_layers=3,
                           d_model=2304, num_layers=18, num_heads=18, d_ff=6144, max_words=3072, max_word_bytes=16,
                           splitter='whitespace')}

  @classmethod
  def arena_layout(cls, *, d_model, depth, heads):
    """Byte modules at half width, 1 layer each (depth <= 4) or 2; the word backbone at `depth`; words of at
    most 16 bytes (`max_words` is set by the arena from the window)."""
    byte_layers = 1 if depth <= 4 else 2
    return dict(num_layers=depth, num_heads=heads, d_ff=4 * d_model, byte_width=d_model // 2,
                byte_heads=max(1, heads // 2), byte_ff=3 * d_model // 2, encoder_layers=byte_layers,
                decoder_layers=byte_layers, max_word_bytes=16)
  vocab_size: int = 258
  byte_width: int = 256
  byte_heads: int = 4
  byte_ff: int = 768
  encoder_layers: int = 2
  decoder_layers: int = 2
  d_model: int = 512
  num_layers: int = 8
  num_heads: int = 8
  d_ff: int = 1408
  max_words: int = 128
  max_word_bytes: int = 32
  splitter: str = 'whitespace'
  dropout: float = 0.0
  dtype: str = 'float32'
  attention_impl: str = 'fused'   # layers.ATTENTION_IMPLS
  remat: str = 'none'             # stack.REMAT_POLICIES
  scan_layers: bool = False

  def validate(self):
    super().validate()
    layers.check_attention_impl(self.attention_impl)
    stack.check_remat(self.remat)
    if self.byte_width % self.byte_heads:
      raise ValueError(f'model.byte_heads={self.byte_heads} does not divide model.byte_width={self.byte_width}')
    if self.splitter not in words_lib.SPLITTERS:
      raise ValueError(f'model.splitter={self.splitter!r} must be one of {words_lib.SPLITTERS}')
    if min(self.max_words, self.max_word_bytes) < 1:
      raise ValueError('model.max_words and model.max_word_bytes must be positive')

  def example_inputs(self, batch_size, seq_len):
    return {'word_bytes': jax.ShapeDtypeStruct((batch_size, self.max_words, self.max_word_bytes), jnp.int32),
            'word_lengths': jax.ShapeDtypeStruct((batch_size, self.max_words), jnp.int32)}

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    stack_kwargs = dict(dropout=self.dropout, dtype=dtype, remat=self.remat, scan_layers=self.scan_layers,
                        attention_impl=self.attention_impl)
    byte_stack = lambda n, name: Stack(width=self.byte_width, num_layers=n, num_heads=self.byte_heads,
                                       d_ff=self.byte_ff, **stack_kwargs, name=name)
    self.byte_embed = layers.Embed(self.vocab_size, self.byte_width, dtype=dtype, name='byte_embed')
    self.encoder = byte_stack(self.encoder_layers, 'encoder')
    self.word_up = layers.dense(self.d_model, ('embed', 'mlp'), use_bias=False, dtype=dtype, name='word_up')
    self.backbone = Stack(width=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads, d_ff=self.d_ff,
                          **stack_kwargs, name='backbone')
    self.word_down = layers.dense(self.byte_width, ('mlp', 'embed'), use_bias=False, dtype=dtype, name='word_down')
    self.start = self.param('start', layers.logical(layers.default_init, ('embed',)), (self.byte_width,))
    self.decoder = byte_stack(self.decoder_layers, 'decoder')
    self.readout = layers.dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=dtype, name='readout')

  def __call__(self, word_bytes, word_lengths, *, train: bool = False, decode: bool = False):
    predictive = self.backbone_step(self.encode(word_bytes, word_lengths, train=train), train=train, decode=decode)
    previous = jnp.concatenate([jnp.broadcast_to(self.start, (predictive.shape[0], 1, self.byte_width)),
                                predictive[:, :-1]], axis=1)
    return self.decode_words(previous, word_bytes, train=train), {}

  def encode(self, word_bytes, word_lengths, *, train: bool = False):
    """Word embeddings [batch, words, d_model] of [W] + each word's bytes, read at [W]."""
    batch, words, length = word_bytes.shape
    ids = jnp.concatenate([jnp.full((batch, words, 1), END_OF_WORD, word_bytes.dtype), word_bytes], axis=-1)
    x = self.byte_embed(ids.reshape(batch * words, length + 1))
    positions = jnp.arange(length + 1)[None]
    valid = positions <= word_lengths.reshape(-1, 1)
    h = self.encoder(x, layers.padding_mask(valid, valid), positions, train=train)
    return self.word_up(h[:, 0]).reshape(batch, words, self.d_model)

  @nn.compact   # the decode position counter is a variable made on first use
  def backbone_step(self, embeddings, *, train: bool = False, decode: bool = False):
    """Predictive word embeddings [batch, words, byte_width]; `decode` advances the backbone's KV cache."""
    positions = layers.sequence_positions(self, embeddings.shape[1], decode)
    mask = None if decode else layers.causal_mask(positions, positions)
    return self.word_down(self.backbone(embeddings, mask, positions, train=train, decode=decode))

  def decode_words(self, previous, word_bytes, *, train: bool = False):
    """Logits [batch, words, bytes + 1, vocab] of each word's bytes then [W], from [p_{i-1}; bytes of word i]."""
    batch, words, length = word_bytes.shape
    x = jnp.concatenate([previous[:, :, None], self.byte_embed(word_bytes)], axis=2)
    x = x.reshape(batch * words, length + 1, self.byte_width)
    positions = jnp.arange(length + 1)[None]
    h = self.decoder(x, layers.causal_mask(positions, positions), positions, train=train)
    return self.readout(h).reshape(batch, words, length + 1, self.vocab_size).astype(jnp.float32)

  def analytic_param_count(self) -> int:
    stack = lambda width, n, heads, ff: n * layers.block_param_count(
        width, heads, ff, norm='rmsnorm', mlp='swiglu', use_bias=False) + width   # blocks and final norm
    bw = self.byte_width
    return (2 * self.vocab_size * bw + bw                                       # byte embedding, readout, start
            + stack(bw, self.encoder_layers, self.byte_heads, self.byte_ff)
            + stack(bw, self.decoder_layers, self.byte_heads, self.byte_ff)
            + stack(self.d_model, self.num_layers, self.num_heads, self.d_ff) + 2 * bw * self.d_model)

  def forward_flops_per_token(self, seq_len: int) -> float:
    """Per byte of a window of `seq_len` bytes, as executed: every word slot runs the byte modules over
    max_word_bytes + 1 positions whether filled or not (`forward_flops_per_real_byte`: the paper's count)."""
    return self._forward_flops(np.full(self.max_words, self.max_word_bytes + 1), self.max_words) / seq_len

  def forward_flops_per_real_byte(self, word_lengths: np.ndarray) -> float:
    """Per byte of the words of packed windows, word_lengths [windows, max_words] (0: a padding slot), counting
    only what the paper counts: each real word runs the byte modules over its bytes + 1 and the backbone
    once, attending over its window's real words (an end-of-document [S] counts as a byte)."""
    real = word_lengths > 0
    flops = sum(self._forward_flops(lengths[filled] + 1, filled.sum()) for lengths, filled in zip(word_lengths, real))
    return flops / word_lengths.sum()

  def _forward_flops(self, positions: np.ndarray, window_words: int) -> float:
    """Forward FLOPs of a window's words whose byte modules run over `positions` [words] positions each,
    the backbone attending over `window_words`."""
    # decoder_flops_per_token halves attention for the causal mask: the bidirectional encoder counts double
    byte_module = lambda n, attended: layers.decoder_flops_per_token(self.byte_width, n, self.byte_ff, 'swiglu', 0, attended)
    backbone = layers.decoder_flops_per_token(self.d_model, self.num_layers, self.d_ff, 'swiglu', 0, window_words)
    projections = 2 * 2 * self.d_model * self.byte_width
    readout = 2 * self.byte_width * self.vocab_size
    byte_modules = positions * (byte_module(self.encoder_layers, 2 * positions)
                                + byte_module(self.decoder_layers, positions) + readout)
    return float(byte_modules.sum() + len(positions) * (backbone + projections))

  def decode_byte_inputs(self, vectors, *, decode: bool = True):
    """Byte decoder logits [batch, n, vocab] for `vectors` [batch, n, byte_width] fed against its KV cache:
    a word starts from a fresh cache with [p_{i-1}] (and any forced bytes), then one byte per call."""
    h = self.decoder(vectors, None, jnp.zeros(vectors.shape[:2], jnp.int32), train=False, decode=decode)
    return self.readout(h).astype(jnp.float32)

  def generate(self, params, prompts, max_new_tokens: int, *, key,
               sampling: sampling_lib.Sampling = sampling_lib.Sampling(), stop: sampling_lib.StopFn | None = None,
               model_state: dict | None = None) -> list[np.ndarray]:
    """The new byte ids ([S] included when generated) after each prompt, one prompt after another (word
    boundaries differ between rows); see `generate_words`."""
    out = []
    for row, prompt in enumerate(prompts):
      words, prompt_words, prompt_bytes = self.generate_words(
          params, prompt, max_new_tokens, key=jax.random.fold_in(key, row), sampling=sampling, stop=stop,
          model_state=model_state)
      out.append(np.asarray(sum(words[prompt_words:], [])[prompt_bytes:], np.int32))
    return out

  def generate_words(self, params, prompt: np.ndarray, max_new_tokens: int, *, key,
                     sampling: sampling_lib.Sampling = sampling_lib.Sampling(), stop: sampling_lib.StopFn | None = None,
                     model_state: dict | None = None):
    """The two nested loops: decode bytes until [W] (or the byte cap), encode the finished word and
    advance the backbone by one word with its KV cache. The prompt's last word is never taken as
    finished (more bytes may belong to it): it is the forced start of the first decoded word. Stops at
    [S], when `stop` says so, or after `max_new_tokens` bytes. The byte decoder keeps a KV cache within the
    word, started afresh at each word. Returns (every word, prompt's and generated, as id lists; the number
    of finished prompt words; the bytes of the forced start)."""
    finished = [list(w) for w in words_lib.split_ids(np.asarray(prompt), END_OF_DOCUMENT, self.splitter,
                                                     self.max_word_bytes)]
    ends_document = bool(finished) and finished[-1] == [END_OF_DOCUMENT]   # then generation starts a new document
    current = [] if ends_document or not finished else finished.pop()
    prompt_words, prompt_bytes = len(finished), len(current)
    capacity = prompt_words + max_new_tokens + 2
    pad = lambda ws: np.stack([np.pad(np.asarray(w, np.int32), (0, self.max_word_bytes - len(w))) for w in ws])[None]
    cache = sampling_lib.init_cache(self, 1, capacity, method=HAT.__call__, decode=True,
                                    word_bytes=jnp.zeros((1, capacity, self.max_word_bytes), jnp.int32),
                                    word_lengths=jnp.zeros((1, capacity), jnp.int32))
    empty_byte_cache = sampling_lib.init_cache(self, 1, self.max_word_bytes + 1, method=HAT.decode_byte_inputs,
                                               vectors=jnp.zeros((1, self.max_word_bytes + 1, self.byte_width)), decode=True)
    state = model_state or {}
    advance, feed = _decoding_fns(self)

    def finish(ws):
      nonlocal previous, cache
      previous, cache = advance(params, state, cache, pad(ws), np.asarray([[len(w) for w in ws]], np.int32))
      words.extend(ws)

    def begin_word(forced):
      return feed(params, state, empty_byte_cache, previous, jnp.asarray(forced, jnp.int32), len(forced))

    words, previous, generated = [], params['start'][None], []
    if finished:
      finish(finished)
    logits, byte_cache = begin_word(current) if len(current) < self.max_word_bytes else (None, None)
    while len(generated) < max_new_tokens:
      if len(current) == self.max_word_bytes:   # the cap ends a word, as the splitter cuts it
        finish([current])
        current = []
        logits, byte_cache = begin_word(current)
      symbol = int(sampling.pick(logits, jax.random.fold_in(key, len(generated))[None])[0])
      if symbol == END_OF_WORD:
        finish([current])
        current = []
        logits, byte_cache = begin_word(current)
        continue
      current.append(symbol)
      generated.append(symbol)
      if symbol == END_OF_DOCUMENT or (stop and stop(generated)):
        break
      if len(current) < self.max_word_bytes:
        logits, byte_cache = feed(params, state, byte_cache, None, jnp.asarray([symbol], jnp.int32), len(current))
    if current:
      words.append(current)
    return words, prompt_words, prompt_bytes


@functools.cache   # one compilation per model (and shapes) across generations
def _decoding_fns(model: HAT):
  """(advance: encode finished words and run them through the backbone's KV cache -> the last predictive
  word embedding; feed: byte decoder inputs [p_{i-1}] (None inside a word) and bytes -> next-byte logits)."""
  @jax.jit
  def advance(params, state, cache, word_bytes, word_lengths):
    embeddings = model.apply({'params': params, **state}, word_bytes, word_lengths, method=HAT.encode)
    predictive, updated = model.apply({'params': params, 'cache': cache, **state}, embeddings, decode=True,
                                      method=HAT.backbone_step, mutable=['cache'])
    return predictive[:, -1], updated['cache']

  @jax.jit
  def feed(params, state, byte_cache, previous, ids, position):
    vectors = model.apply({'params': params}, ids[None], method=lambda m, ids: m.byte_embed(ids))
    if previous is not None:
      vectors = jnp.concatenate([previous[:, None], vectors], axis=1)
    logits, updated = model.apply({'params': params, 'cache': byte_cache, **state}, vectors,
                                  method=HAT.decode_byte_inputs, mutable=['cache'])
    # a word never ends before its first byte
    logits = jnp.where((jnp.arange(model.vocab_size) == END_OF_WORD) & (position == 0), -jnp.inf, logits[:, -1])
    return logits, updated['cache']
  return advance, feed

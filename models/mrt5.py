"""ByT5-style byte-level encoder-decoder (`byt5`) and MrT5's learned delete gate on top of it (`mrt5`),
arXiv 2410.20771; spec: ../shared/specs/hat-mrt5-landmark-lexinvariant.md section 2.

The base model is T5.1.1 at byte level: pre-RMSNorm layers without biases, a T5 relative position bias
per stack (bidirectional in the encoder, causal in the decoder, shared by the stack's layers), gated-GELU
feed-forward, untied readout, T5's initialisation (`fan_in_init`; logits are scaled by 1/sqrt(head
width) instead of T5's folding that into the query init), and softmax₁ (`softmax1`: an implicit extra
zero logit, the paper's attention for ByT5 and MrT5 alike). Batches come from `models.formats.seq2seq` (span
corruption, vowel removal).

Deletion (`deletion`) acts at the start of encoder layer `gate_layer`:
  gate    G = k·σ(-(w·RMSNorm(h) + b)), k = `gate_scale` = -30, b initialised to 1 and w Xavier-uniform
          (`gate_kernel_init`, the official code's), so G starts spread around k·σ(-1) ≈ -8 and few tokens
          are deleted; pads get G = k.
  random  a N(δ, 0.05) share of each sequence gets G = k, the rest 0 (the paper's RandomT5).
  fixed   evenly spaced bytes inside each run between separators (space, punctuation, eos) get G = k,
          a δ share of each run (FixedT5).
Soft deletion (training; `eval_deletion=soft`): G is a key bias in every later encoder self-attention
(layer `gate_layer` included) and every decoder cross-attention. Hard deletion (evaluation,
generation): tokens with G < k/2 are dropped. The kept ones are gathered in order to the smallest of
`hard_buckets` static lengths that holds every row's kept tokens, so the later layers and the
cross-attention really run on shorter tensors. Kept tokens keep their original positions, so their
relative position bias is that of the full sequence. As in the official code, the kept tokens' gate
values are dropped with the deleted tokens (`hard_keeps_gate_bias=False`), so hard differs from soft
deletion wherever a kept gate is not at 0; `hard_keeps_gate_bias=True` keeps them as key biases, and
hard then equals soft deletion once deleted gates sit at k.

Training losses (gate only): `loss/gate` = α·mean(G) over non-pad tokens, with α from the PI controller
toward the deletion rate δ = `target_deletion` (`controller=pi`; state in the `controller` collection)
or fixed (`controller=fixed`, `gate_alpha`), both off for the first `regularizer_delay` steps; and
`loss/score` = β·mean(max(s, 5) - 5) over the pre-softmax logits s (position bias and mask in, gate out)
of the gated encoder layers and all cross-attentions (App. D, for training from scratch).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, sampling as sampling_lib, stack
from models.formats import seq2seq
from models.registry import InputError, LanguageModel, register

DELETIONS = ('none', 'gate', 'random', 'fixed')
SCORE_THRESHOLD = 5.0
MASKED = -1e9   # finite, so the score penalty of masked logits is exactly zero
ALNUM = np.frombuffer(b'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ', np.uint8).astype(np.int32)


def fan_in_init(fan_in: int) -> layers.Initializer:
  """T5's initialisation: weights ~ N(0, 1/fan_in) (embeddings ~ N(0, 1)). With the GPT-style 0.02 the
  tiny embeddings drown under the layers' position-independent output and the decoder learns to ignore
  the encoder (measured: cross-attention gradients near zero, shuffling the encoder inputs changes
  nothing after 600 steps)."""
  return nn.initializers.normal(fan_in ** -0.5)


def softmax_one(logits: jax.Array) -> jax.Array:
  """exp(x_i) / (1 + Σ_j exp(x_j)) over the last axis, stable: the row maximum (at least 0) is taken out.
  A row whose logits are all masked gets zero weights."""
  top = jax.lax.stop_gradient(jnp.maximum(logits.max(-1, keepdims=True), 0.0))
  e = jnp.exp(logits - top)
  return e / (jnp.exp(-top) + e.sum(-1, keepdims=True))


class T5Attention(nn.Module):
  """Attention on explicit logits (the score regulariser reads them); returns (out, score penalty).

  Decoding (`decode=True`): self-attention appends its keys and values to a KV cache (the caller's mask
  and bias then span the whole cache); cross-attention (`cross=True`) projects the encoder output once,
  when it is given, and reads those keys and values from the cache on the calls after (`kv=None`)."""
  num_heads: int
  head_dim: int
  softmax1: bool
  dtype: layers.Dtype

  @nn.compact
  def __call__(self, x, kv, mask, position_bias=None, key_bias=None, *, decode: bool = False, cross: bool = False):
    project = lambda y, name: layers.dense((self.num_heads, self.head_dim), ('embed', 'heads', 'kv'),
                                           use_bias=False, dtype=self.dtype, kernel_init=fan_in_init(y.shape[-1]),
                                           name=name)(y)
    q = project(x, 'query')
    k, v = (None, None) if kv is None else (project(kv, 'key'), project(kv, 'value'))
    if decode and cross:
      cached = {name: self.variable('cache', f'cross_{name}', lambda y=y: y) for name, y in (('key', k), ('value', v))}
      if kv is not None:
        cached['key'].value, cached['value'].value = k, v
      k, v = cached['key'].value, cached['value'].value
    elif decode:
      full = layers.append_to_cache(self, layers.cache_index(self), key=k, value=v)
      k, v = full['key'], full['value']
    q = layers.constrain(q, ('batch', 'length', 'act_heads', None))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    if position_bias is not None:
      scores = scores + position_bias
    scores = jnp.where(mask, scores, MASKED)
    penalty = jnp.mean(jnp.maximum(scores, SCORE_THRESHOLD) - SCORE_THRESHOLD)
    if key_bias is not None:
      scores = scores + key_bias[:, None, None, :]
    weights = softmax_one(scores) if self.softmax1 else jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    out = layers.dense(x.shape[-1], ('heads', 'kv', 'embed'), axis=(-2, -1), use_bias=False, dtype=self.dtype,
                       kernel_init=fan_in_init(self.num_heads * self.head_dim), name='out')(out)
    return layers.constrain(out, ('batch', 'length', 'act_embed')), penalty


class T5Layer(nn.Module):
  """Pre-RMSNorm self-attention, cross-attention (decoder layers), gated-GELU feed-forward."""
  d_model: int
  num_heads: int
  head_dim: int
  d_ff: int
  softmax1: bool
  dropout: float
  dtype: layers.Dtype
  cross: bool = False

  @nn.compact
  def __call__(self, h, train: bool, decode: bool, *, mask, position_bias, key_bias=None, encoded=None,
               encoded_mask=None, encoded_key_bias=None):
    """-> (h, self-attention score penalty, cross-attention score penalty). `train` and `decode` are
    positional: the rematerialised layer takes them as static arguments."""
    attention = lambda name: T5Attention(num_heads=self.num_heads, head_dim=self.head_dim,
                                         softmax1=self.softmax1, dtype=self.dtype, name=name)
    norm = lambda name: layers.norm('rmsnorm', dtype=self.dtype, epsilon=1e-6, name=name)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    y = norm('self_norm')(h)
    out, self_penalty = attention('self_attention')(y, y, mask, position_bias, key_bias, decode=decode)
    h = h + drop(out)
    cross_penalty = jnp.zeros(())
    if self.cross:
      out, cross_penalty = attention('cross_attention')(norm('cross_norm')(h), encoded, encoded_mask, None,
                                                        encoded_key_bias, decode=decode, cross=True)
      h = h + drop(out)
    mlp = layers.Mlp(self.d_ff, kind='geglu', use_bias=False, dropout=self.dropout, dtype=self.dtype,
                     in_init=fan_in_init(self.d_model), out_init=fan_in_init(self.d_ff), name='mlp')
    return h + drop(mlp(norm('mlp_norm')(h), train=train)), self_penalty, cross_penalty


class DeleteGate(nn.Module):
  """G = k·σ(-(w·RMSNorm(h) + b)) in [k, 0]: ~0 keeps a token, ~k deletes it."""
  scale: float
  bias_init: float
  kernel_init: str

  @nn.compact
  def __call__(self, h):
    y = layers.norm('rmsnorm', epsilon=1e-6, name='norm')(h).astype(jnp.float32)
    init = nn.initializers.zeros_init() if self.kernel_init == 'zeros' else nn.initializers.xavier_uniform()
    w = self.param('kernel', layers.logical(init, ('embed', None)), (h.shape[-1], 1))
    b = self.param('bias', layers.logical(nn.initializers.constant(self.bias_init), (None,)), (1,))
    return self.scale * jax.nn.sigmoid(-(y @ w + b)[..., 0])


def pi_controller_update(terms, rate, target, k_p, k_i, ema):
  """One step of MrT5's PI controller on terms = [P, I]: with e = target - rate,
  P <- ema·P + (1 - ema)·k_p·e and I <- I + k_i·e; the gate loss weight is then α = max(0, P + I)."""
  error = target - rate
  return jnp.stack([ema * terms[0] + (1 - ema) * k_p * error, terms[1] + k_i * error])


def take_kept(x, order):
  """x [batch, length, ...] gathered along the length at `order` [batch, kept] (the kept tokens, in order)."""
  return jnp.take_along_axis(x, order.reshape(*order.shape, *[1] * (x.ndim - 2)), axis=1)


def hard_bucket_sizes(length: int, buckets: int) -> list[int]:
  """The static encoder lengths hard deletion compacts to: ceil(length·i/buckets), i = 1..buckets."""
  return sorted({-(-length * i // buckets) for i in range(1, buckets + 1)})


@register('byt5')
class ByT5(LanguageModel):
  """Byte-level T5 encoder-decoder; `mrt5` is the same model with `deletion=gate`."""
  batch_format = 'seq2seq'
  rng_streams = ('dropout', 'deletion')
  state_collections = ('controller',)   # the PI controller (deletion=gate)
  cached_decoding = False               # `generate` encodes once, then decodes over a buffer
  # paper: a ByT5-small-shaped base (spec hat-mrt5-landmark-lexinvariant.md §2.1): 12 + 4 layers, d=1472,
  # 6 heads of 64, gated-GELU 3,584
  presets = {'tiny': dict(d_model=32, num_heads=2, d_ff=64, encoder_layers=3, decoder_layers=2, gate_layer=1,
                          mean_span=3.0, hard_buckets=4),
             'paper': dict(d_model=1472, num_heads=6, head_dim=64, d_ff=3584, encoder_layers=12, decoder_layers=4,
                           gate_layer=3)}

  @classmethod
  def arena_layout(cls, *, d_model, depth, heads):
    """ByT5's 3:1 encoder:decoder depth, MrT5's gate after a quarter of the encoder."""
    decoder = max(1, depth // 4)
    return dict(num_heads=heads, encoder_layers=depth - decoder, decoder_layers=decoder,
                gate_layer=max(1, (depth - decoder) // 4), d_ff=2 * d_model)
  vocab_size: int = 0
  d_model: int = 256
  num_heads: int = 4
  head_dim: int = 0               # 0: d_model // num_heads; ByT5 has heads of 64 at every size (small: 6 x 64 at d=1472)
  d_ff: int = 512
  encoder_layers: int = 6
  decoder_layers: int = 2
  num_buckets: int = 32
  max_distance: int = 128
  softmax1: bool = True
  dropout: float = 0.0
  dtype: str = 'float32'
  task: str = 'span_corruption'   # span_corruption | vowel_removal (models.formats.seq2seq.py)
  noise_density: float = 0.15
  mean_span: float = 20.0
  deletion: str = 'none'          # none | gate | random | fixed
  gate_layer: int = 3             # the gate reads the hidden states after this many encoder layers
  gate_scale: float = -30.0       # k
  gate_bias_init: float = 1.0
  # xavier: the official code's init; each token's gate starts apart, so the controller can delete some
  # and not others (from scratch on vowel removal δ = 0.3 / 0.4 / 0.5 / 0.7 end at 0.32 / 0.39 / 0.42 / 0.49,
  # tests/test_mrt5.py).
  # zeros: every token starts at G = k·σ(-1) ≈ -8 and moves in lock-step with the rest (same run, δ = 0.4:
  # 0.29; on span corruption at δ = 0.5 it reached 100% deletion by step 25). Xavier draws on hidden states
  # with a large shared component can instead start every gate near k, where its gradient vanishes: check
  # the deletion rate of the first steps.
  gate_kernel_init: str = 'xavier'
  target_deletion: float = 0.5    # δ: the PI controller's target; the random/fixed deletion rate
  controller: str = 'pi'          # pi | fixed (gate_alpha)
  controller_p: float = 0.5       # k_p
  controller_i: float = 1e-5      # k_i
  controller_ema: float = 0.9
  # False: α = max(0, P + I), the official controller, which can only push towards deletion; True: α = P + I,
  # so a rate above δ pushes the gates back up (the only other force is the task loss, nil when the
  # decoder barely reads its encoder)
  controller_two_sided: bool = False
  gate_alpha: float = 0.0
  regularizer_delay: int = 0      # steps without gate loss
  score_weight: float = 0.5       # β of the attention-score regulariser (gate only; 0 = off)
  eval_deletion: str = 'hard'     # hard | soft, at evaluation and in generation
  hard_keeps_gate_bias: bool = False   # hard deletion: False drops the kept tokens' G (official), True keeps it
  hard_buckets: int = 8
  remat: str = 'none'             # stack.REMAT_POLICIES

  def validate(self):
    super().validate()
    checks = [(self.deletion in DELETIONS, f'model.deletion={self.deletion!r} must be one of {", ".join(DELETIONS)}'),
              (self.task in seq2seq.TASKS, f'model.task={self.task!r} must be one of {", ".join(seq2seq.TASKS)}'),
              (0 <= self.gate_layer < self.encoder_layers,
               f'model.gate_layer={self.gate_layer} must be in [0, model.encoder_layers={self.encoder_layers})'),
              (self.gate_scale < 0, f'model.gate_scale={self.gate_scale} must be negative'),
              (0 <= self.target_deletion < 1, f'model.target_deletion={self.target_deletion} must be in [0, 1)'),
              (self.gate_kernel_init in ('zeros', 'xavier'),
               f"model.gate_kernel_init={self.gate_kernel_init!r} must be 'zeros' or 'xavier'"),
              (self.controller in ('pi', 'fixed'), f"model.controller={self.controller!r} must be 'pi' or 'fixed'"),
              (self.eval_deletion in ('hard', 'soft'),
               f"model.eval_deletion={self.eval_deletion!r} must be 'hard' or 'soft'"),
              (self.hard_buckets > 0, 'model.hard_buckets must be positive'),
              (0 < self.noise_density < 1 and self.mean_span >= 1,
               'model.noise_density must be in (0, 1) and model.mean_span at least 1')]
    stack.check_remat(self.remat)
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.embed = layers.Embed(self.vocab_size, self.d_model, dtype=dtype, embedding_init=nn.initializers.normal(1.0))
    bias = lambda bidirectional: layers.RelativePositionBias(
        num_heads=self.num_heads, bidirectional=bidirectional, num_buckets=self.num_buckets,
        max_distance=self.max_distance)
    self.encoder_bias, self.decoder_bias = bias(True), bias(False)
    # Encoder and decoder loop over their layers themselves: the gate splits the encoder in two, and every
    # layer returns score penalties; the remat policy is the shared one.
    layer_cls = stack.remat(T5Layer, self.remat, static_argnums=(2, 3))
    layer = lambda cross: layer_cls(d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_width,
                                    d_ff=self.d_ff,
                                    softmax1=self.softmax1, dropout=self.dropout, dtype=dtype, cross=cross)
    self.encoder = [layer(False) for _ in range(self.encoder_layers)]
    self.decoder = [layer(True) for _ in range(self.decoder_layers)]
    self.encoder_norm = layers.norm('rmsnorm', dtype=dtype, epsilon=1e-6)
    self.decoder_norm = layers.norm('rmsnorm', dtype=dtype, epsilon=1e-6)
    # Drawn as [vocab, embed] and transposed: padding the vocabulary for the tensor axis then leaves the
    # initial values of the real ids unchanged (a 1-device and a sharded run start alike).
    readout_init = lambda key, shape, dtype: fan_in_init(self.d_model)(key, shape[::-1], dtype).T
    self.readout = layers.dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=dtype,
                                kernel_init=readout_init)
    if self.deletion == 'gate':
      self.gate = DeleteGate(scale=self.gate_scale, bias_init=self.gate_bias_init, kernel_init=self.gate_kernel_init)
      # The controller's state: steps seen (for the delay), the EMA'd proportional term, the integral.
      self.controller_step = self.variable('controller', 'step', lambda: jnp.zeros((), jnp.int32))
      self.controller_terms = self.variable('controller', 'terms', lambda: jnp.zeros((2,)))
    self.drop = nn.Dropout(self.dropout)

  # ------------------------------------------------------------------------------------ the stacks
  def encode_front(self, encoder_tokens, train: bool = False):
    """Embedding and the encoder layers before the gate -> (h, valid, positions, G or None)."""
    valid = encoder_tokens != seq2seq.PAD
    positions = jnp.broadcast_to(jnp.arange(encoder_tokens.shape[1]), encoder_tokens.shape)
    h = self.drop(self.embed(encoder_tokens), deterministic=not train)
    bias, mask = self.encoder_bias(positions, positions), layers.padding_mask(valid, valid)
    for layer in self.encoder[:self.gate_layer]:
      h, _, _ = layer(h, train, False, mask=mask, position_bias=bias)
    return h, valid, positions, self.gate_values(h, encoder_tokens, valid)

  def encode_back(self, h, valid, positions, gate, train: bool = False):
    """The encoder layers from the gate on, `gate` [batch, length] (or None) a key bias -> (out, penalties)."""
    bias, mask = self.encoder_bias(positions, positions), layers.padding_mask(valid, valid)
    penalties = []
    for layer in self.encoder[self.gate_layer:]:
      h, penalty, _ = layer(h, train, False, mask=mask, position_bias=bias, key_bias=gate)
      penalties.append(penalty)
    return self.encoder_norm(h), penalties

  @nn.compact   # the decode position counter is a variable made on first use
  def decode(self, encoded, encoded_valid, gate, decoder_tokens, train: bool = False, decode_length: int = 0):
    """Decoder logits [batch, target, vocab] and the cross-attention score penalties. `decode_length` > 0:
    decode against a KV cache of that many positions, `decoder_tokens` continuing the ones fed before;
    `encoded` is given on the first call only (its keys and values are cached)."""
    positions = layers.sequence_positions(self, decoder_tokens.shape[1], decode_length > 0)
    kv_positions = jnp.arange(decode_length)[None] if decode_length else positions
    y = self.drop(self.embed(decoder_tokens), deterministic=not train)
    bias, mask = self.decoder_bias(positions, kv_positions), layers.causal_mask(positions, kv_positions)
    encoded_mask = encoded_valid[:, None, None, :]
    penalties = []
    for layer in self.decoder:
      y, _, penalty = layer(y, train, decode_length > 0, mask=mask, position_bias=bias, encoded=encoded,
                            encoded_mask=encoded_mask, encoded_key_bias=gate)
      penalties.append(penalty)
    y = self.drop(self.decoder_norm(y), deterministic=not train)
    return self.readout(y).astype(jnp.float32), penalties

  # ------------------------------------------------------------------------------------ deletion
  def gate_values(self, h, tokens, valid):
    """G [batch, length] in [k, 0] (pads at k), or None without deletion."""
    k = self.gate_scale
    if self.deletion == 'none':
      return None
    if self.deletion == 'gate':
      return jnp.where(valid, self.gate(h), k)
    if self.deletion == 'random':
      rate_key, draw_key = jax.random.split(self.make_rng('deletion'))
      rate = self.target_deletion + 0.05 * jax.random.normal(rate_key, (tokens.shape[0], 1))
      deleted = jax.random.uniform(draw_key, tokens.shape) < rate
    else:   # fixed: a δ share of each run between separators, evenly spaced
      ascii_ = tokens < 128
      separator = ((tokens == seq2seq.EOS) | (ascii_ & ~jnp.isin(tokens, jnp.asarray(ALNUM)))) & valid
      index = jnp.arange(tokens.shape[1])
      last_separator = jax.lax.cummax(jnp.where(separator | ~valid, index, -1), axis=1)
      j = index - last_separator - 1   # position inside the run
      share = lambda n: jnp.floor(n * self.target_deletion + 0.5)
      deleted = ~separator & (share(j + 1) > share(j))
    return jnp.where(deleted | ~valid, k, 0.0)

  def deleted(self, gate, valid):
    return (gate < self.gate_scale / 2) & valid

  def hard_plan(self, gate, valid):
    """Hard deletion's plan: the kept tokens, the gather order putting them first (in order), the bucket
    sizes and the index of the smallest bucket that holds every row's kept tokens."""
    keep = valid & ~self.deleted(gate, valid)
    order = jnp.argsort(~keep, axis=1, stable=True)
    sizes = hard_bucket_sizes(gate.shape[1], self.hard_buckets)
    return keep, order, sizes, jnp.searchsorted(jnp.asarray(sizes), keep.sum(1).max())

  def hard_key_bias(self, kept_gate):
    """The key bias of the tokens hard deletion keeps: none (official), or their gate values."""
    return kept_gate if self.hard_keeps_gate_bias else None

  def _hard_forward(self, h, valid, positions, gate, decoder_tokens):
    """Hard deletion: the kept tokens, in order, gathered to the smallest bucket that holds them all."""
    keep, order, sizes, index = self.hard_plan(gate, valid)

    def branch(size):
      def run(module, h, keep, positions, gate, order, decoder_tokens):
        take = lambda x: take_kept(x, order[:, :size])
        kept_gate = module.hard_key_bias(take(gate))
        encoded, _ = module.encode_back(take(h), take(keep), take(positions), kept_gate)
        return module.decode(encoded, take(keep), kept_gate, decoder_tokens)[0]
      return run

    logits = nn.switch(index, [branch(s) for s in sizes], self, h, keep, positions, gate, order, decoder_tokens)
    return logits, jnp.asarray(sizes)[index] / h.shape[1]

  def __call__(self, encoder_tokens, decoder_tokens, *, train: bool = False):
    h, valid, positions, gate = self.encode_front(encoder_tokens, train)
    aux = {}
    if gate is not None:
      aux['mrt5/deletion_rate'] = self.deleted(gate, valid).sum() / jnp.maximum(valid.sum(), 1)
    if gate is not None and not train and self.eval_deletion == 'hard' and not self.is_initializing():
      logits, aux['mrt5/encoder_length_fraction'] = self._hard_forward(h, valid, positions, gate, decoder_tokens)
      return logits, aux
    encoded, encoder_penalties = self.encode_back(h, valid, positions, gate, train)
    logits, cross_penalties = self.decode(encoded, valid, gate, decoder_tokens, train)
    if self.deletion == 'gate' and (train or self.is_initializing()):   # init creates the controller state
      aux.update(self.gate_losses(gate, valid, aux['mrt5/deletion_rate'], encoder_penalties + cross_penalties))
    return logits, aux

  def gate_losses(self, gate, valid, rate, penalties) -> dict:
    """α·mean(G) with α from the controller (updated here with this batch's rate), β·score penalty."""
    active = self.controller_step.value >= self.regularizer_delay
    terms = self.controller_terms.value
    if self.controller == 'pi':
      terms = pi_controller_update(terms, jax.lax.stop_gradient(rate), self.target_deletion, self.controller_p,
                                   self.controller_i, self.controller_ema)
      alpha = terms.sum() if self.controller_two_sided else jnp.maximum(0.0, terms.sum())
    else:
      alpha = jnp.asarray(self.gate_alpha, jnp.float32)
    alpha = jnp.where(active, alpha, 0.0)
    if not self.is_initializing() and self.is_mutable_collection('controller'):
      self.controller_terms.value = jnp.where(active, terms, self.controller_terms.value)
      self.controller_step.value = self.controller_step.value + 1
    gate_mean = (gate * valid).sum() / jnp.maximum(valid.sum(), 1)
    return {'loss/gate': alpha * gate_mean, 'loss/score': self.score_weight * jnp.mean(jnp.stack(penalties)),
            'mrt5/alpha': alpha, 'mrt5/gate_mean': gate_mean}

  # ------------------------------------------------------------------------------------ interface
  @property
  def head_width(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def decoder_length(self, seq_len: int) -> int:
    return seq2seq.decoder_length(self.task, seq_len, self.noise_density, self.mean_span)

  def example_inputs(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {'encoder_tokens': jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
            'decoder_tokens': jax.ShapeDtypeStruct((batch_size, self.decoder_length(seq_len)), jnp.int32)}

  def analytic_param_count(self) -> int:
    d = self.d_model
    attention = 4 * d * (self.head_width * self.num_heads) + d                    # projections and its norm
    mlp = layers.mlp_param_count(d, self.d_ff, 'geglu', use_bias=False) + d
    gate = (2 * d + 1) if self.deletion == 'gate' else 0                        # norm, kernel, bias
    return (2 * self.vocab_size * d + 2 * self.num_buckets * self.num_heads + 2 * d + gate
            + self.encoder_layers * (attention + mlp) + self.decoder_layers * (2 * attention + mlp))

  def forward_flops_per_token(self, seq_len: int) -> float:
    """Per encoder position (train.seq_len of them per example), without deletion: the training cost,
    since soft deletion saves nothing. The decoder's share is scaled by target / input length."""
    d, mlp = self.d_model, layers.mlp_matmul_params(self.d_model, self.d_ff, 'geglu')
    inner = self.head_width * self.num_heads                                    # the attention width
    target = self.decoder_length(seq_len)
    encoder_layer = 2 * (4 * d * inner + mlp) + 4 * inner * seq_len             # bidirectional attention
    per_target = (2 * (4 * d * inner + mlp) + 2 * inner * target                # causal self-attention
                  + 2 * 2 * d * inner + 4 * inner * seq_len)                    # cross: query, out, logits
    per_input = 2 * 2 * d * inner                                               # cross: keys and values
    decoder = self.decoder_layers * (per_target * target / seq_len + per_input)
    gate = 2 * d if self.deletion == 'gate' else 0
    return self.encoder_layers * encoder_layer + decoder + 2 * d * self.vocab_size * target / seq_len + gate

  def generate(self, params, prompts, max_new_tokens, *, key, sampling=sampling_lib.Sampling(), stop=None,
               model_state=None):
    """Decoding of the target for each encoder input (+ eos), in one batch; a row stops after eos. The
    prompts are encoded once; with hard deletion each row's kept tokens are gathered in order, to the
    longest row's kept count (the rest masked). The decoder keeps a KV cache, and its cross-attention
    keys and values are computed once from the encoder output."""
    variables = {'params': params, **(model_state or {})}
    rngs = self.stream_keys(sampling_lib.stream_key(key))
    inputs = [np.append(p, seq2seq.EOS) for p in prompts]
    tokens = np.full((len(inputs), max(map(len, inputs))), seq2seq.PAD, np.int32)
    for row, ids in enumerate(inputs):
      tokens[row, :len(ids)] = ids
    encode_front, encode_back, step = _decoding_fns(self)
    h, valid, positions, gate = encode_front(variables, jnp.asarray(tokens), rngs)
    if gate is not None and self.eval_deletion == 'hard':
      keep, order, _, _ = self.hard_plan(gate, valid)
      if not keep.any(axis=1).all():
        raise InputError('hard deletion removed every token of a prompt '
                         '(sample with --config.model.eval_deletion=soft)')
      order = order[:, :int(keep.sum(1).max())]   # the longest row's kept tokens, not a bucket
      h, positions, gate = (take_kept(x, order) for x in (h, positions, gate))
      valid, gate = take_kept(keep, order), self.hard_key_bias(gate)
    encoded = encode_back(variables, h, valid, positions, gate)
    start = jnp.full((len(inputs), 1), seq2seq.PAD, jnp.int32)   # the decoder's start token
    cache = sampling_lib.init_cache(self, len(inputs), max_new_tokens, method=ByT5.decode, encoded=encoded,
                                    encoded_valid=valid, gate=gate, decode_length=max_new_tokens,
                                    decoder_tokens=jnp.zeros((len(inputs), max_new_tokens), jnp.int32))

    def advance(tokens, position):
      nonlocal cache
      logits, cache = step(variables, cache, None, valid, gate, tokens[:, None], max_new_tokens)
      return logits

    logits, cache = step(variables, cache, encoded, valid, gate, start, max_new_tokens)
    eos_or_stop = lambda ids: ids[-1] == seq2seq.EOS or bool(stop and stop(ids))
    return sampling_lib.lockstep([np.asarray([seq2seq.PAD])] * len(inputs), max_new_tokens,
                                 start=lambda prefix: logits, advance=advance, stop=eos_or_stop,
                                 pick=lambda logits, rows, steps: sampling_lib.draw(sampling, logits, key, rows, steps))


@functools.cache   # one compilation per model (and shapes) across generations
def _decoding_fns(model: ByT5):
  """(encode_front, encode_back, decoder step against its KV cache; `encoded` given on the first step only)."""
  encode_front = jax.jit(lambda variables, tokens, rngs: model.apply(variables, tokens, method=ByT5.encode_front,
                                                                     rngs=rngs))
  encode_back = jax.jit(lambda variables, *a: model.apply(variables, *a, method=ByT5.encode_back)[0])

  @functools.partial(jax.jit, static_argnames='decode_length')
  def step(variables, cache, encoded, valid, gate, tokens, decode_length: int):
    (logits, _), updated = model.apply({**variables, 'cache': cache}, encoded, valid, gate, tokens,
                                       decode_length=decode_length, method=ByT5.decode, mutable=['cache'])
    return logits[:, -1], updated['cache']
  return encode_front, encode_back, step


@register('mrt5')
class MrT5(ByT5):
  """ByT5 with the learned delete gate (the paper's defaults: δ via the PI controller, β = 0.5)."""
  deletion: str = 'gate'

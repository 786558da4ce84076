"""Batch formats: how corpus windows become a model's batch, which keys the model reads, and how its logits
are scored. A model names its format (`LanguageModel.batch_format`); the data pipeline builds batches with
`build`, and training and evaluation score through the model (`LanguageModel.score`, by default its format's
`score`), so neither the trainer nor the data pipeline has a branch per format.

  lm       next-token prediction over token windows (every decoder LM)
  words    word-structured bytes [batch, words, bytes] (HAT; `formats.words`)
  seq2seq  encoder-decoder examples of the model's `task` (ByT5, MrT5; `formats.seq2seq`)

Every batch holds the model's inputs plus `targets` and `weights` (0 = not scored); a format that counts the
UTF-8 bytes it scores adds `bytes` per row (otherwise bits per byte use the split's bytes, pro rata).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.formats import byte_ids, seq2seq, words


class Score(NamedTuple):
  """Sums over a batch's rows: what evaluation accumulates and the training objective reads."""
  nll: jax.Array      # weighted NLL per position (the batch's trailing shape)
  weight: jax.Array   # weights per position
  right: jax.Array    # scored units predicted entirely right by argmax
  units: jax.Array    # scored units (tokens, or words)
  bytes: jax.Array    # UTF-8 bytes the batch counts; 0 when it counts none


def mask_padded_vocab(logits, vocab_limit: int):
  """Ids at or beyond the tokenizer's vocabulary (padding for sharding) get no probability."""
  if vocab_limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -1e9)


def token_nll(logits, targets, vocab_limit: int):
  """Per-token NLL in float32."""
  logits = mask_padded_vocab(logits.astype(jnp.float32), vocab_limit)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


class BatchFormat:
  """Token-level scoring: a unit is one scored target token."""
  name: ClassVar[str]
  inputs: ClassVar[tuple[str, ...]]   # the batch keys fed to the model
  reads_bytes: ClassVar[bool] = False   # built from byte ids (the model needs data.tokenizer=byte)
  # The input whose axis 1 is the axis along which the model is causal (the logits' axis 1 is the same).
  causal_input: ClassVar[str]
  # Batches carry `bytes` [batch]: the UTF-8 bytes their targets cover (else the split's count pro rata).
  counts_bytes: ClassVar[bool] = False

  def build(self, windows: np.ndarray, valid: np.ndarray, model_config) -> dict:
    """windows [batch, seq + 1] token ids and their validity -> the batch (numpy)."""
    raise NotImplementedError

  def model_inputs(self, batch: dict) -> dict:
    return {key: batch[key] for key in self.inputs}

  def units(self, right: jax.Array, scored: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-unit (right, scored) from per-target ones."""
    return right, scored

  def score(self, logits, batch: dict, vocab_limit: int) -> Score:
    weights = batch['weights']
    nll = token_nll(logits, batch['targets'], vocab_limit) * weights
    right = (mask_padded_vocab(logits, vocab_limit).argmax(-1) == batch['targets']) | (weights == 0)
    right, scored = self.units(right, weights > 0)
    counted = batch['bytes'].sum() if self.counts_bytes else jnp.zeros(())
    return Score(nll.sum(0), weights.sum(0), (right & scored).sum(), scored.sum(), counted)


class LanguageModeling(BatchFormat):
  name, inputs, causal_input = 'lm', ('tokens',), 'tokens'

  def build(self, windows, valid, model_config=None):
    """Next-token prediction: windows [batch, seq + 1] -> tokens, targets, weights [batch, seq]."""
    return {'tokens': windows[:, :-1], 'targets': windows[:, 1:], 'weights': valid[:, 1:].astype(np.float32)}


class Words(BatchFormat):
  """A unit is a word: right when every scored target of it (its bytes and the closing [W]) is."""
  name, inputs, causal_input = 'words', ('word_bytes', 'word_lengths'), 'word_bytes'
  reads_bytes = counts_bytes = True

  def build(self, windows, valid, model_config):
    """The bytes an 'lm' batch predicts, windows[:, 1:], split into words and packed by `words.pack_words`
    with the model's `max_words`, `max_word_bytes` and `splitter`."""
    return words.pack_words(windows[:, 1:], valid[:, 1:], eos_id=byte_ids.EOS, word_id=byte_ids.VOCAB_SIZE,
                            max_words=model_config.max_words, max_word_bytes=model_config.max_word_bytes,
                            splitter=model_config.splitter)

  def units(self, right, scored):
    return right.all(-1), scored.any(-1)


class SequenceToSequence(BatchFormat):
  name, inputs = 'seq2seq', ('encoder_tokens', 'decoder_tokens')
  reads_bytes = counts_bytes = True
  causal_input = 'decoder_tokens'   # the encoder reads its whole input

  def build(self, windows, valid, model_config):
    """Encoder-decoder examples of the model's `task`, one per window (`formats.seq2seq`)."""
    return seq2seq.make_batch(windows, valid, task=model_config.task, noise_density=model_config.noise_density,
                              mean_span=model_config.mean_span)


FORMATS: dict[str, BatchFormat] = {f.name: f for f in (LanguageModeling(), Words(), SequenceToSequence())}


def get(name: str) -> BatchFormat:
  if name not in FORMATS:
    raise ValueError(f'batch format {name!r} unknown (known: {", ".join(FORMATS)})')
  return FORMATS[name]

"""Encoder-decoder examples built from corpus windows (`model.task`):

  span_corruption  T5's objective on any corpus: a `noise_density` share of the window's bytes, in
                   spans of `mean_span` on average, is replaced in the input by one sentinel per span;
                   the target lists each sentinel followed by the bytes it hides.
  vowel_removal    MrT5's diagnostic: a string of seq_len - 1 random lowercase letters; the target is the
                   string without its vowels (5 of 26 letters, ~19%).

Ids are the byte tokenizer's (bytes 0..255, eos 256). As in ByT5, id 0 pads both sides and starts the
decoder, and sentinels count down from the top byte (255, 254, ...): valid UTF-8 never holds bytes
0xF5-0xFF, so they cannot clash with text. An example's randomness is seeded by its window's bytes,
so every batch stays a pure function of (seed, step), and evaluation is the same every time.
"""

from __future__ import annotations

import zlib

import numpy as np

from models.formats import byte_ids

PAD = 0
EOS = byte_ids.EOS
TASKS = ('span_corruption', 'vowel_removal')
VOWELS = np.frombuffer(b'aeiou', np.uint8)


def sentinel(i: int) -> int:
  return 255 - i


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(noise bytes, noise spans) of a `length`-byte window, as T5 rounds them."""
  noise = min(max(round(length * noise_density), 1), length - 1)
  return noise, max(round(noise / mean_span), 1)


def decoder_length(task: str, seq_len: int, noise_density: float, mean_span: float) -> int:
  """The static decoder width: the longest target of an encoder input of seq_len ids."""
  if task == 'span_corruption':   # the windows are seq_len + 1 bytes
    noise, spans = span_counts(seq_len + 1, noise_density, mean_span)
    return noise + spans + 1
  return seq_len


def _segment_lengths(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
  """`parts` positive lengths summing to `total`, uniformly over such compositions."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corrupt(raw: np.ndarray, rng: np.random.Generator, noise_density: float, mean_span: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(encoder input, target) of T5 span corruption, both ending in eos. Spans alternate kept, noise,
  kept, ... and end with a noise span, as in T5's `random_spans_noise_mask`."""
  noise, spans = span_counts(len(raw), noise_density, mean_span)
  spans = min(spans, noise, len(raw) - noise)
  noise_lengths = _segment_lengths(rng, noise, spans)
  kept_lengths = _segment_lengths(rng, len(raw) - noise, spans)
  inputs, targets, start = [], [], 0
  for s in range(spans):
    inputs += [raw[start:start + kept_lengths[s]], [sentinel(s)]]
    start += kept_lengths[s]
    targets += [[sentinel(s)], raw[start:start + noise_lengths[s]]]
    start += noise_lengths[s]
  return np.concatenate(inputs + [[EOS]]), np.concatenate(targets + [[EOS]])


def remove_vowels(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
  letters = rng.integers(ord('a'), ord('z') + 1, length)
  return np.append(letters, EOS), np.append(letters[~np.isin(letters, VOWELS)], EOS)


def make_batch(windows: np.ndarray, valid: np.ndarray, *, task: str, noise_density: float, mean_span: float
               ) -> dict:
  """windows [batch, seq + 1] -> encoder_tokens [batch, seq]; decoder_tokens, targets, weights
  [batch, decoder_length]; `bytes` (the target ids scored per row, so bits per byte are bits per target
  byte, as MrT5 reports them). Rows without valid tokens (batch padding) score nothing."""
  batch, seq_len = windows.shape[0], windows.shape[1] - 1
  dec_len = decoder_length(task, seq_len, noise_density, mean_span)
  encoder = np.full((batch, seq_len), PAD, np.int32)
  decoder, targets = np.full((batch, dec_len), PAD, np.int32), np.full((batch, dec_len), PAD, np.int32)
  weights = np.zeros((batch, dec_len), np.float32)
  for row in range(batch):
    raw = np.asarray(windows[row][valid[row]], np.int32)
    if raw.size < 2:
      continue
    rng = np.random.default_rng(zlib.crc32(raw.tobytes()))
    if task == 'span_corruption':
      inputs, target = span_corrupt(raw, rng, noise_density, mean_span)
    else:
      inputs, target = remove_vowels(rng, seq_len - 1)
    encoder[row, :inputs.size] = inputs
    targets[row, :target.size] = target
    decoder[row, 1:target.size] = target[:-1]
    weights[row, :target.size] = 1.0
  return {'encoder_tokens': encoder, 'decoder_tokens': decoder, 'targets': targets, 'weights': weights,
          'bytes': weights.sum(1)}

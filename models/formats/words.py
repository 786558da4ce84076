"""Words for hierarchical byte models (HAT): splitting UTF-8 text into words, and packing byte windows
into word-structured batches [batch, words, bytes per word].

Two splitting rules (`model.splitter`):
  whitespace  the paper's: split at Unicode whitespace, each whitespace run appended to the word before it
              ("Hello, world!" -> "Hello, " + "world!"); a leading whitespace run is a word of its own.
  unicode     the released splitter's (the `hat-splitter` package, `HATSplitter.split`): Unicode word
              boundaries (UAX #29), also cut at camelCase humps and after punctuation inside a word; a
              single space is prepended to the next word, any other whitespace (newline, tab, several
              spaces) is a word of its own, and punctuation is appended to the word before it
              ("Hello, world!  Bye" -> "Hello," + " world!" + "  " + "Bye"; "camelCase" -> "camel" + "Case";
              "3.14" -> "3." + "14"; "🙂🙂" -> "🙂" + "🙂").
Words longer than the cap (`model.max_word_bytes`) are cut into pieces of at most that many bytes, at
UTF-8 character boundaries where possible (for caps of 4 bytes or more the same pieces as the library's
`split_with_limit`). Joining the words always gives back the exact bytes.
"""

from __future__ import annotations

import re

import numpy as np
from hat_splitter import HATSplitter

SPLITTERS = ('whitespace', 'unicode')
_WHITESPACE_WORD = re.compile(r'\S+\s*|\s+')
_HAT_SPLITTER = HATSplitter()
_UNDECODABLE = re.compile('[\udc80-\udcff]')   # what errors='surrogateescape' makes of a byte that is not UTF-8


def _unicode_words(text: str) -> list[str]:
  # The library takes only valid text: split each undecodable byte (a window may cut a character) as the
  # replacement character, one for one, then cut the original text at the same places.
  words, start = [], 0
  for word in _HAT_SPLITTER.split(_UNDECODABLE.sub('\ufffd', text)):
    words.append(text[start:start + len(word)])
    start += len(word)
  return words


def split_text(text: str, splitter: str = 'whitespace') -> list[str]:
  if splitter == 'whitespace':
    return _WHITESPACE_WORD.findall(text)
  if splitter == 'unicode':
    return _unicode_words(text)
  raise ValueError(f'model.splitter={splitter!r} must be one of {SPLITTERS}')


def _cap(word: bytes, cap: int) -> list[bytes]:
  pieces = []
  while len(word) > cap:
    cut = cap
    while cut > 1 and (word[cut] & 0xC0) == 0x80:   # never start a piece inside a character if avoidable
      cut -= 1
    pieces.append(word[:cut])
    word = word[cut:]
  return pieces + [word] if word else pieces


def split_bytes(data: bytes, splitter: str = 'whitespace', cap: int = 0) -> list[bytes]:
  """Words of raw UTF-8 bytes (a window may cut a character: undecodable bytes pass through unchanged)."""
  text = data.decode('utf-8', errors='surrogateescape')
  words = [w.encode('utf-8', errors='surrogateescape') for w in split_text(text, splitter)]
  return [piece for w in words for piece in _cap(w, cap)] if cap else words


def split_ids(ids: np.ndarray, eos_id: int, splitter: str, cap: int) -> list[np.ndarray]:
  """Words of a byte-tokenizer id sequence: each end-of-document id is a word of its own."""
  words, start = [], 0
  for end in [*np.flatnonzero(ids == eos_id), len(ids)]:
    words += [np.frombuffer(w, np.uint8).astype(np.int32)
              for w in split_bytes(ids[start:end].astype(np.uint8).tobytes(), splitter, cap)]
    if end < len(ids):
      words.append(np.asarray([eos_id], np.int32))
    start = end + 1
  return words


def pack_words(byte_windows: np.ndarray, valid: np.ndarray, *, eos_id: int, word_id: int, max_words: int,
               max_word_bytes: int, splitter: str) -> dict:
  """Word-structured batch of byte windows [batch, n] (the bytes to predict; `valid` marks real ones).

  word_bytes [batch, words, bytes] and word_lengths [batch, words] (0: a padding word) are the model's
  inputs; targets [batch, words, bytes + 1] are each word's bytes then `word_id` (the end-of-word [W]);
  weights mark the scored targets (an end-of-document word's [W] is not scored, padding never is);
  bytes [batch] counts the scored UTF-8 bytes, the denominator of bits per byte. Words past `max_words`
  are not scored (nor counted in `bytes`)."""
  batch = len(byte_windows)
  word_bytes = np.zeros((batch, max_words, max_word_bytes), np.int32)
  lengths = np.zeros((batch, max_words), np.int32)
  targets = np.zeros((batch, max_words, max_word_bytes + 1), np.int32)
  weights = np.zeros((batch, max_words, max_word_bytes + 1), np.float32)
  n_bytes = np.zeros((batch,), np.float32)
  for row in range(batch):
    words = split_ids(byte_windows[row][valid[row]], eos_id, splitter, max_word_bytes)[:max_words]
    for i, word in enumerate(words):
      n = len(word)
      word_bytes[row, i, :n] = targets[row, i, :n] = word
      lengths[row, i] = n
      targets[row, i, n] = word_id
      document_end = n == 1 and word[0] == eos_id
      weights[row, i, :n + (not document_end)] = 1.0
      n_bytes[row] += 0 if document_end else n
  return {'word_bytes': word_bytes, 'word_lengths': lengths, 'targets': targets, 'weights': weights,
          'bytes': n_bytes}

"""Tokenizers: byte, char, word (WikiText style), and BPE/WordPiece trained locally with HF `tokenizers`.

Every tokenizer maps a document to int32 ids and appends one end-of-sequence id per document
(per line for the word tokenizer, as the WikiText benchmarks count it). Trained tokenizers are saved
to `<workdir>/tokenizer/` and loaded from there by evaluation and sampling.
"""

from __future__ import annotations

import collections
import json
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from models.formats import byte_ids

EOS = '<eos>'
UNK = '<unk>'
KINDS = ('byte', 'char', 'word', 'bpe', 'wordpiece')


def with_eos(ids, eos_id: int) -> np.ndarray:
  return np.concatenate([np.asarray(ids, np.int32), np.asarray([eos_id], np.int32)])


class Tokenizer:
  kind: str
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    """ids of one document, ending with eos."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def encode_prompt(self, text: str) -> np.ndarray:
    """ids of a prompt to continue (no trailing eos)."""
    return self.encode(text)[:-1]

  def state(self) -> dict:
    return {}

  def save(self, directory) -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'tokenizer.json').write_text(json.dumps({'kind': self.kind, **self.state()}))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255 plus eos = 256."""
  kind = 'byte'
  vocab_size = byte_ids.VOCAB_SIZE
  eos_id = byte_ids.EOS

  def encode(self, text):
    return with_eos(np.frombuffer(text.encode('utf-8'), np.uint8), self.eos_id)

  def decode(self, ids):
    return bytes(int(i) for i in ids if 0 <= i < 256).decode('utf-8', errors='replace')


class VocabTokenizer(Tokenizer):
  """A fixed list of symbols (characters or words) with <unk> and <eos>."""

  def __init__(self, symbols: Sequence[str]):
    self.symbols = list(symbols)
    self.index = {s: i for i, s in enumerate(self.symbols)}
    self.vocab_size = len(self.symbols)
    self.eos_id = self.index[EOS]
    self.unk_id = self.index[UNK]

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int = 0) -> 'VocabTokenizer':
    counts = collections.Counter()
    for text in texts:
      counts.update(cls.split(text))
    specials = [UNK, EOS]
    ranked = sorted((s for s in counts if s not in specials), key=lambda s: (-counts[s], s))
    if vocab_size:
      ranked = ranked[:max(vocab_size - len(specials), 0)]
    return cls(specials + ranked)

  def state(self):
    return {'symbols': self.symbols}

  def ids(self, pieces):
    return [self.index.get(p, self.unk_id) for p in pieces]


class CharTokenizer(VocabTokenizer):
  kind = 'char'

  @staticmethod
  def split(text):
    return text

  def encode(self, text):
    return np.asarray(self.ids(text) + [self.eos_id], np.int32)

  def decode(self, ids):
    return ''.join(self.symbols[i] for i in ids if i not in (self.eos_id,))


class WordTokenizer(VocabTokenizer):
  """Whitespace words, one <eos> per line (the WikiText-2 convention: 33,278 types, 2,088,628 train tokens)."""
  kind = 'word'

  @staticmethod
  def split(text):
    return text.split()

  def encode(self, text):
    ids = []
    for line in text.splitlines():
      ids.extend(self.ids(line.split()))
      ids.append(self.eos_id)
    return np.asarray(ids, np.int32)

  def encode_prompt(self, text):
    return np.asarray(self.ids(text.split()), np.int32)

  def decode(self, ids):
    pieces = []
    for i in ids:
      if i != self.eos_id and pieces and pieces[-1] != '\n':
        pieces.append(' ')
      pieces.append('\n' if i == self.eos_id else self.symbols[i])
    return ''.join(pieces)


class HFTokenizer(Tokenizer):
  """BPE (byte-level) or WordPiece trained with HF `tokenizers` on the train split."""

  def __init__(self, kind: str, tokenizer):
    self.kind = kind
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.eos_id = tokenizer.token_to_id(EOS)

  @classmethod
  def train(cls, kind: str, texts: Iterable[str], vocab_size: int) -> 'HFTokenizer':
    from tokenizers import Tokenizer as HF, decoders, models, normalizers, pre_tokenizers, trainers
    if kind == 'bpe':
      tok = HF(models.BPE(unk_token=None))
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
      trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
      tok = HF(models.WordPiece(unk_token='[UNK]'))
      tok.normalizer = normalizers.BertNormalizer(lowercase=True)
      tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
      tok.decoder = decoders.WordPiece()
      trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=['[UNK]', EOS], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(kind, tok)

  def encode(self, text):
    return with_eos(self.tokenizer.encode(text).ids, self.eos_id)

  def decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids if i != self.eos_id])

  def state(self):
    return {'hf': self.tokenizer.to_str()}


def train_tokenizer(kind: str, texts: Sequence[str], vocab_size: int) -> Tokenizer:
  """Build `kind` from the training documents (byte needs none)."""
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'char':
    return CharTokenizer.train(texts, vocab_size)
  if kind == 'word':
    return WordTokenizer.train(texts, vocab_size)
  if kind in ('bpe', 'wordpiece'):
    return HFTokenizer.train(kind, texts, vocab_size)
  raise ValueError(f'data.tokenizer={kind!r} is not one of {", ".join(KINDS)}')


def load_tokenizer(directory) -> Tokenizer:
  state = json.loads((epath.Path(directory) / 'tokenizer.json').read_text())
  kind = state['kind']
  if kind == 'byte':
    return ByteTokenizer()
  if kind in ('char', 'word'):
    return {'char': CharTokenizer, 'word': WordTokenizer}[kind](state['symbols'])
  from tokenizers import Tokenizer as HF
  return HFTokenizer(kind, HF.from_str(state['hf']))

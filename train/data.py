"""Corpora, tokenized caches and deterministic batches.

Corpora (`data.corpus`), each a dict split -> iterable of documents:
  stdlib     the Python standard library's own source (the embedded default: present everywhere)
  text       `data.dir` holding train/valid/test files (WikiText layout), or else any *.txt files as documents
  wikitext2  `data.dir` (default ../shared/data/wikitext-2) in the standard train/valid/test layout
  documents  `data.dir` of long documents (*.txt), whole documents assigned to splits (Gutenberg books)
  tfds:local `data.dir` files turned into an ArrayRecord TFDS dataset (no TensorFlow needed to read)
  tfds:NAME  a TFDS catalog dataset (lm1b, pg19, ...) on machines with the network
Splitting by document: the sorted documents' index i goes to valid when i % 10 == 8, test when i % 10 == 9.

Each split is tokenized once into `<cache>/<fingerprint>/<split>.npy` (read memory-mapped) with the
split's UTF-8 byte count beside it, for bits per byte. The batch of step s is a pure function of
(seed, s): sample i = s * batch + row is window perm_epoch[i % windows] with epoch = i // windows,
so resuming needs no iterator state. Each process materialises only its own rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Iterable, Iterator

import numpy as np

from models import formats
from train import passkey, paths, tokenizers
from train.corpora import DataError, corpus_files, require_dir


def iter_documents(data_config, split: str) -> Iterator[str]:
  corpus = data_config.corpus
  if corpus.startswith('tfds:'):
    yield from _tfds_documents(data_config, split)
    return
  for path in corpus_files(data_config)[split]:
    yield path.read_text(encoding='utf-8', errors='replace')


def _tfds_documents(data_config, split: str) -> Iterator[str]:
  import tensorflow_datasets as tfds
  name = data_config.corpus.split(':', 1)[1]
  if name == 'local':
    from train import tfds_local  # needs tensorflow-datasets, imported only for this corpus
    source = tfds_local.data_source(require_dir(data_config), data_config.tfds_dir, split)
  else:
    builder = tfds.builder(name, data_dir=data_config.tfds_dir or None)
    available = builder.info.splits.keys()
    tfds_split = {'valid': 'validation'}.get(split, split)
    if tfds_split not in available:
      tfds_split = 'test' if split == 'valid' else tfds_split
    builder.download_and_prepare(file_format='array_record')
    source = builder.as_data_source()[tfds_split]
  for i in range(len(source)):
    text = source[i][data_config.tfds_text_key]
    yield text.decode('utf-8') if isinstance(text, bytes) else text


# -------------------------------------------------------------------------------------- tokenized cache

def corpus_fingerprint(data_config) -> str:
  key = {'corpus': data_config.corpus, 'dir': str(pathlib.Path(data_config.dir).expanduser().resolve())
         if data_config.dir else '', 'tfds_text_key': data_config.tfds_text_key}
  if data_config.corpus == 'stdlib':
    key['stdlib'] = sysconfig.get_paths()['stdlib']
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: tokenizers.Tokenizer) -> str:
  state = json.dumps({'kind': tokenizer.kind, **tokenizer.state()}, sort_keys=True)
  return hashlib.sha256(state.encode()).hexdigest()[:16]


def load_or_train_tokenizer(data_config, workdir: str) -> tokenizers.Tokenizer:
  """The workdir's tokenizer if one was saved, else one trained on the train split (and saved)."""
  directory = paths.workdir_path(workdir, 'tokenizer')
  if (directory / 'tokenizer.json').exists():
    return tokenizers.load_tokenizer(directory)
  if data_config.tokenizer not in tokenizers.KINDS:
    raise DataError(f'data.tokenizer={data_config.tokenizer!r} is not one of {", ".join(tokenizers.KINDS)}')
  texts = [] if data_config.tokenizer == 'byte' else iter_documents(data_config, 'train')
  tokenizer = tokenizers.train_tokenizer(data_config.tokenizer, texts, data_config.vocab_size)
  tokenizer.save(directory)
  return tokenizer


@functools.lru_cache(maxsize=32)
def _load_split(path: str) -> tuple[np.ndarray, int]:
  with open(path + '.json') as f:
    meta = json.load(f)
  return np.load(path + '.npy', mmap_mode='r'), meta['bytes']


def tokenized_split(data_config, tokenizer: tokenizers.Tokenizer, split: str, cache_dir: str
                    ) -> tuple[np.ndarray, int]:
  """(token stream memory-mapped, UTF-8 bytes of the split's text); tokenized once, then cached."""
  directory = os.path.join(cache_dir, f'{corpus_fingerprint(data_config)}-{tokenizer_fingerprint(tokenizer)}')
  path = os.path.join(directory, split)
  if not os.path.exists(path + '.json'):
    os.makedirs(directory, exist_ok=True)
    pieces, n_bytes = [], 0
    for doc in iter_documents(data_config, split):
      pieces.append(tokenizer.encode(doc))
      n_bytes += len(doc.encode('utf-8'))
    if not pieces:
      raise DataError(f'split {split!r} of data.corpus={data_config.corpus} is empty')
    stream = np.concatenate(pieces).astype(np.int32)
    tmp = f'{path}.{os.getpid()}.tmp.npy'   # rename: a reader never sees a half-written cache
    np.save(tmp, stream)
    os.replace(tmp, path + '.npy')
    with open(f'{path}.{os.getpid()}.tmp.json', 'w') as f:
      json.dump({'tokens': int(stream.size), 'bytes': n_bytes}, f)
    os.replace(f'{path}.{os.getpid()}.tmp.json', path + '.json')
  return _load_split(path)


# ------------------------------------------------------------------------------------------------ batches

class SplitWindows:
  """Non-overlapping windows of seq_len + 1 tokens over one split's token stream."""

  def __init__(self, stream: np.ndarray, n_bytes: int, seq_len: int, fmt: formats.BatchFormat, model_config=None):
    self.stream, self.n_bytes, self.seq_len = stream, n_bytes, seq_len
    self.format = functools.partial(fmt.build, model_config=model_config)
    self.n_windows = max((len(stream) - 1) // seq_len, 0)
    # For evaluation: the ragged tail is one more (padded) window so every token is scored once.
    self.n_eval_windows = -(-(len(stream) - 1) // seq_len)

  def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
    start = w * self.seq_len
    piece = np.asarray(self.stream[start:start + self.seq_len + 1])
    valid = np.ones(self.seq_len + 1, bool)
    if piece.size < self.seq_len + 1:
      valid[piece.size:] = False
      piece = np.pad(piece, (0, self.seq_len + 1 - piece.size))
    return piece, valid

  def batch(self, window_ids: Iterable[int], substitutes: dict[int, np.ndarray] | None = None) -> dict:
    """Windows `window_ids` (-1: padding); `substitutes` maps rows to their own seq_len + 1 tokens."""
    pieces, valid = zip(*(self.window(w) if w >= 0 else self._padding() for w in window_ids))
    if substitutes:
      pieces = [substitutes.get(row, piece) for row, piece in enumerate(pieces)]
    return self.format(np.stack(pieces), np.stack(valid))

  def _padding(self):
    return np.zeros(self.seq_len + 1, np.int32), np.zeros(self.seq_len + 1, bool)


class Dataset:
  """Tokenizer + tokenized splits + the deterministic batch schedule of one run."""

  def __init__(self, config, workdir: str, fmt: formats.BatchFormat = formats.get('lm')):
    self.data_config = config.data
    self.seed = config.seed
    self.global_batch = config.train.batch_size
    self.train_offset = config.data.get('train_offset', 0)   # runs saved before the key existed
    self.seq_len = config.train.seq_len
    self.passkey_fraction = config.data.get('passkey_fraction', 0.0)
    self.format, self.model_config = fmt, config.model
    self.cache_dir = config.data.cache_dir or paths.local_dir(workdir, 'cache')
    if not config.data.corpus.startswith('tfds:'):
      corpus_files(config.data)   # missing directories and files fail here, before any compiling
    self.tokenizer = load_or_train_tokenizer(config.data, workdir)
    if fmt.reads_bytes and self.tokenizer.kind != 'byte':
      raise DataError(f'model.name={config.model.name} reads bytes: set data.tokenizer=byte')
    self._splits: dict[str, SplitWindows] = {}

  def split(self, name: str) -> SplitWindows:
    if name not in self._splits:
      stream, n_bytes = tokenized_split(self.data_config, self.tokenizer, name, self.cache_dir)
      self._splits[name] = SplitWindows(stream, n_bytes, self.seq_len, self.format, self.model_config)
    return self._splits[name]

  @functools.lru_cache(maxsize=2)
  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.split('train').n_windows)

  def train_window_ids(self, step: int, rows: slice) -> list[int]:
    n = self.split('train').n_windows
    if n == 0:
      raise DataError(f'the train split has fewer than train.seq_len+1={self.seq_len + 1} tokens')
    ids = []
    first = self.train_offset + step * self.global_batch
    for i in range(first, first + self.global_batch)[rows]:
      ids.append(int(self._epoch_permutation(i // n)[i % n]))
    return ids

  def train_batch(self, step: int, rows: slice = slice(None)) -> dict:
    """This process's rows of the global batch of `step` (a pure function of seed and step); a
    `data.passkey_fraction` share of samples are synthetic passkey sequences instead."""
    substitutes = {}
    if self.passkey_fraction:
      first = self.train_offset + step * self.global_batch
      for row, i in enumerate(range(first, first + self.global_batch)[rows]):
        rng = np.random.default_rng([self.seed, 7, i])
        if rng.random() < self.passkey_fraction:
          substitutes[row] = passkey.training_window(rng, self.tokenizer, self.seq_len + 1)
    return self.split('train').batch(self.train_window_ids(step, rows), substitutes)

  def eval_batches(self, split: str, max_batches: int = 0, rows: slice = slice(None)) -> Iterator[dict]:
    """Every window of the split in order, padded to whole global batches (padding has weight 0)."""
    windows = self.split(split)
    n_batches = -(-windows.n_eval_windows // self.global_batch)
    if max_batches:
      n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
      ids = [w if w < windows.n_eval_windows else -1
             for w in range(b * self.global_batch, (b + 1) * self.global_batch)]
      yield windows.batch(ids[rows])

  def eval_bytes(self, split: str, max_batches: int = 0) -> float:
    """UTF-8 bytes covered by the evaluated tokens (pro rata when only some batches are evaluated)."""
    windows = self.split(split)
    total_targets = len(windows.stream) - 1
    if not max_batches:
      return float(windows.n_bytes)
    covered = min(total_targets, max_batches * self.global_batch * self.seq_len)
    return windows.n_bytes * covered / total_targets

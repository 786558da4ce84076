"""Where each corpus's documents live, and which split each file belongs to (`data.corpus`, `data.dir`).

Splitting by document: the sorted documents' index i goes to valid when i % 10 == 8, test when i % 10 == 9.
"""

from __future__ import annotations

import pathlib
import sysconfig

SPLITS = ('train', 'valid', 'test')
CORPORA = ('stdlib', 'text', 'wikitext2', 'documents')
SPLIT_FILE_NAMES = {
    'train': ('train.txt', 'wiki.train.tokens', 'train'),
    'valid': ('valid.txt', 'wiki.valid.tokens', 'validation.txt', 'valid'),
    'test': ('test.txt', 'wiki.test.tokens', 'test'),
}
DEFAULT_DIRS = {'wikitext2': '../shared/data/wikitext-2', 'documents': '../shared/data/gutenberg'}


class DataError(ValueError):
  """A data problem the user must fix (missing files, empty splits)."""




def split_of_index(i: int) -> str:
  return {8: 'valid', 9: 'test'}.get(i % 10, 'train')


def _documents_by_split(paths: list[pathlib.Path]) -> dict[str, list[pathlib.Path]]:
  out = {s: [] for s in SPLITS}
  for i, path in enumerate(sorted(paths)):
    out[split_of_index(i)].append(path)
  return out


def stdlib_files() -> list[pathlib.Path]:
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'}
  return sorted(p for p in root.rglob('*.py') if not skip & set(p.relative_to(root).parts))


def _split_files(directory: pathlib.Path) -> dict[str, pathlib.Path] | None:
  found = {}
  for split, candidates in SPLIT_FILE_NAMES.items():
    for name in candidates:
      if (directory / name).is_file():
        found[split] = directory / name
        break
  return found if len(found) == 3 else None


def require_dir(data_config) -> pathlib.Path:
  raw = data_config.dir or DEFAULT_DIRS.get(data_config.corpus, '')
  directory = pathlib.Path(raw).expanduser()
  if not raw or not directory.is_dir():
    raise DataError(f'data.dir={raw!r} is not a directory (needed by data.corpus={data_config.corpus})')
  return directory


def corpus_files(data_config) -> dict[str, list[pathlib.Path]]:
  """The files of each split for the file-based corpora."""
  corpus = data_config.corpus
  if corpus == 'stdlib':
    return _documents_by_split(stdlib_files())
  directory = require_dir(data_config)
  split_files = _split_files(directory)
  if corpus in ('text', 'wikitext2', 'tfds:local') and split_files:
    return {s: [p] for s, p in split_files.items()}
  if corpus == 'wikitext2':
    raise DataError(f'data.dir={str(directory)!r} lacks train/valid/test files (train.txt or wiki.train.tokens)')
  docs = [p for p in directory.rglob('*.txt') if p.is_file()]
  if not docs:
    raise DataError(f'data.dir={str(directory)!r} holds no *.txt documents')
  return _documents_by_split(docs)

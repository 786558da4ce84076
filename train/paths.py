"""Run-directory paths: a local directory or a bucket URL (gs://...) shared by every host.

Checkpoints, config.json, metrics.jsonl and the tokenizer live in the workdir (written through
`etils.epath`, which reads and writes gs:// paths when gcsfs is installed). Tokenized caches and
W&B's files must be local: for a remote workdir they go under ~/.cache/seqarch/<run hash>/.
"""

from __future__ import annotations

import hashlib
import os

from etils import epath


def is_remote(path: str) -> bool:
  return '://' in path


def workdir_path(workdir: str, *parts: str) -> epath.Path:
  return epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir)).joinpath(*parts)


def local_dir(workdir: str, name: str) -> str:
  """A local directory for files that cannot live in a bucket (memory maps, W&B's own files)."""
  if not is_remote(workdir):
    return os.path.join(workdir, name)
  tag = hashlib.sha256(workdir.encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser('~/.cache/seqarch'), tag, name)

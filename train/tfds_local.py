"""A TFDS builder over local text files, written as ArrayRecord (readable without TensorFlow).

`data.corpus=tfds:local data.dir=DIR` builds it once under `data.tfds_dir` (TFDS's own default,
~/tensorflow_datasets, when empty) and reads it back through `as_data_source()`, the random-access
path Grain uses.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import types

import tensorflow_datasets as tfds

from train import corpora


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Documents from a local directory (train/valid/test files, or *.txt documents split by index)."""
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass the directory of text files as manual_dir.'

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    config = types.SimpleNamespace(corpus='tfds:local', dir=str(dl_manager.manual_dir))
    return {split: self._generate_examples(paths) for split, paths in corpora.corpus_files(config).items()}

  def _generate_examples(self, paths):
    for index, path in enumerate(paths):   # keyed by position: names may repeat across subdirectories
      yield index, {'text': path.read_text(encoding='utf-8', errors='replace')}


def data_source(directory: pathlib.Path, tfds_dir: str, split: str):
  # One dataset directory per source directory, so two local corpora never share a build.
  tag = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
  root = os.path.join(tfds_dir or os.path.expanduser('~/tensorflow_datasets'), f'local-{tag}')
  builder = LocalText(data_dir=root, file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(directory)))
  return builder.as_data_source()[split]

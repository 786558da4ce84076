import numpy as np
import pytest

from train import corpora, data


def test_batches_are_a_pure_function_of_seed_and_step(make_config, tmp_path):
  a = data.Dataset(make_config(), str(tmp_path / 'a'))
  b = data.Dataset(make_config(), str(tmp_path / 'b'))
  np.testing.assert_array_equal(a.train_batch(5)['tokens'], b.train_batch(5)['tokens'])
  assert not np.array_equal(a.train_batch(5)['tokens'], a.train_batch(6)['tokens'])
  c = data.Dataset(make_config(seed=1), str(tmp_path / 'c'))
  assert not np.array_equal(a.train_batch(5)['tokens'], c.train_batch(5)['tokens'])


def test_passkey_fraction_swaps_in_passkey_windows_deterministically(make_config, tmp_path):
  overrides = {'train.seq_len': 300, 'train.batch_size': 8}
  plain = data.Dataset(make_config(**overrides), str(tmp_path / 'plain')).train_batch(2)['tokens']
  mixed = data.Dataset(make_config(**overrides, **{'data.passkey_fraction': 0.5}), str(tmp_path / 'mixed'))
  tokens = mixed.train_batch(2)['tokens']
  np.testing.assert_array_equal(tokens, mixed.train_batch(2)['tokens'])
  swapped = [i for i, row in enumerate(tokens) if 'What is the pass key? The pass key is' in mixed.tokenizer.decode(row)]
  assert 0 < len(swapped) < 8
  kept = [i for i in range(8) if i not in swapped]
  np.testing.assert_array_equal(tokens[kept], plain[kept])


def test_lm_batch_targets_are_inputs_shifted(make_config, tmp_path):
  batch = data.Dataset(make_config(), str(tmp_path)).train_batch(0)
  np.testing.assert_array_equal(batch['tokens'][:, 1:], batch['targets'][:, :-1])
  assert batch['tokens'].shape == (4, 16) and batch['weights'].all()


def test_each_epoch_visits_every_window_once(tmp_path, make_config):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for split in ('train', 'valid', 'test'):
    (corpus / f'{split}.txt').write_text('abcdefghij' * 17)
  ds = data.Dataset(make_config(**{'data.corpus': 'text', 'data.dir': str(corpus)}), str(tmp_path / 'w'))
  n = ds.split('train').n_windows
  assert n == (170 + 1 - 1) // 16
  ids = [w for step in range(n // 4 * 2) for w in ds.train_window_ids(step, slice(None))]
  first = ids[:n // 4 * 4]
  assert len(set(first)) == len(first)   # no window twice within an epoch


def test_process_rows_partition_the_global_batch(make_config, tmp_path):
  ds = data.Dataset(make_config(), str(tmp_path))
  full = ds.train_batch(3)['tokens']
  halves = [ds.train_batch(3, slice(0, 2))['tokens'], ds.train_batch(3, slice(2, 4))['tokens']]
  np.testing.assert_array_equal(np.concatenate(halves), full)


def test_evaluation_scores_every_token_exactly_once(tmp_path, make_config):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for split in ('train', 'valid', 'test'):
    (corpus / f'{split}.txt').write_text('x' * 100 + 'é')
  ds = data.Dataset(make_config(**{'data.corpus': 'text', 'data.dir': str(corpus)}), str(tmp_path / 'w'))
  batches = list(ds.eval_batches('valid'))
  stream = ds.split('valid').stream
  assert sum(b['weights'].sum() for b in batches) == len(stream) - 1   # 102 bytes + eos, minus the first
  scored = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  np.testing.assert_array_equal(scored, stream[1:])
  assert ds.eval_bytes('valid') == 102


def test_stdlib_corpus_splits_are_deterministic_and_disjoint():
  files = corpora.corpus_files(type('C', (), {'corpus': 'stdlib', 'dir': ''})())
  assert all(files[s] for s in corpora.SPLITS)
  assert not set(files['train']) & set(files['valid']) and not set(files['valid']) & set(files['test'])
  assert corpora.corpus_files(type('C', (), {'corpus': 'stdlib', 'dir': ''})()) == files


def test_tokenized_split_is_cached_memory_mapped(make_config, tmp_path):
  ds = data.Dataset(make_config(), str(tmp_path))
  stream = ds.split('valid').stream
  assert isinstance(stream, np.memmap)


def test_missing_directory_is_a_clear_error(make_config, tmp_path):
  with pytest.raises(corpora.DataError, match="data.dir='/no/such/dir' is not a directory"):
    data.Dataset(make_config(**{'data.corpus': 'text', 'data.dir': '/no/such/dir'}), str(tmp_path))


def test_tfds_local_builder_writes_array_record_readable_without_tensorflow(tmp_path, make_config):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for split in ('train', 'valid', 'test'):
    (corpus / f'{split}.txt').write_text(f'{split} text é\n')
  config = make_config(**{'data.corpus': 'tfds:local', 'data.dir': str(corpus), 'data.tfds_dir': str(tmp_path / 'tfds')})
  assert list(data.iter_documents(config.data, 'valid')) == ['valid text é\n']
  assert list((tmp_path / 'tfds').rglob('*.array_record*'))
  ds = data.Dataset(config, str(tmp_path / 'w'))
  assert ds.split('test').n_bytes == len('test text é\n'.encode())

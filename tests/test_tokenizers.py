import numpy as np
import pytest
from conftest import SHARED_DATA

from train import tokenizers

TEXT = 'def f(x):\n    return x ** 2  # squares\n\nnaïve café — 東京 🙂\n'
CORPUS = [TEXT, 'the cat sat on the mat\nthe dog sat\n', 'print("hello world")\n']


@pytest.mark.parametrize('kind', ['byte', 'char', 'bpe'])
def test_round_trip_is_exact(kind, tmp_path):
  tok = tokenizers.train_tokenizer(kind, CORPUS, 300)
  ids = tok.encode(TEXT)
  assert ids[-1] == tok.eos_id and ids.dtype == np.int32 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == TEXT
  tok.save(str(tmp_path))
  np.testing.assert_array_equal(tokenizers.load_tokenizer(str(tmp_path)).encode(TEXT), ids)


def test_wordpiece_round_trip_up_to_lowercase_and_spacing(tmp_path):
  tok = tokenizers.train_tokenizer('wordpiece', CORPUS, 300)
  text = 'The cat sat on the mat'
  assert tok.decode(tok.encode(text)) == text.lower()
  tok.save(str(tmp_path))
  np.testing.assert_array_equal(tokenizers.load_tokenizer(str(tmp_path)).encode(text), tok.encode(text))


def test_word_tokenizer_unknowns_and_line_eos(tmp_path):
  tok = tokenizers.train_tokenizer('word', CORPUS, 0)
  ids = tok.encode('the cat flew\nthe dog\n')
  words = [tok.symbols[i] for i in ids]
  assert words == ['the', 'cat', '<unk>', '<eos>', 'the', 'dog', '<eos>']
  assert tok.decode(tok.encode('the cat sat\nthe dog\n')) == 'the cat sat\nthe dog\n'
  tok.save(str(tmp_path))
  assert tokenizers.load_tokenizer(str(tmp_path)).symbols == tok.symbols


def test_char_vocab_cap_maps_rare_symbols_to_unk():
  tok = tokenizers.train_tokenizer('char', ['aaab'], 3)   # <unk>, <eos>, 'a'
  assert tok.vocab_size == 3 and list(tok.encode('ab')) == [tok.index['a'], tok.unk_id, tok.eos_id]


@pytest.mark.skipif(not (SHARED_DATA / 'wikitext-2' / 'train.txt').exists(), reason='needs ../shared/data')
def test_wikitext2_word_level_matches_the_standard_counts():
  train = (SHARED_DATA / 'wikitext-2' / 'train.txt').read_text()
  tok = tokenizers.train_tokenizer('word', [train], 0)
  assert tok.vocab_size == 33278
  assert tok.encode(train).size == 2088628

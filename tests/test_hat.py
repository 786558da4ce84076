"""HAT: splitting, word-structured batches, padding, word-level causality, nested-loop generation, CLIs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODELS, config_flags, run_module

import models
from models import formats
from models.formats import words
from models.hat import END_OF_DOCUMENT, END_OF_WORD
from models.sampling import Sampling

TEXTS = ['Hello, world!  It\'s 3.14\tand\n\nnext', '  leading spaces', 'über-cool 東京タワー ça va? 🙂 ok',
         'trailing space ', '', 'supercalifragilisticexpialidocious']


@pytest.mark.parametrize('splitter', words.SPLITTERS)
@pytest.mark.parametrize('cap', [0, 4])
def test_splitting_round_trips_any_bytes(splitter, cap):
  rng = np.random.default_rng(0)
  samples = [t.encode() for t in TEXTS]
  samples += [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (1, 7, 40)]   # cut characters
  samples += [''.join(chr(c) for c in rng.integers(32, 0x2FFF, size=30)).encode()]
  for data in samples:
    pieces = words.split_bytes(data, splitter, cap)
    assert b''.join(pieces) == data
    assert all(pieces) and all(len(p) <= (cap or len(data)) for p in pieces)


def test_splitting_rules():
  assert words.split_text('Hello, world!  Bye', 'whitespace') == ['Hello, ', 'world!  ', 'Bye']
  assert words.split_text('  Hi there', 'whitespace') == ['  ', 'Hi ', 'there']
  assert words.split_text('Hello, world!  Bye', 'unicode') == ['Hello,', ' world!', '  ', 'Bye']
  assert words.split_bytes('ééé'.encode(), 'whitespace', 3) == ['é'.encode(), 'é'.encode(), 'é'.encode()]


# Each kind the old uniseg-based rule got wrong: newlines, tabs, several spaces, camelCase, punctuation inside words,
# emoji runs; plus non-Latin scripts, digits and WikiText's own markup.
TRICKY = [
    'Hello, world!', 'Hello, world!  Bye', 'line one\nline two', 'para\n\n\nnext', 'trailing newline\n', '\nleading newline',
    'col1\tcol2\t\tcol3', ' \t mixed \n\t whitespace', 'a  b   c    d', '   leading spaces', 'trailing spaces   ',
    'camelCaseWord', 'XMLHttpRequest and getHTTPResponse', 'iPhone macOS', 'snake_case_name', 'kebab-case-name',
    "don't can't it's", 'e.g. i.e. U.S.A.', 'https://example.com/a?b=1&c=2', 'user@example.com', 'end. Next? Yes!',
    '"quoted" (parens) [brackets]', '3.14 and 1,000,000', '2024-06-01 12:30:45', 'v1.2.3rc4', '42nd 1st x86_64',
    '🙂🙂🙂 ok', 'family 👨\u200d👩\u200d👧 flags 🇩🇪🇫🇷 thumbs 👍🏽', 'ok👍done', '東京タワーに行きました。', 'über-cool ça va?',
    'Привет, мир! Как дела?', 'مرحبا بالعالم', 'नमस्ते दुनिया', '한국어 텍스트입니다', 'ελληνικά κείμενα',
    ' = Valkyria Chronicles III = \n', ' @-@ <unk> 1 @,@ 000 \n', '...!!!???', 'a',
]


def test_unicode_splitter_is_the_released_one():
  from hat_splitter import HATSplitter
  released = HATSplitter()
  for text in TRICKY:
    assert words.split_text(text, 'unicode') == released.split(text), text
    for cap in (4, 16):
      pieces = words.split_bytes(text.encode(), 'unicode', cap)
      assert pieces == released.split_with_limit(text, cap), (text, cap)
      assert b''.join(pieces) == text.encode()
  # Undecodable bytes (a window cutting a character) are split as the replacement character would be.
  assert words.split_bytes(b'ab\xff cd\xe6\x9d', 'unicode') == [b'ab', b'\xff', b' cd', b'\xe6', b'\x9d']


def test_pack_words_targets_weights_and_documents():
  ids = np.asarray([*b'ab c', END_OF_DOCUMENT, *b'de'], np.int32)
  batch = words.pack_words(ids[None], np.ones((1, len(ids)), bool), eos_id=END_OF_DOCUMENT, word_id=END_OF_WORD,
                           max_words=5, max_word_bytes=3, splitter='whitespace')
  assert batch['word_lengths'].tolist() == [[3, 1, 1, 2, 0]]
  assert batch['targets'][0, 0].tolist() == [*b'ab ', END_OF_WORD]
  assert batch['targets'][0, 2, :2].tolist() == [END_OF_DOCUMENT, END_OF_WORD]
  assert batch['weights'][0].sum(-1).tolist() == [4, 2, 1, 3, 0]   # no [W] after [S]; padding unscored
  assert batch['bytes'].tolist() == [6]


def tiny_hat(**overrides):
  config = models.default_config('hat')
  config.update(vocab_size=258, **{**TINY_MODELS['hat'], **overrides})
  return models.build(config)


def random_words(rng, n_words, max_bytes):
  lengths = rng.integers(1, max_bytes + 1, size=(1, n_words))
  word_bytes = rng.integers(0, 256, size=(1, n_words, max_bytes)) * (np.arange(max_bytes) < lengths[..., None])
  return jnp.asarray(word_bytes, jnp.int32), jnp.asarray(lengths, jnp.int32)


@pytest.fixture(scope='module')
def hat_params():
  model = tiny_hat()
  params = jax.jit(lambda: model.init(jax.random.key(0), **{k: jnp.zeros(s.shape, s.dtype) for k, s in
                                                            model.example_inputs(1, 16).items()})['params'])()
  return model, params


def test_padding_does_not_change_the_loss(hat_params):
  """More padding words and longer byte slots leave every scored target's NLL unchanged."""
  model, params = hat_params
  text = np.frombuffer(b'Pads do not count: not here, nor there, nor at the end.', np.uint8)   # words <= 8 bytes
  losses = []
  for max_words, max_bytes in [(16, 8), (24, 12)]:
    batch = words.pack_words(text[None].astype(np.int32), np.ones((1, len(text)), bool), eos_id=END_OF_DOCUMENT,
                             word_id=END_OF_WORD, max_words=max_words, max_word_bytes=max_bytes, splitter='whitespace')
    padded = model.clone(max_words=max_words, max_word_bytes=max_bytes)
    logits, _ = padded.apply({'params': params}, batch['word_bytes'], batch['word_lengths'])
    nll = formats.token_nll(logits, batch['targets'], END_OF_WORD + 1) * batch['weights']
    losses.append(float(nll.sum()))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_causal_at_word_and_byte_level(hat_params):
  model, params = hat_params
  rng = np.random.default_rng(1)
  word_bytes, lengths = random_words(rng, 8, 8)
  forward = jax.jit(lambda b, n: model.apply({'params': params}, b, n)[0])
  logits = forward(word_bytes, lengths)
  later_words = forward(word_bytes.at[:, 4:].set((word_bytes[:, 4:] + 7) % 256), lengths.at[:, 4:].set(3))
  np.testing.assert_allclose(logits[:, :4], later_words[:, :4], atol=1e-5)
  assert not np.allclose(logits[:, 4:], later_words[:, 4:], atol=1e-3)
  # Inside word 2, changing byte 3 changes only predictions made after reading it (positions 4.. of the decoder).
  later_bytes = forward(word_bytes.at[:, 2, 3].set((word_bytes[:, 2, 3] + 7) % 256), lengths)
  np.testing.assert_allclose(logits[:, 2, :4], later_bytes[:, 2, :4], atol=1e-5)
  assert not np.allclose(logits[:, 2, 4:], later_bytes[:, 2, 4:], atol=1e-3)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny HAT trained for 40 steps through the CLI (config file + overrides), evaluated and sampled."""
  from conftest import tiny_config
  workdir = tmp_path_factory.mktemp('hat')
  config = tiny_config('hat', **{'train.steps': 40, 'train.seq_len': 64, 'model.max_words': 24})
  out = run_module('train', *config_flags(config), '--workdir', str(workdir))
  assert out.returncode == 0, out.stderr
  return workdir


def test_cli_trains_evaluates_and_samples(trained):
  out = run_module('train.evaluate', '--workdir', str(trained), '--split', 'valid', '--max_batches', '2')
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert 0 < result['bpb'] < 8 and 0 <= result['accuracy'] <= 1
  out = run_module('train.sample', '--workdir', str(trained), '--prompt', 'def main(', '--max_new_tokens', '20',
                   '--temperature', '0')
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('def main(') and len(out.stdout) > len('def main(\n')


def test_word_accuracy_runs_on_a_hat_and_a_flat_run(trained, tmp_path):
  from conftest import tiny_config

  from experiments import hat as experiment
  from train import restore, setup as setup_lib
  from train.config import load_workdir_config
  setup, state = restore.load_run(load_workdir_config(str(trained)), str(trained))
  flat = setup_lib.Setup(tiny_config('transformer'), str(tmp_path))
  for s, st in [(setup, state), (flat, flat.init_state())]:
    assert 0 <= experiment.word_accuracy(s, st, 1) <= 1


def test_generation_reproduces_teacher_forced_argmax(trained):
  """Greedy nested-loop generation (backbone KV cache, prompt ending inside a word) picks, at every byte and
  word end, the argmax of one teacher-forced forward pass over the words it produced."""
  from train import restore
  from train.config import load_workdir_config
  setup, state = restore.load_run(load_workdir_config(str(trained)), str(trained))
  model, params = setup.model, state['params']
  prompt = np.frombuffer(b'import os\nimport sy', np.uint8).astype(np.int32)
  all_words, n_prompt, forced = model.generate_words(params, prompt, 30, key=jax.random.key(0),
                                                     sampling=Sampling(temperature=0, vocab_limit=setup.vocab_limit))
  assert b''.join(bytes(w) for w in all_words).startswith(bytes(prompt.tolist()))
  generated = all_words[n_prompt:]
  assert len(generated) > 2
  assert sum(map(len, generated)) - forced == 30 or generated[-1][-1] == END_OF_DOCUMENT
  packed = np.zeros((1, len(all_words), model.max_word_bytes), np.int32)
  for i, w in enumerate(all_words):
    packed[0, i, :len(w)] = w
  lengths = np.asarray([[len(w) for w in all_words]], np.int32)
  logits = formats.mask_padded_vocab(model.clone(max_words=len(all_words)).apply({'params': params}, packed,
                                                                                 lengths)[0], setup.vocab_limit)
  logits = logits.at[..., 0, END_OF_WORD].set(-jnp.inf)   # generation never ends a word before its first byte
  predicted = np.asarray(logits.argmax(-1))[0]
  for i, w in enumerate(generated, start=n_prompt):
    first = forced if i == n_prompt else 0
    assert predicted[i, first:len(w)].tolist() == w[first:]
    if i < len(all_words) - 1 and len(w) < model.max_word_bytes:   # a closed word ended on [W]
      assert predicted[i, len(w)] == END_OF_WORD


def test_flops_per_byte_against_xla(hat_params):
  """Analytic FLOPs (every word slot counted, as executed) against XLA's count of the compiled forward."""
  model, params = hat_params
  model = model.clone(max_words=16, max_word_bytes=8)
  inputs = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_inputs(1, 64).items()}
  xla = jax.jit(lambda p, b, n: model.apply({'params': p}, b, n)[0]).lower(
      params, inputs['word_bytes'], inputs['word_lengths']).compile().cost_analysis()['flops']
  assert 0.8 < model.forward_flops_per_token(64) * 64 / xla < 1.1


def test_flops_per_real_byte_skips_padding(hat_params):
  """Real FLOPs of words in padded slots equal the executed FLOPs of a model whose slots they fill exactly."""
  model = hat_params[0].clone(max_words=24, max_word_bytes=12)
  lengths = np.zeros((2, 24), np.int32)
  lengths[:, :16] = 8
  exact = model.clone(max_words=16, max_word_bytes=8).forward_flops_per_token(16 * 8)
  np.testing.assert_allclose(model.forward_flops_per_real_byte(lengths), exact, rtol=1e-12)
  assert model.forward_flops_per_token(16 * 8) > 2 * exact


def test_word_accuracy_scores_the_same_bytes_for_every_model():
  """A BPE token's leading space is charged to its own word, not the word before; byte, BPE and HAT predictions
  that get the same bytes right get the same word accuracy."""
  from experiments import hat as experiment
  text = b'Hello, world! Bye'   # scored words: 'Hello,', ' world!', ' Bye'
  score = lambda stretches: tuple(map(sum, zip(*(experiment.words_right(*s) for s in stretches))))
  bpe = [b'Hello', b',', b' world', b'!', b' Bye', b'']   # id 5: end of document
  tokens = np.arange(5)
  assert score(experiment.token_stretches(tokens, tokens != 2, bpe, eos_id=5)) == (2, 3)   # ' world' wrong
  byte_pieces = [bytes([b]) for b in range(256)] + [b'']
  ids = np.frombuffer(text, np.uint8).astype(np.int32)
  for wrong in (6, 7):   # the space before 'world', or its 'w': the same word as the token ' world'
    assert score(experiment.token_stretches(ids, np.arange(len(ids)) != wrong, byte_pieces, END_OF_DOCUMENT)) == (2, 3)
  # Words never run across an end of document.
  split = np.asarray([0, 1, 5, 2, 3, 4, 5])
  assert score(experiment.token_stretches(split, np.ones(7, bool), bpe, eos_id=5)) == (3, 3)
  # HAT (whitespace rule, words cut at 4 bytes: 'Hell' 'o, ' 'worl' 'd! ' 'Bye'): a long word is scored whole, the
  # trailing space of 'o, ' and the [W] closing it belong to ' world!'.
  batch = words.pack_words(ids[None], np.ones((1, len(ids)), bool), eos_id=END_OF_DOCUMENT, word_id=END_OF_WORD,
                           max_words=6, max_word_bytes=4, splitter='whitespace')
  hat = lambda predicted: score(experiment.hat_stretches(batch['word_bytes'][0], batch['word_lengths'][0],
                                                         batch['targets'][0], predicted))
  assert hat(batch['targets'][0]) == (3, 3)
  for word, position in [(1, 2), (1, 3), (2, 0), (0, 4)]:   # ' ', [W] after 'o, ', 'w'; [W] after 'Hell'
    predicted = batch['targets'][0].copy()
    predicted[word, position] = ord('x')
    assert hat(predicted) == (2, 3)


def test_bpe_tokens_tile_the_scored_words():
  """Each byte-level BPE token lies inside one scored word, so a flat BPE model is scored on the words' bytes."""
  from experiments import hat as experiment
  from train import tokenizers
  tokenizer = tokenizers.train_tokenizer('bpe', TRICKY * 4, 400)
  pieces = experiment.token_bytes(tokenizer)
  for text in TRICKY:
    ids = tokenizer.encode(text)[:-1]
    for k in range(len(ids)):   # each token mispredicted alone costs exactly one word
      (data, right), = experiment.token_stretches(ids, np.arange(len(ids)) != k, pieces, tokenizer.eos_id)
      assert data == text.encode()
      right_words, total = experiment.words_right(data, right)
      assert total - right_words == 1, (text, pieces[ids[k]])

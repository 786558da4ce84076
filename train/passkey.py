"""Synthetic passkey retrieval (Landmark Attention §4.2): a number hidden in filler text.

The prompt is the paper's: a task sentence, filler split at random around "The pass key is N. Remember
it. N is the pass key.", then the question, answered by N (uniform in 1..50000). `data.passkey_fraction`
mixes such sequences (answer included) into training; `prompt` builds the evaluation ones.
"""

from __future__ import annotations

import numpy as np

TASK = ('There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. '
        'I will quiz you about the important information there. ')
FILLER = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. '
QUESTION = 'What is the pass key? The pass key is '


def prompt(rng: np.random.Generator, n_chars: int) -> tuple[str, str]:
  """(prompt of about `n_chars` characters ending with the question, the key as text)."""
  key = str(rng.integers(1, 50001))
  needle = f'The pass key is {key}. Remember it. {key} is the pass key. '
  n_filler = max(0, (n_chars - len(TASK) - len(needle) - len(QUESTION)) // len(FILLER))
  before = int(rng.integers(0, n_filler + 1))
  return TASK + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION, key


def training_window(rng: np.random.Generator, tokenizer, length: int) -> np.ndarray:
  """`length` token ids of one answered passkey sequence (filler after the answer fills the window)."""
  question, key = prompt(rng, 0)
  ids = tokenizer.encode_prompt(question)   # estimate the size in tokens, then build to fit
  chars_per_token = max(len(question) / max(len(ids), 1), 1.0)
  text, key = prompt(rng, int((length - 8) * chars_per_token))
  ids = tokenizer.encode_prompt(text + key + '. ' + FILLER * (length // 16 + 1))
  return ids[:length].astype(np.int32)

"""python -m train.sample --workdir DIR --prompt TEXT --max_new_tokens N [--temperature T] [--top_k K]

Continues the prompt with the run's latest parameters through the model's own `generate` (the KV-cached
loop of `models.sampling` for decoders with a decode cache, a full causal forward per token for those
without, or the model's own loop: HAT's words and bytes, ByT5's encoder then decoder).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import flags

from train import config as config_lib, distributed, restore


def _define(fv):
  flags.DEFINE_string('prompt', '', 'text to continue', flag_values=fv)
  flags.DEFINE_integer('max_new_tokens', 100, 'tokens to generate', flag_values=fv)
  flags.DEFINE_float('temperature', 0.8, 'sampling temperature (0 = greedy)', flag_values=fv)
  flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0 = all)', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'sampling seed', flag_values=fv)


@config_lib.cli
def main(argv):
  fv = config_lib.parse_flags(argv, _define, config_from_workdir=True)
  distributed.maybe_initialize()
  setup, state = restore.load_run(fv.config, fv.workdir)
  tokenizer = setup.dataset.tokenizer
  prompt = tokenizer.encode_prompt(fv.prompt)
  if prompt.size == 0:
    prompt = np.asarray([tokenizer.eos_id], np.int32)   # an empty prompt starts a new document
  max_len = fv.config.model.get('max_len')
  if max_len is not None and fv.config.model.get('positions', 'learned') == 'learned' \
      and prompt.size + fv.max_new_tokens > max_len:
    raise config_lib.ConfigError(f'prompt ({prompt.size} tokens) + --max_new_tokens={fv.max_new_tokens} '
                                 f'exceeds model.max_len={max_len}')
  ids = setup.model.generate(state['params'], prompt, fv.max_new_tokens, key=jax.random.key(fv.seed),
                 temperature=fv.temperature, top_k=fv.top_k, vocab_limit=setup.vocab_limit,
                 model_state=state['model_state'])
  if jax.process_index() == 0:
    sys.stdout.write(fv.prompt + tokenizer.decode(ids) + '\n')


if __name__ == '__main__':
  main()

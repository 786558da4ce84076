"""python -m train.sample --workdir DIR (--prompt TEXT | --prompts_file FILE) [--max_new_tokens N]
    [--temperature T] [--top_k K] [--top_p P] [--stop TEXT ...] [--nostop_at_eos] [--seed S] [--output FILE]

Continues prompts with the run's latest parameters through the model's own `generate`, all prompts in one
batch (`models.sampling`: the decode cache of a decoder, HAT's word and byte loops, ByT5's encoder then
cached decoder). One `--prompt` prints its text and continuation. `--prompts_file` holds one prompt per
line, or, for a `.jsonl` file, one JSON object per line with a "prompt" field (prompts with newlines); each
result is one JSON line {"prompt", "completion", "new_tokens", "stopped"} on stdout or in `--output`.

A row stops after `--max_new_tokens`, at the end-of-document id (unless `--nostop_at_eos`), or when its text
contains a `--stop` string; the completion ends before the stop string, and without the end-of-document id.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
from absl import flags

from models.sampling import Sampling
from train import config as config_lib, distributed, restore


def _define(fv):
  flags.DEFINE_string('prompt', None, 'one text to continue', flag_values=fv)
  flags.DEFINE_string('prompts_file', None, 'a file of prompts: one a line, or JSON lines with "prompt"',
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'write the JSON lines here instead of stdout', flag_values=fv)
  flags.DEFINE_integer('max_new_tokens', 100, 'tokens to generate per prompt', flag_values=fv)
  flags.DEFINE_float('temperature', 0.8, 'sampling temperature (0 = greedy)', flag_values=fv)
  flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0 = all)', flag_values=fv)
  flags.DEFINE_float('top_p', 1.0, 'sample among the most likely tokens holding this probability (1 = all)',
                     flag_values=fv)
  flags.DEFINE_multi_string('stop', [], 'stop a prompt once its continuation contains this text', flag_values=fv)
  flags.DEFINE_bool('stop_at_eos', True, 'stop a prompt at the end-of-document id', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'sampling seed', flag_values=fv)


def read_prompts(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f if line.strip()]
  if not path.endswith('.jsonl'):
    return lines
  prompts = []
  for number, line in enumerate(lines, start=1):
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
      raise config_lib.ConfigError(f'{path}:{number}: each JSON line needs a "prompt" string')
    prompts.append(record['prompt'])
  return prompts


def completion(text: str, stops: list[str]) -> tuple[str, bool]:
  """The text before the first stop string, and whether one was found."""
  cuts = [text.index(s) for s in stops if s in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


@config_lib.cli
def main(argv):
  fv = config_lib.parse_flags(argv, _define, config_from_workdir=True)
  if (fv.prompt is None) == (fv.prompts_file is None):
    raise config_lib.ConfigError('give one of --prompt TEXT or --prompts_file FILE')
  texts = [fv.prompt] if fv.prompt is not None else read_prompts(fv.prompts_file)
  if not texts:
    raise config_lib.ConfigError(f'--prompts_file={fv.prompts_file} holds no prompt')
  try:
    sampling = Sampling(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  distributed.maybe_initialize()
  setup, state = restore.load_run(fv.config, fv.workdir)
  tokenizer = setup.dataset.tokenizer
  empty = np.asarray([tokenizer.eos_id], np.int32)   # an empty prompt starts a new document
  prompts = [tokenizer.encode_prompt(t) if t else empty for t in texts]
  prompts = [p if p.size else empty for p in prompts]
  max_len = fv.config.model.get('max_len')
  longest = max(p.size for p in prompts)
  if max_len is not None and fv.config.model.get('positions', 'learned') == 'learned' \
      and longest + fv.max_new_tokens > max_len:
    raise config_lib.ConfigError(f'the longest prompt ({longest} tokens) + --max_new_tokens={fv.max_new_tokens} '
                                 f'exceeds model.max_len={max_len}')

  def stop(ids: list[int]) -> bool:
    return (fv.stop_at_eos and ids[-1] == tokenizer.eos_id) or completion(tokenizer.decode(ids), fv.stop)[1]

  generated = setup.model.generate(state['params'], prompts, fv.max_new_tokens, key=jax.random.key(fv.seed),
                                   sampling=dataclasses.replace(sampling, vocab_limit=setup.vocab_limit),
                                   stop=stop, model_state=state['model_state'])
  if jax.process_index() != 0:
    return
  if fv.prompt is not None:
    sys.stdout.write(fv.prompt + completion(tokenizer.decode(_without_eos(generated[0], tokenizer.eos_id)),
                                            fv.stop)[0] + '\n')
    return
  out = open(fv.output, 'w', encoding='utf-8') if fv.output else sys.stdout
  for text, ids in zip(texts, generated):
    body, stopped = completion(tokenizer.decode(_without_eos(ids, tokenizer.eos_id)), fv.stop)
    stopped = stopped or bool(len(ids) and ids[-1] == tokenizer.eos_id and fv.stop_at_eos)
    out.write(json.dumps({'prompt': text, 'completion': body, 'new_tokens': len(ids), 'stopped': stopped}) + '\n')
  if fv.output:
    out.close()


def _without_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
  return ids[:-1] if len(ids) and ids[-1] == eos_id else ids


if __name__ == '__main__':
  main()

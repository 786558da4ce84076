"""python -m train.sample --workdir DIR --prompt TEXT --max_new_tokens N [--temperature T] [--top_k K]

Generates with the model's KV cache (`decode=True`): the prompt is fed in one call, then one token
per call, each attending to the cached keys and values. A model with its own loop (HAT) runs it.
Models without a decode cache are sampled by a full causal forward per token. A model's RNG streams
(e.g. lexinvariant's per-sequence embedding table) get one key for the whole generation, so every step
sees the same draw.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from train import config as config_lib, distributed
from train.trainer import mask_padded_vocab, stream_keys


def init_cache(model, batch: int, length: int):
  """Zeroed decode cache for `length` positions (shapes from an abstract init, nothing else allocated)."""
  rngs = {'params': jax.random.key(0), **stream_keys(model, jax.random.key(0))}
  abstract = jax.eval_shape(lambda: model.init(rngs, tokens=jnp.zeros((batch, length), jnp.int32), train=False,
                                               decode=True))
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract['cache'])


def decode_step_fn(model):
  @jax.jit
  def step(params, cache, tokens, stream_key, model_state=None):
    variables = {'params': params, 'cache': cache, **(model_state or {})}
    (logits, _), updated = model.apply(variables, tokens=tokens, train=False, decode=True,
                                       rngs=stream_keys(model, stream_key), mutable=['cache'])
    return logits[:, -1], updated['cache']
  return step


def pick_token(logits, key, temperature: float, top_k: int, vocab_limit: int | None):
  """The next token from [1, vocab] logits; temperature 0 is greedy; ids >= vocab_limit are never chosen."""
  logits = mask_padded_vocab(logits, vocab_limit or logits.shape[-1])
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  scaled = logits / temperature
  if top_k:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  return jax.random.categorical(key, scaled, axis=-1)


def generate(model, params, prompt: np.ndarray, max_new_tokens: int, *, key, temperature: float = 1.0,
             top_k: int = 0, vocab_limit: int | None = None, model_state: dict | None = None) -> np.ndarray:
  """Continue `prompt` ([length] ids) by `max_new_tokens` with the model's KV cache; a model with its own
  generation loop (a `generate` method: HAT's nested word and byte loops) runs that, and models without a
  decode cache fall back to `generate_uncached`. `model_state`: the run's non-parameter variables."""
  if hasattr(model, 'generate'):
    return model.generate(params, prompt, max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                          vocab_limit=vocab_limit, model_state=model_state)
  try:
    step = decode_step_fn(model)
    cache = init_cache(model, 1, len(prompt) + max_new_tokens)
  except NotImplementedError:
    return generate_uncached(model, params, prompt, max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                             vocab_limit=vocab_limit, model_state=model_state)
  stream_key = jax.random.fold_in(key, max_new_tokens)   # not one of the per-token sampling keys
  logits, cache = step(params, cache, jnp.asarray(prompt, jnp.int32)[None], stream_key, model_state)
  out = []
  for i in range(max_new_tokens):
    token = pick_token(logits, jax.random.fold_in(key, i), temperature, top_k, vocab_limit)
    out.append(int(token[0]))
    if i + 1 < max_new_tokens:
      logits, cache = step(params, cache, token[:, None].astype(jnp.int32), stream_key, model_state)
  return np.asarray(out, np.int32)


def generate_uncached(model, params, prompt: np.ndarray, max_new_tokens: int, *, key, temperature: float = 1.0,
                      top_k: int = 0, vocab_limit: int | None = None, model_state: dict | None = None) -> np.ndarray:
  """Generation by a full causal forward over a fixed-size buffer (one compilation): position t's
  logits never depend on the zeros after it. O(length) work per token, for models without a cache."""
  buffer = np.zeros((1, len(prompt) + max_new_tokens), np.int32)
  buffer[0, :len(prompt)] = prompt
  rngs = stream_keys(model, jax.random.fold_in(key, max_new_tokens))
  forward = jax.jit(lambda p, tokens: model.apply({'params': p, **(model_state or {})}, tokens=tokens, train=False,
                                                  rngs=rngs)[0][0])
  for i in range(max_new_tokens):
    position = len(prompt) + i
    logits = forward(params, jnp.asarray(buffer))[position - 1][None]
    buffer[0, position] = int(pick_token(logits, jax.random.fold_in(key, i), temperature, top_k, vocab_limit)[0])
  return buffer[0, len(prompt):]


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
  from train import restore
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
  ids = generate(setup.model, state['params'], prompt, fv.max_new_tokens, key=jax.random.key(fv.seed),
                 temperature=fv.temperature, top_k=fv.top_k, vocab_limit=setup.vocab_limit,
                 model_state=state['model_state'])
  if jax.process_index() == 0:
    sys.stdout.write(fv.prompt + tokenizer.decode(ids) + '\n')


if __name__ == '__main__':
  main()

"""Sampling primitives every decoder shares: the next token from logits, and the two generation loops a
model's `generate` chooses between (one token per cached step with `decode=True`, or a full causal forward
per token for models without a decode cache).

A model's RNG streams (e.g. lexinvariant's per-sequence embedding table) get one key for the whole
generation, so every step sees the same draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.formats import mask_padded_vocab


def init_cache(model, batch: int, length: int):
  """Zeroed decode cache for `length` positions (shapes from an abstract init, nothing else allocated)."""
  rngs = {'params': jax.random.key(0), **model.stream_keys(jax.random.key(0))}
  abstract = jax.eval_shape(lambda: model.init(rngs, tokens=jnp.zeros((batch, length), jnp.int32), train=False,
                                               decode=True))
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract['cache'])


def decode_step_fn(model):
  @jax.jit
  def step(params, cache, tokens, stream_key, model_state=None):
    variables = {'params': params, 'cache': cache, **(model_state or {})}
    (logits, _), updated = model.apply(variables, tokens=tokens, train=False, decode=True,
                                       rngs=model.stream_keys(stream_key), mutable=['cache'])
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


def generate_cached(model, params, prompt: np.ndarray, max_new_tokens: int, *, key, temperature: float = 1.0,
                    top_k: int = 0, vocab_limit: int | None = None, model_state: dict | None = None) -> np.ndarray:
  """Continue `prompt` ([length] ids) by `max_new_tokens`, feeding the prompt in one `decode=True` call and
  then one token per call against the model's KV cache. `model_state`: the run's non-parameter variables."""
  step = decode_step_fn(model)
  cache = init_cache(model, 1, len(prompt) + max_new_tokens)
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
  rngs = model.stream_keys(jax.random.fold_in(key, max_new_tokens))
  forward = jax.jit(lambda p, tokens: model.apply({'params': p, **(model_state or {})}, tokens=tokens, train=False,
                                                  rngs=rngs)[0][0])
  for i in range(max_new_tokens):
    position = len(prompt) + i
    logits = forward(params, jnp.asarray(buffer))[position - 1][None]
    buffer[0, position] = int(pick_token(logits, jax.random.fold_in(key, i), temperature, top_k, vocab_limit)[0])
  return buffer[0, len(prompt):]

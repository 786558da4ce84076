"""Sampling every decoder shares: the next token from logits (`Sampling`), and the batched generation loop a
model's `generate` runs, over its decode cache (`decode=True`, one token per call) or, for a model without
one, over a full causal forward per token.

Prompts of different lengths run in lock step without padding: the rows' shortest prompt is fed as one
chunk, then one position per call for every row, each row taking its own prompt's token while it has one
and its sampled token after. Every row sees exactly the positions it would see alone, so batching changes
no logits (tested), whatever the model's positions, masks or caches; the price is one call per position of
the longer prompts beyond the shortest.

Sampling keys are per row and per new token (`fold_in(fold_in(key, row), i)`), so a row's draws do not
depend on the other prompts. A model's RNG streams (e.g. lexinvariant's per-sequence embedding table) get
one key for the whole generation, so every step sees the same draw.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.formats import mask_padded_vocab

# stop(ids generated so far by one row) -> whether that row is finished (the last id is kept)
StopFn = Callable[[list[int]], bool]


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: temperature 0 is greedy; top_k 0 and top_p 1 keep every id; ids at or
  beyond `vocab_limit` (a vocabulary padded for sharding) are never drawn."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int | None = None

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f'sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got {self})')

  def pick(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
    """Tokens [batch] from logits [batch, vocab], one key per row."""
    logits = mask_padded_vocab(logits.astype(jnp.float32), self.vocab_limit or logits.shape[-1])
    if self.temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / self.temperature
    if self.top_k:
      kth = jax.lax.top_k(scaled, self.top_k)[0][:, -1:]
      scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if self.top_p < 1:   # the smallest set of most likely ids whose probability reaches top_p
      ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
      before = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1) - jax.nn.softmax(ranked, axis=-1)
      cutoff = jnp.min(jnp.where(before < self.top_p, ranked, jnp.inf), axis=-1, keepdims=True)
      scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)


def token_keys(key, rows, steps) -> jax.Array:
  """The sampling key of each row's `steps[i]`-th new token."""
  return jax.vmap(lambda row, step: jax.random.fold_in(jax.random.fold_in(key, row), step))(
      jnp.asarray(rows, jnp.int32), jnp.asarray(steps, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def draw(sampling: Sampling, logits, key, rows, steps) -> jax.Array:
  """`sampling.pick` with each row's key for its `steps[i]`-th new token: the `pick` of `lockstep`."""
  return sampling.pick(logits, token_keys(key, rows, steps))


def stream_key(key) -> jax.Array:
  """The key of the model's RNG streams for a whole generation: not one of the rows' sampling keys."""
  return jax.random.fold_in(key, 2**32 - 1)


def init_cache(model, batch: int, length: int, method=None, **inputs):
  """Zeroed decode cache of `batch` rows and `length` positions. `method` and `inputs`: a model method other
  than `__call__` that owns the cache, with example inputs of the decode length that switch it to decoding."""
  if method is None:
    inputs = {'tokens': jnp.zeros((batch, length), jnp.int32), 'train': False, 'decode': True}
  specs = tuple(sorted((name, jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, 'shape') else x)
                       for name, x in inputs.items()))
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), _cache_shapes(model, method, specs))


@functools.cache   # an abstract init per model and input shapes, not per generation
def _cache_shapes(model, method, specs):
  rngs = {'params': jax.random.key(0), **model.stream_keys(jax.random.key(0))}
  inputs = {name: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x for name, x in specs}
  return jax.eval_shape(lambda: model.init(rngs, **inputs, method=method))['cache']


@functools.cache   # one compilation per model (and shapes) across generations
def decode_step_fn(model):
  """(params, cache, tokens [batch, n], streams, model_state) -> (logits at the last position, cache)."""
  @jax.jit
  def step(params, cache, tokens, stream_key, model_state=None):
    variables = {'params': params, 'cache': cache, **(model_state or {})}
    (logits, _), updated = model.apply(variables, tokens=tokens, train=False, decode=True,
                                       rngs=model.stream_keys(stream_key), mutable=['cache'])
    return logits[:, -1], updated['cache']
  return step


@functools.cache
def full_forward_fn(model):
  """(params, buffer [batch, length], position, streams, model_state) -> the logits at `position`."""
  @jax.jit
  def forward(params, buffer, position, stream_key, model_state=None):
    logits = model.apply({'params': params, **(model_state or {})}, tokens=buffer, train=False,
                         rngs=model.stream_keys(stream_key))[0]
    return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)
  return forward


def lockstep(prompts: Sequence[np.ndarray], max_new_tokens: int, *, start, advance, pick,
             stop: StopFn | None = None) -> list[np.ndarray]:
  """The loop of the module docstring. `start(prefix [batch, n])` and `advance(tokens [batch], position)`
  return the logits [batch, vocab] at the last position fed; `pick(logits, rows, steps)` draws the next
  tokens. A row ends after `max_new_tokens` or when `stop` says so; the loop ends when every row has."""
  lengths = np.asarray([len(p) for p in prompts])
  if lengths.min() < 1:
    raise ValueError('every prompt needs at least one token')
  shortest = int(lengths.min())
  prefix = np.stack([p[:shortest] for p in prompts]).astype(np.int32)
  out: list[list[int]] = [[] for _ in prompts]
  done = np.zeros(len(prompts), bool)
  logits = start(jnp.asarray(prefix))
  rows = np.arange(len(prompts))
  for position in range(shortest, int(lengths.max()) + max_new_tokens):
    drawn = np.asarray(pick(logits, rows, np.maximum(position - lengths, 0)))
    fed = np.asarray([p[position] if position < len(p) else 0 for p in prompts], np.int32)
    generating = (position >= lengths) & ~done
    for row in np.flatnonzero(generating):
      fed[row] = drawn[row]
      out[row].append(int(drawn[row]))
      done[row] = len(out[row]) == max_new_tokens or bool(stop and stop(out[row]))
    if done.all():
      break
    logits = advance(jnp.asarray(fed), position)
  return [np.asarray(ids, np.int32) for ids in out]


def generate(model, params, prompts: Sequence[np.ndarray], max_new_tokens: int, *, key,
             sampling: Sampling = Sampling(), stop: StopFn | None = None, model_state: dict | None = None,
             cached: bool | None = None) -> list[np.ndarray]:
  """Continue each prompt ([length] ids) by up to `max_new_tokens` through the model's decode cache
  (`cached`, by default the model's `cached_decoding`) or a full causal forward per token over a
  fixed-size buffer (one compilation; position t's logits never depend on the zeros after it)."""
  cached = model.cached_decoding if cached is None else cached
  streams = stream_key(key)
  total = max(len(p) for p in prompts) + max_new_tokens
  pick = lambda logits, rows, steps: draw(sampling, logits, key, rows, steps)
  if cached:
    step = decode_step_fn(model)
    cache = init_cache(model, len(prompts), total)

    def start(prefix):
      nonlocal cache
      logits, cache = step(params, cache, prefix, streams, model_state)
      return logits

    def advance(tokens, position):
      nonlocal cache
      logits, cache = step(params, cache, tokens[:, None], streams, model_state)
      return logits
  else:
    forward = full_forward_fn(model)
    buffer = jnp.zeros((len(prompts), total), jnp.int32)

    def start(prefix):
      nonlocal buffer
      buffer = buffer.at[:, :prefix.shape[1]].set(prefix)
      return forward(params, buffer, prefix.shape[1] - 1, streams, model_state)

    def advance(tokens, position):
      nonlocal buffer
      buffer = buffer.at[:, position].set(tokens)
      return forward(params, buffer, position, streams, model_state)
  return lockstep(prompts, max_new_tokens, start=start, advance=advance, pick=pick, stop=stop)

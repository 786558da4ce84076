"""The model registry and `LanguageModel`, the whole contract between an architecture and the training loop,
evaluation, sampling and the benchmarks. Nothing outside it is probed: every hook is declared here, with
its default.

A model is a Linen module registered by name (`@register('name')`). The loop only ever does

    logits, aux = module.apply(variables, **module.inputs(batch), train=..., rngs=module.stream_keys(key))
    score = module.score(logits, batch, vocab_limit)

`aux` maps names to scalars: entries named `loss/...` are added to the training objective, the rest are
logged as metrics (and averaged in evaluation). Decoder LMs take `tokens` [batch, seq] and return logits
[batch, seq, vocab]; other batch formats (`models.formats`) name their own inputs and targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import formats, sampling as sampling_lib

_REGISTRY: dict[str, type['LanguageModel']] = {}


class InputError(ValueError):
  """An input the model cannot take (e.g. a prompt that hard deletion empties); the CLIs print it as one line."""


def register(name: str):
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f'model {name!r} registered twice')
    cls.registry_name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def model_class(name: str) -> type['LanguageModel']:
  if name not in _REGISTRY:
    raise ValueError(f'model.name={name!r} is not registered (known: {", ".join(names())})')
  return _REGISTRY[name]


def default_config(name: str) -> ml_collections.ConfigDict:
  """The full model config (every key the architecture accepts) with its defaults."""
  config = model_class(name).default_config()
  config.name = name
  return config


def build(model_config: ml_collections.ConfigDict) -> 'LanguageModel':
  """Build and validate the registered module named by `model_config.name`."""
  kwargs = dict(model_config)
  cls = model_class(kwargs.pop('name'))
  fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ('parent', 'name')}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'model.{unknown[0]} is not a key of model {cls.registry_name!r}')
  module = cls(**kwargs)
  module.validate()
  return module


class LanguageModel(nn.Module):
  """Base class. Capabilities are class data; the methods below are the hooks, each with its default."""
  registry_name: ClassVar[str] = ''
  # The batch layout the data pipeline builds and the scoring it implies (a name in `models.formats`).
  batch_format: ClassVar[str] = 'lm'
  # Symbols the model predicts beyond the tokenizer's ids (given the ids right after them).
  extra_output_symbols: ClassVar[int] = 0
  # RNG streams the model draws from in training (evaluation passes the same names, fixed keys).
  rng_streams: ClassVar[tuple[str, ...]] = ('dropout',)
  # Non-parameter variable collections the train step updates and checkpoints (controllers, statistics).
  state_collections: ClassVar[tuple[str, ...]] = ()
  # `__call__(tokens, decode=True)` keeps a decode cache in the 'cache' collection, so `generate` feeds one
  # token per call; without it `generate` runs a full causal forward per token.
  cached_decoding: ClassVar[bool] = True
  # Named shapes (model keys): 'tiny' is the one every shared test runs (tests/test_models.py).
  presets: ClassVar[dict[str, dict]] = {}
  # The width the arena sets so the model's non-embedding parameters match the baseline's.
  arena_knob: ClassVar[str] = 'd_ff'
  # `grown_config` and `grown_params` scale a trained model up (`python -m train.grow`: TokenFormer).
  grows_by_tokens: ClassVar[bool] = False
  # Model keys under which evaluation is causal, where the default evaluation is not by design (MoR's
  # training top-k ranks the whole window): the arena compares every model causally with them, and the
  # shared causality test runs under them.
  causal_evaluation: ClassVar[dict] = {}

  @classmethod
  def arena_layout(cls, *, d_model: int, depth: int, heads: int) -> dict:
    """Model keys (besides d_model) at the arena's width, depth and heads, in the paper's layout, before
    the knob is matched: by default `depth` blocks with a 4x feed-forward."""
    return dict(num_layers=depth, num_heads=heads, d_ff=4 * d_model)

  def validate(self) -> None:
    """Raise ValueError naming the config key when the shape is impossible."""
    if getattr(self, 'vocab_size', 1) <= 0:
      raise ValueError('model.vocab_size must be positive')
    heads, width = getattr(self, 'num_heads', 1), getattr(self, 'd_model', 1)
    if width % heads and not getattr(self, 'head_dim', 0):
      raise ValueError(f'model.num_heads={heads} does not divide model.d_model={width}')

  def example_inputs(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Input shapes for `init`, matching the model's batch format."""
    return {'tokens': jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)}

  @property
  def format(self) -> formats.BatchFormat:
    return formats.get(self.batch_format)

  def inputs(self, batch: dict) -> dict:
    """The keyword inputs of `__call__` taken from a batch."""
    return self.format.model_inputs(batch)

  def score(self, logits, batch: dict, vocab_limit: int) -> formats.Score:
    """Weighted NLL, weights, right and scored units, counted bytes: the batch format's scoring."""
    return self.format.score(logits, batch, vocab_limit)

  def stream_keys(self, key) -> dict:
    """One key per RNG stream, derived from `key`."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rng_streams)}

  def generate(self, params, prompts: Sequence[np.ndarray], max_new_tokens: int, *, key,
               sampling: sampling_lib.Sampling = sampling_lib.Sampling(), stop: sampling_lib.StopFn | None = None,
               model_state: dict | None = None) -> list[np.ndarray]:
    """The ids (up to `max_new_tokens`, fewer where `stop` ends a row) that continue each prompt ([length]
    ids), in one batch (`models.sampling`). A model whose generation is not one token per step (HAT's words
    and bytes, an encoder-decoder) overrides this."""
    return sampling_lib.generate(self, params, prompts, max_new_tokens, key=key, sampling=sampling, stop=stop,
                                 model_state=model_state)

  def forward_flops_per_token(self, seq_len: int) -> float:
    """Analytic forward matmul FLOPs per token (causal attention counted at half)."""
    raise NotImplementedError

  def analytic_param_count(self) -> int:
    """Every parameter, counted from the shapes by formula (tested against the initialised model)."""
    raise NotImplementedError

  def flops_per_token(self, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 3x forward. Used for MFU and compute matching."""
    return 3 * self.forward_flops_per_token(seq_len)

  @classmethod
  def config_from_fields(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        f.name: f.default for f in dataclasses.fields(cls)
        if f.init and f.name not in ('parent', 'name') and f.default is not dataclasses.MISSING})

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return cls.config_from_fields()


def abstract_variables(module: LanguageModel, batch_size: int = 1, seq_len: int = 8):
  """Shapes of the (boxed, logically named) variables without allocating them."""
  inputs = module.example_inputs(batch_size, seq_len)
  rngs = {'params': jax.random.key(0), **module.stream_keys(jax.random.key(0))}
  return jax.eval_shape(lambda inputs: module.init(rngs, **inputs, train=False), inputs)


def param_counts(module: LanguageModel) -> dict[str, int]:
  """Total parameters, and those outside token/position embeddings and readout (a `vocab` or `pos` axis)."""
  params = abstract_variables(module)['params']
  total = non_embedding = 0
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    size = math.prod(nn.meta.unbox(leaf).shape)
    total += size
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
    if not {'vocab', 'pos'} & set(names):
      non_embedding += size
  return {'params': total, 'non_embedding_params': non_embedding}

"""What training, evaluation and sampling share: the mesh, the data, the model, the optimiser and the
layout of the training state, and evaluation on a split (`Setup`).

State: {'step', 'params', 'opt_state', 'rng', 'model_state'}; `model_state` holds the non-parameter
variable collections the model declares (`state_collections`: controllers, statistics), updated by the
train step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from models import formats
from models.formats import byte_ids
from train import config as config_lib, data, sharding

LN2 = math.log(2.0)


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup, then cosine decay to lr * min_lr_ratio (`schedule=cosine`) or constant and a
  linear cool-down to it over the last `decay_fraction` of the steps (`wsd`, MoR's trapezoid);
  global-norm clipping (grad_clip 0 = off). Weight decay applies to matrices only (not norms or biases)."""
  warmup = min(t.warmup_steps, t.steps)
  if t.get('schedule', 'cosine') == 'wsd':
    cooldown = max(1, min(int(t.steps * t.decay_fraction), t.steps - warmup))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.lr, max(warmup, 1)), optax.constant_schedule(t.lr),
         optax.linear_schedule(t.lr, t.lr * t.min_lr_ratio, cooldown)], [warmup, t.steps - cooldown])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=warmup, decay_steps=max(t.steps, warmup + 1),
        end_value=t.lr * t.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  optimizer = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))
  return optimizer, schedule


def nominal_vocab_size(config, model_cls) -> int:
  """The tokenizer's vocabulary without a trained tokenizer: what model.vocab_size leaves after the model's
  own symbols when it is set, else the byte tokenizer's ids or data.vocab_size (the size a bpe or wordpiece
  tokenizer is trained to; an upper bound for the others)."""
  if config.model.vocab_size:
    return config.model.vocab_size - model_cls.extra_output_symbols
  return byte_ids.VOCAB_SIZE if config.data.tokenizer == 'byte' else config.data.vocab_size


def micro_batches(batch: dict, accum: int) -> dict:
  """[batch, ...] -> [accum, batch / accum, ...]: micro-batch i takes rows i, i + accum, ..., so every device
  keeps a share of every micro-batch."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)


class Setup:
  """What training, evaluation and sampling share: mesh, data, tokenizer, model and state layout.

  `devices`: the mesh's devices (default: every device of the job). `load_data=False` reads no corpus and
  trains no tokenizer: the vocabulary is then model.vocab_size, or the tokenizer's nominal size
  (`nominal_vocab_size`). `train.aot` uses both to compile for a TPU topology from this host."""

  def __init__(self, config, workdir: str | None, *, devices=None, load_data: bool = True):
    self.config, self.workdir = config, workdir
    config_lib.validate(config)
    try:
      self.mesh = sharding.make_mesh(config.mesh, devices)
      self.rows = sharding.process_rows(config.train.batch_size)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    self.platform = self.mesh.devices.flat[0].platform
    batch_shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    micro = config.train.batch_size // config.train.grad_accum
    if micro % batch_shards:
      raise config_lib.ConfigError(
          f'train.batch_size / train.grad_accum = {micro} does not divide over mesh.data x mesh.fsdp = {batch_shards}')
    model_cls = models.model_class(config.model.name)
    self.format = formats.get(model_cls.batch_format)
    self.dataset = data.Dataset(config, workdir, fmt=self.format) if load_data else None
    tokenizer_vocab = self.dataset.tokenizer.vocab_size if load_data else nominal_vocab_size(config, model_cls)
    # The model may predict symbols of its own after the tokenizer's ids (HAT's end of word).
    vocab = self.vocab_limit = tokenizer_vocab + model_cls.extra_output_symbols
    if config.model.vocab_size == 0:   # padded so the vocab axis divides over the tensor axis
      tensor = self.mesh.shape['tensor']
      with config.unlocked():
        config.model.vocab_size = -(-vocab // tensor) * tensor
    elif config.model.vocab_size < vocab:
      raise config_lib.ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                                   f'tokenizer vocabulary ({vocab})')
    self.model = config_lib.build_model(config, platform=self.platform)
    self.optimizer, self.schedule = make_optimizer(config.train)
    self._layout()

  def _init_state(self, key):
    """The full training state with boxed (logically named) parameters."""
    init_key, train_key = jax.random.split(key)
    batch = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    inputs = {k: jnp.zeros(s.shape, s.dtype)
              for k, s in self.model.example_inputs(batch, self.config.train.seq_len).items()}
    variables = self.model.init({'params': init_key, **self.model.stream_keys(init_key)}, **inputs, train=False)
    params = variables['params']
    model_state = {name: variables[name] for name in self.model.state_collections if name in variables}
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': self.optimizer.init(params),
            'rng': jax.random.key_data(train_key), 'model_state': model_state}

  def _layout(self):
    boxed = jax.eval_shape(self._init_state, jax.random.key(0))
    self.state_shardings = sharding.logical_shardings(boxed, self.mesh)
    for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed)),
                                   jax.tree.leaves(self.state_shardings)):
      try:
        shard.shard_shape(leaf.shape)
      except ValueError:
        raise config_lib.ConfigError(f'{jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split as '
                                     f'{shard.spec} on mesh {dict(self.mesh.shape)}: change the model '
                                     'width or the mesh') from None
    self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       nn.meta.unbox(boxed), self.state_shardings)
    self.param_counts = models.param_counts(self.model)

  def init_state(self):
    init = jax.jit(lambda key: nn.meta.unbox(self._init_state(key)), out_shardings=self.state_shardings)
    return init(jax.random.key(self.config.seed))

  def abstract_batch(self) -> dict:
    """The global training batch as shapes and shardings: the format's batch of one all-zero window, its
    leading axis set to train.batch_size (a format's shapes depend on the config, not the data)."""
    t = self.config.train
    window = np.zeros((1, t.seq_len + 1), np.int32)
    example = self.format.build(window, np.ones(window.shape, bool), self.config.model)
    shard = sharding.batch_sharding(self.mesh)
    return {k: jax.ShapeDtypeStruct((t.batch_size, *v.shape[1:]), v.dtype, sharding=shard) for k, v in example.items()}

  def global_batch(self, local_batch: dict) -> dict:
    return sharding.global_batch(local_batch, self.mesh)

  # ------------------------------------------------------------------------------------- evaluation
  def make_eval_step(self):
    """(params, model_state, batch, key) -> weighted NLL and weight summed over the batch per position,
    then the scoring units (tokens; words for word-structured [batch, words, bytes] targets) predicted
    entirely right by argmax, the units, the UTF-8 bytes the batch counts (0 when it counts none), and
    the model's metrics (its aux entries other than losses) times the batch's weight. The batch runs in the
    training step's `grad_accum` micro-batches, so evaluation needs no more memory than training."""
    model, vocab_limit, accum = self.model, self.vocab_limit, self.config.train.grad_accum

    def micro_step(params, model_state, micro, key):
      with sharding.activation_rules(self.mesh):
        logits, aux = model.apply({'params': params, **model_state}, **model.inputs(micro), train=False,
                                  rngs=model.stream_keys(key))
      score = model.score(logits, micro, vocab_limit)
      metrics = {k: v * micro['weights'].sum() for k, v in aux.items() if not k.startswith('loss/')}
      return (*score, metrics)

    def eval_step(params, model_state, batch, key):
      outs = jax.lax.map(lambda xs: micro_step(params, model_state, xs[0], jax.random.fold_in(key, xs[1])),
                         (micro_batches(batch, accum), jnp.arange(accum)))
      return jax.tree.map(lambda x: x.sum(0), outs)

    return jax.jit(eval_step, out_shardings=sharding.replicated(self.mesh))

  def evaluate(self, eval_step, params, model_state, split: str, max_batches: int = 0, draw: int = 0,
               per_position: bool = False, transform: Callable[[dict, int], dict] | None = None) -> dict:
    """Loss, perplexity, bits per byte (total NLL over the UTF-8 bytes scored: the split's, pro rata,
    unless the batches count their own), accuracy (of tokens, or of words for word-structured
    batches) and the model's own metrics (averaged over batches by their weight) on one split.

    `draw` picks the keys of the model's RNG streams, one per batch: a fixed function of (seed, draw, batch
    index), so evaluation is reproducible and a model that draws at evaluation (lexinvariant's tables) draws
    afresh for every batch; `per_position` adds the mean NLL at each position of the window. `transform`
    rewrites each host batch, given its index, before it is scored (probes: e.g. a cipher of the text)."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), draw)
    totals = None
    for index, batch in enumerate(self.dataset.eval_batches(split, max_batches, self.rows)):
      if transform:
        batch = transform(batch, index)
      out = eval_step(params, model_state, self.global_batch(batch), jax.random.fold_in(key, index))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)   # stays on device until the end
    *totals, metrics = totals
    nll, weight, right, units, counted_bytes = (np.asarray(t, np.float64) for t in totals)
    loss = nll.sum() / max(weight.sum(), 1.0)
    n_bytes = counted_bytes if counted_bytes else self.dataset.eval_bytes(split, max_batches)
    result = {'loss': loss, 'ppl': math.exp(min(loss, 80.0)), 'bpb': nll.sum() / LN2 / n_bytes,
              'accuracy': right / max(units, 1.0), 'tokens': int(weight.sum()),
              **{k: float(v) / max(weight.sum(), 1.0) for k, v in metrics.items()}}
    if per_position:
      result['nll_by_position'] = (nll / np.maximum(weight, 1.0)).tolist()
    return result

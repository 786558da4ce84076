"""The training loop. It knows no architecture: a model is whatever `models.build` returns, fed the
batch its `batch_format` asks for; its objective is the weighted next-token cross-entropy plus the
`loss/...` terms it reports in `aux`.

State: {'step', 'params', 'opt_state', 'rng', 'model_state'}; `model_state` holds any non-parameter
variable collections a model declares (controllers, running statistics), updated by the train step.
"""

from __future__ import annotations

import math
import signal
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from train import checkpoint, config as config_lib, data, metrics as metrics_lib, paths, sharding

LN2 = math.log(2.0)
NOT_INPUTS = ('targets', 'weights', 'bytes')


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


def mask_padded_vocab(logits, vocab_limit: int):
  """Ids at or beyond the tokenizer's vocabulary (padding for sharding) get no probability."""
  if vocab_limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -1e9)


def token_nll(logits, targets, vocab_limit: int):
  """Per-token NLL in float32."""
  logits = mask_padded_vocab(logits.astype(jnp.float32), vocab_limit)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def weighted_nll(logits, targets, weights, vocab_limit: int):
  """(sum of weighted token NLLs, sum of weights), in float32."""
  return (token_nll(logits, targets, vocab_limit) * weights).sum(), weights.sum()


def model_inputs(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


def stream_keys(model: models.LanguageModel, key) -> dict:
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(model.rng_streams)}


class Setup:
  """What training, evaluation and sampling share: mesh, data, tokenizer, model and state layout."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    config_lib.validate(config)
    try:
      self.mesh = sharding.make_mesh(config.mesh)
      self.rows = sharding.process_rows(config.train.batch_size)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    batch_shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    micro = config.train.batch_size // config.train.grad_accum
    if micro % batch_shards:
      raise config_lib.ConfigError(
          f'train.batch_size / train.grad_accum = {micro} does not divide over mesh.data x mesh.fsdp = {batch_shards}')
    model_cls = models.model_class(config.model.name)
    self.dataset = data.Dataset(config, workdir, fmt=model_cls.batch_format)
    # The model may predict symbols of its own after the tokenizer's ids (HAT's end of word).
    vocab = self.vocab_limit = self.dataset.tokenizer.vocab_size + model_cls.extra_output_symbols
    if config.model.vocab_size == 0:   # padded so the vocab axis divides over the tensor axis
      tensor = self.mesh.shape['tensor']
      with config.unlocked():
        config.model.vocab_size = -(-vocab // tensor) * tensor
    elif config.model.vocab_size < vocab:
      raise config_lib.ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                                   f'tokenizer vocabulary ({vocab})')
    self.model = config_lib.build_model(config)
    self.optimizer, self.schedule = make_optimizer(config.train)
    self._layout()

  def _init_state(self, key):
    """The full training state with boxed (logically named) parameters."""
    init_key, train_key = jax.random.split(key)
    batch = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    inputs = {k: jnp.zeros(s.shape, s.dtype)
              for k, s in self.model.example_inputs(batch, self.config.train.seq_len).items()}
    rngs = {'params': init_key, **stream_keys(self.model, init_key)}
    variables = self.model.init(rngs, **inputs, train=False)
    params = variables.pop('params')
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': self.optimizer.init(params),
            'rng': jax.random.key_data(train_key), 'model_state': dict(variables)}

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

  def global_batch(self, local_batch: dict) -> dict:
    return sharding.global_batch(local_batch, self.mesh)

  # ------------------------------------------------------------------------------------- evaluation
  def make_eval_step(self):
    """(params, model_state, batch, key) -> weighted NLL and weight summed over the batch per position,
    then the scoring units (tokens; words for word-structured [batch, words, bytes] targets) predicted
    entirely right by argmax, the units, the UTF-8 bytes the batch counts (0 when it counts none), and
    the model's metrics (its aux entries other than losses) times the batch's weight."""
    model, vocab_limit = self.model, self.vocab_limit

    def eval_step(params, model_state, batch, key):
      logits, aux = model.apply({'params': params, **model_state}, **model_inputs(batch), train=False,
                              rngs=stream_keys(model, key))
      weights = batch['weights']
      nll = token_nll(logits, batch['targets'], vocab_limit) * weights
      right = (mask_padded_vocab(logits, vocab_limit).argmax(-1) == batch['targets']) | (weights == 0)
      scored = weights > 0
      if weights.ndim == 3:   # a word is right when all its scored targets are
        right, scored = right.all(-1), scored.any(-1)
      bytes_ = batch['bytes'].sum() if 'bytes' in batch else jnp.zeros(())
      metrics = {k: v * weights.sum() for k, v in aux.items() if not k.startswith('loss/')}
      return nll.sum(0), weights.sum(0), (right & scored).sum(), scored.sum(), bytes_, metrics

    return jax.jit(eval_step, out_shardings=sharding.replicated(self.mesh))

  def evaluate(self, eval_step, params, model_state, split: str, max_batches: int = 0, draw: int = 0,
               per_position: bool = False) -> dict:
    """Loss, perplexity, bits per byte (total NLL over the UTF-8 bytes scored: the split's, pro rata,
    unless the batches count their own), accuracy (of tokens, or of words for word-structured
    batches) and the model's own metrics (averaged over batches by their weight) on one split.

    `draw` picks the key of the model's RNG streams (a fixed function of the seed, so evaluation is
    reproducible); `per_position` adds the mean NLL at each position of the window."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), draw)
    totals = None
    for batch in self.dataset.eval_batches(split, max_batches, self.rows):
      out = eval_step(params, model_state, self.global_batch(batch), key)
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


class Trainer:
  """Runs (or resumes) training in `workdir` for `config.train.steps` steps."""

  def __init__(self, config, workdir: str):
    self.setup = Setup(config, workdir)
    self.config, self.workdir = config, workdir
    self.stop_requested = threading.Event()

  def _make_train_step(self):
    model, optimizer, schedule = self.setup.model, self.setup.optimizer, self.setup.schedule
    vocab_limit = self.setup.vocab_limit
    accum = self.config.train.grad_accum

    def micro_objective(params, model_state, micro, key, total_weight):
      mutable = list(model_state)
      out = model.apply({'params': params, **model_state}, **model_inputs(micro), train=True,
                        rngs=stream_keys(model, key), mutable=mutable or False)
      (logits, aux), new_model_state = out if mutable else (out, {})
      nll, _ = weighted_nll(logits, micro['targets'], micro['weights'], vocab_limit)
      aux_loss = sum((v for k, v in aux.items() if k.startswith('loss/')), jnp.zeros(()))
      return nll / total_weight + aux_loss / accum, (nll, aux, dict(new_model_state))

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def train_step(state, batch):
      key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
      total_weight = jnp.maximum(batch['weights'].sum(), 1.0)
      # Micro-batch i takes rows i, i + accum, ...: every device keeps a share of every micro-batch.
      micro_batches = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

      def body(carry, xs):
        grads, model_state = carry
        micro, i = xs
        (_, (nll, aux, model_state)), g = grad_fn(state['params'], model_state, micro, jax.random.fold_in(key, i),
                                                  total_weight)
        return (jax.tree.map(jnp.add, grads, g), model_state), (nll, aux)

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      (grads, model_state), (nll, aux) = jax.lax.scan(body, (zeros, state['model_state']),
                                                      (micro_batches, jnp.arange(accum)))
      updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
      new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                   'opt_state': opt_state, 'rng': state['rng'], 'model_state': model_state}
      step_metrics = {'loss': nll.sum() / total_weight, 'grad_norm': optax.tree.norm(grads),
                      'lr': schedule(state['step']), **{k: v.mean() for k, v in aux.items()}}
      return new_state, step_metrics

    return train_step

  def compile_train_step(self, state, batch):
    """The sharded train step, compiled ahead of time for these shapes; it donates the state it is given."""
    setup = self.setup
    return jax.jit(self._make_train_step(), in_shardings=(setup.state_shardings, sharding.batch_sharding(setup.mesh)),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=0).lower(state, batch).compile()

  def _request_stop(self, signum, frame):
    self.stop_requested.set()

  def _stop_agreed(self, done: int) -> bool:
    """All processes stop together: a SIGTERM on any one host stops every host at the same step. With
    several processes they agree only on log steps, so the loop has no cross-host barrier per step."""
    flag = self.stop_requested.is_set()
    if jax.process_count() == 1:
      return flag
    if done % self.config.train.log_every:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))

  def run(self) -> dict:
    setup, config, t = self.setup, self.config, self.config.train
    if jax.process_index() == 0:
      paths.workdir_path(self.workdir).mkdir(parents=True, exist_ok=True)
      paths.workdir_path(self.workdir, 'config.json').write_text(config.to_json(indent=2))
    ckpt = checkpoint.Checkpointer(self.workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is not None:
      state, meta = ckpt.restore(latest, setup.abstract_state)
      run_id = meta['wandb_run_id']
    else:
      state, run_id = setup.init_state(), metrics_lib.new_wandb_run_id()
    start = int(jax.device_get(state['step']))
    writer = metrics_lib.MetricsWriter(self.workdir, config, run_id=run_id, total_steps=t.steps, initial_step=start)
    if latest is None and t.get('init_from'):
      from train import restore
      state['params'], fresh = restore.params_from_run(t.init_from, state['params'])
      writer.note(f'initialised from {t.init_from}; newly initialised: {", ".join(fresh) or "nothing"}')
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._request_stop)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_token = setup.model.flops_per_token(t.seq_len)
    peak = metrics_lib.peak_flops_per_device(t.peak_flops_per_device) * jax.device_count()
    eval_step = setup.make_eval_step()
    result: dict = {'params': setup.param_counts['params'], 'start_step': start}
    try:
      if start >= t.steps:
        writer.note(f'already trained {start} >= train.steps={t.steps} steps; nothing to do')
        return result
      first_batch = setup.global_batch(setup.dataset.train_batch(start, setup.rows))
      compile_start = time.perf_counter()
      train_step = self.compile_train_step(state, first_batch)
      compile_time = time.perf_counter() - compile_start
      writer.write(start, {'compile_time_s': compile_time, **setup.param_counts,
                           'flops_per_token': flops_per_token, **metrics_lib.step_memory(train_step)})
      pending = None          # (step, device metrics) of the step before: fetched one step late
      window_start, window_steps = time.perf_counter(), 0

      def drain():
        """Fetch the pending step's metrics; stop on a non-finite loss; log on log steps."""
        nonlocal pending, window_start, window_steps
        if pending is None:
          return
        done, device_metrics = pending
        pending = None
        values = jax.device_get(device_metrics)
        if not (np.isfinite(values['loss']) and np.isfinite(values['grad_norm'])):
          last_good = ckpt.latest_step()
          raise config_lib.TrainingStopped(
              f'non-finite loss ({values["loss"]}) or gradient norm ({values["grad_norm"]}) at step {done}; '
              f'the last good checkpoint is '
              f'{"step " + str(last_good) if last_good is not None else "none (nothing saved)"} in {self.workdir}')
        window_steps += 1
        if done % t.log_every == 0 or done == t.steps:
          elapsed = time.perf_counter() - window_start
          tps = window_steps * tokens_per_step / elapsed
          measured = metrics_lib.device_peak_memory()
          writer.write(done, {**values, 'tokens_per_sec': tps, 'mfu': tps * flops_per_token / peak,
                              'step_time_s': elapsed / window_steps,
                              **({'peak_memory_bytes': measured} if measured else {})})
          result.update(loss=float(values['loss']), tokens_per_sec=tps)
          window_start, window_steps = time.perf_counter(), 0

      def pause_clock(fn):
        nonlocal window_start
        paused = time.perf_counter()
        out = fn()
        window_start += time.perf_counter() - paused
        return out

      batch = first_batch
      for step in range(start, t.steps):
        state, step_metrics = train_step(state, batch)
        done = step + 1
        drain()   # the previous step's metrics, while this step runs
        pending = (done, step_metrics)
        if done < t.steps:   # prepare the next batch while the device works
          batch = setup.global_batch(setup.dataset.train_batch(done, setup.rows))
        writer.advance()
        stop = self._stop_agreed(done) or done == t.stop_at
        is_eval = done % t.eval_every == 0 or done == t.steps
        is_save = done % config.checkpoint.every == 0 or done == t.steps or stop
        if is_eval or is_save:
          drain()   # never evaluate or save a state whose loss was not checked
        if is_eval:
          ev = pause_clock(lambda: setup.evaluate(eval_step, state['params'], state['model_state'], 'valid',
                                                  t.eval_batches))
          writer.write(done, {f'eval_{k}': v for k, v in ev.items()})
          result.update({f'eval_{k}': v for k, v in ev.items()})
        if is_save:
          pause_clock(lambda: ckpt.save(done, state, {'wandb_run_id': run_id, 'step': done}))
        if stop:
          ckpt.wait()
          writer.note(f'stopped early: saved a checkpoint at step {done}; rerun the same command to resume')
          result['stopped_at'] = done
          break
      result['step'] = int(jax.device_get(state['step']))
      result['tokens_per_step'] = tokens_per_step
      return result
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()

"""The training loop. It knows no architecture: a model is whatever `models.build` returns, fed
`model.inputs(batch)` of the batch its format builds; its objective is its own weighted NLL
(`model.score`) plus the `loss/...` terms it reports in `aux`. The state's layout is `train.setup`'s.
"""

from __future__ import annotations

import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import checkpoint, config as config_lib, metrics as metrics_lib, paths, restore, setup as setup_lib, sharding


class Trainer:
  """Runs (or resumes) training in `workdir` for `config.train.steps` steps."""

  def __init__(self, config, workdir: str, *, setup: setup_lib.Setup | None = None):
    self.setup = setup or setup_lib.Setup(config, workdir)
    self.config, self.workdir = config, workdir
    self.stop_requested = threading.Event()

  def make_train_step(self):
    """The unjitted train step: (state, batch) -> (state, metrics)."""
    model, optimizer, schedule = self.setup.model, self.setup.optimizer, self.setup.schedule
    vocab_limit = self.setup.vocab_limit
    accum = self.config.train.grad_accum

    def micro_objective(params, model_state, micro, key, total_weight):
      mutable = list(model_state)
      with sharding.activation_rules(self.setup.mesh):
        out = model.apply({'params': params, **model_state}, **model.inputs(micro), train=True,
                          rngs=model.stream_keys(key), mutable=mutable or False)
      (logits, aux), new_model_state = out if mutable else (out, {})
      nll = model.score(logits, micro, vocab_limit).nll.sum()
      aux_loss = sum((v for k, v in aux.items() if k.startswith('loss/')), jnp.zeros(()))
      return nll / total_weight + aux_loss / accum, (nll, aux, dict(new_model_state))

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def train_step(state, batch):
      key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
      total_weight = jnp.maximum(batch['weights'].sum(), 1.0)

      def body(carry, xs):
        grads, model_state = carry
        micro, i = xs
        (_, (nll, aux, model_state)), g = grad_fn(state['params'], model_state, micro, jax.random.fold_in(key, i),
                                                  total_weight)
        return (jax.tree.map(jnp.add, grads, g), model_state), (nll, aux)

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      (grads, model_state), (nll, aux) = jax.lax.scan(body, (zeros, state['model_state']),
                                                      (setup_lib.micro_batches(batch, accum), jnp.arange(accum)))
      updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
      new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                   'opt_state': opt_state, 'rng': state['rng'], 'model_state': model_state}
      step_metrics = {'loss': nll.sum() / total_weight, 'grad_norm': optax.tree.norm(grads),
                      'lr': schedule(state['step']), **{k: v.mean() for k, v in aux.items()}}
      return new_state, step_metrics

    return train_step

  def trace_train_step(self, state, batch) -> jax.stages.Traced:
    """The sharded train step traced for the shapes of `state` and `batch` (arrays, or abstract ones:
    `train.aot`, which also reads its jaxpr); lowered and compiled, it donates the state it is given."""
    setup = self.setup
    return jax.jit(self.make_train_step(), in_shardings=(setup.state_shardings, sharding.batch_sharding(setup.mesh)),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=0).trace(state, batch)

  def compile_train_step(self, state, batch):
    return self.trace_train_step(state, batch).lower().compile()

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

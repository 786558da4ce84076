"""python -m train.grow --from DIR --to NEWDIR --add_tokens M [--key_init zeros|random] [--[no]pin_tau]
                       [--optimizer reset|pad]

Progressive scaling (TokenFormer, paper §3.3): append M parameter tokens to every attention Pattention
(4M to the feed-forward) of the latest checkpoint in DIR, and write NEWDIR with the grown config and a
step-0 checkpoint. Then

    python -m train --workdir NEWDIR --config.train.steps=N

trains on with a fresh learning-rate schedule, reading the training data from where DIR stopped
(`data.train_offset`), under a new W&B run. Both of the paper's recipes start a fresh optimizer, as the
official loaders do (they load parameters only):
  default                      zero new keys, τ pinned at √n of the trained model: the grown model computes
                               exactly the old function (App. B; the paper's zero-init growth study)
  --key_init random --nopin_tau  the new tokens at the grown model's random init and τ = √n of the new n:
                               the paper's main scaling runs (not function-preserving)
`--optimizer pad` (no paper recipe) instead keeps the trained tokens' Adam moments and step count and
starts the new tokens' moments at zero. Parameters stay sharded by their logical axes throughout; the mesh
is the source config's, resolved on the devices at hand.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import flags

import models
from train import checkpoint, config as config_lib, distributed, metrics, paths, restore, setup as setup_lib


def _define(fv):
  flags.DEFINE_string('from', None, 'the trained run to grow', flag_values=fv)
  flags.DEFINE_string('to', None, 'the new run directory (must not hold checkpoints yet)', flag_values=fv)
  flags.DEFINE_integer('add_tokens', None, 'parameter tokens added to each attention Pattention', flag_values=fv)
  flags.DEFINE_enum('key_init', 'zeros', ['zeros', 'random'], 'keys of the new tokens: zero (with a pinned tau '
                    'the function is kept) or the fresh random init (the paper\'s main runs)', flag_values=fv)
  flags.DEFINE_bool('pin_tau', True, 'keep tau at sqrt(n) of the trained model (--nopin_tau: sqrt(new n), as the '
                    'paper\'s main runs)', flag_values=fv)
  flags.DEFINE_enum('optimizer', 'reset', ['reset', 'pad'], 'start the optimizer afresh (the official loaders), '
                    'or keep the trained moments and step count, zero for the new tokens', flag_values=fv)


def grow_run(source: str, target: str, add_tokens: int, *, key_init: str = 'zeros', pin_tau: bool = True,
             optimizer: str = 'reset') -> dict:
  """Write the grown run into `target`; return a summary (steps and parameter counts). The defaults are the
  paper's function-preserving recipe (module docstring)."""
  config = config_lib.load_workdir_config(source)
  model_cls = models.model_class(config.model.name)
  if not model_cls.grows_by_tokens:
    raise config_lib.ConfigError(f'model {config.model.name!r} cannot grow by parameter tokens')
  if add_tokens <= 0:
    raise config_lib.ConfigError(f'--add_tokens={add_tokens} must be positive')
  if optimizer not in ('reset', 'pad'):
    raise config_lib.ConfigError(f'--optimizer={optimizer} must be reset or pad')
  target_checkpoints = checkpoint.Checkpointer(target, keep=config.checkpoint.keep, async_save=False)
  if target_checkpoints.latest_step() is not None:
    raise config_lib.ConfigError(f'{target} already holds checkpoints; grow into a new directory')

  old_setup, old_state = restore.load_run(config, source)
  source_step = int(jax.device_get(old_state['step']))
  grown = ml_collections.ConfigDict(config.to_dict())
  grown.model = model_cls.grown_config(config.model, add_tokens, pin_tau)
  grown.data.train_offset = config.data.get('train_offset', 0) + source_step * config.train.batch_size
  tokenizer_dir = paths.workdir_path(source, 'tokenizer')
  for file in tokenizer_dir.iterdir():   # the same vocabulary, never retrained
    destination = paths.workdir_path(target, 'tokenizer', file.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(file.read_bytes())
  new_setup = setup_lib.Setup(grown, target)

  def grow(old, fresh):
    if optimizer == 'reset':
      opt_state = fresh['opt_state']
    else:   # old moments in the prefix, zeros for the new tokens; Adam's step count carries on
      opt_state = jax.tree.map(
          lambda o, f: o if o.shape == f.shape else jnp.zeros_like(f).at[tuple(map(slice, o.shape))].set(o),
          old['opt_state'], fresh['opt_state'])
      restart = lambda s: optax.ScaleByScheduleState(jnp.zeros_like(s.count))   # the schedule starts again
      opt_state = jax.tree.map(lambda s: restart(s) if isinstance(s, optax.ScaleByScheduleState) else s,
                               opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
    return {'step': jnp.zeros((), jnp.int32),
            'params': model_cls.grown_params(old['params'], fresh['params'], key_init),
            'opt_state': opt_state, 'rng': old['rng'], 'model_state': old['model_state']}

  state = jax.jit(grow, out_shardings=new_setup.state_shardings)(old_state, new_setup.init_state())
  if jax.process_index() == 0:
    paths.workdir_path(target, 'config.json').write_text(grown.to_json(indent=2))
  target_checkpoints.save(0, state, {'wandb_run_id': metrics.new_wandb_run_id(), 'step': 0,
                                     'grown_from': source, 'source_step': source_step})
  target_checkpoints.wait()
  target_checkpoints.close()
  return {'source_step': source_step, 'params_before': old_setup.param_counts['params'],
          'params_after': new_setup.param_counts['params'], 'n_attn': grown.model.n_attn,
          'n_ffn': grown.model.n_ffn, 'train_offset': grown.data.train_offset}


@config_lib.cli
def main(argv):
  fv = flags.FlagValues()
  _define(fv)
  try:
    fv(argv)
  except flags.Error as e:
    raise config_lib.ConfigError(str(e).splitlines()[0]) from None
  for name in ('from', 'to', 'add_tokens'):
    if fv[name].value is None:
      raise config_lib.ConfigError(f'--{name} is required')
  distributed.maybe_initialize()
  result = grow_run(fv['from'].value, fv.to, fv.add_tokens, key_init=fv.key_init, pin_tau=fv.pin_tau,
                    optimizer=fv.optimizer)
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  main()

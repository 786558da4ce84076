"""Loading a trained run for evaluation and sampling."""

from __future__ import annotations

import jax
from flax import traverse_util

from train import checkpoint, config as config_lib, setup as setup_lib


def load_run(config, workdir: str):
  """(setup, state) of the latest checkpoint in `workdir`, sharded on the current mesh."""
  setup = setup_lib.Setup(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise config_lib.ConfigError(f'no checkpoint in {workdir}/checkpoints')
    state, _ = ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()
  return setup, state


def params_from_run(source: str, params) -> tuple[dict, list[str]]:
  """`params` with each leaf that the latest checkpoint of the run in `source` holds at the same path and
  shape replaced by the trained one (continued training, e.g. MrT5 from ByT5); also the names of the
  leaves left as initialised (new modules such as the delete gate)."""
  _, state = load_run(config_lib.load_workdir_config(source), source)
  trained = traverse_util.flatten_dict(state['params'], sep='/')
  merged, fresh = {}, []
  for name, leaf in traverse_util.flatten_dict(params, sep='/').items():
    if name in trained and trained[name].shape == leaf.shape:
      merged[name] = jax.device_put(trained[name].astype(leaf.dtype), leaf.sharding)
    else:
      merged[name], fresh = leaf, fresh + [name]
  return traverse_util.unflatten_dict(merged, sep='/'), fresh

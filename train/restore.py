"""Loading a trained run for evaluation and sampling."""

from __future__ import annotations

from train import checkpoint, config as config_lib, trainer


def load_run(config, workdir: str):
  """(setup, state) of the latest checkpoint in `workdir`, sharded on the current mesh."""
  setup = trainer.Setup(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise config_lib.ConfigError(f'no checkpoint in {workdir}/checkpoints')
    state, _ = ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()
  return setup, state

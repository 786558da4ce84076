"""Orbax checkpoints of the whole training state.

A checkpoint holds two items: `state` (params, optimizer state, step, RNG; sharded arrays) and `meta`
(JSON: the W&B run id and the data position). Orbax writes each step into a temporary directory and
renames it only once complete, so a save killed half-way is never listed and never restored.
"""

from __future__ import annotations

import orbax.checkpoint as ocp

from train import paths


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    directory = paths.workdir_path(workdir, 'checkpoints')   # absolute (orbax needs it) or a bucket URL
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state):
    """Restore onto the shardings given by `abstract_state` (jax.ShapeDtypeStruct leaves with .sharding)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

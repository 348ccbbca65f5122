"""Orbax checkpoints of a run's state pytree (rotating, resumable)."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a state pytree under `<workdir>/checkpoints`.

  Orbax writes each step into a temporary directory and renames it when complete, so an
  interrupted save never becomes the latest checkpoint. Restoring falls back to an older step
  when the newest one cannot be read.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, step: int, state: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, template: Any) -> Any | None:
    """The newest readable checkpoint shaped like `template`, or None if there is none."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as error:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d is unreadable (%s); trying an older one.', step,
                        error)
    return None

  def close(self) -> None:
    self._manager.close()

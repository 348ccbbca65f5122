"""Orbax checkpoints of a run's state pytree (rotating, resumable)."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a state pytree under `<workdir>/checkpoints`.

  Orbax writes each step into a temporary directory and renames it when complete, so an
  interrupted save never becomes the latest checkpoint. Restoring falls back to an older step
  when the newest one cannot be read (a torn or damaged file); the unreadable step directory is
  renamed `<step>.unreadable` so the resumed run can write that step again.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      self._directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        # a killed save's temporary directory
        cleanup_tmp_directories=True,
      ),
    )

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
        first_line = str(error).strip().split('\n')[0][:300]
        aside = os.path.join(self._directory, f'{step}.unreadable')
        logging.warning(
          'Checkpoint at step %d is unreadable (%s); moved it to %s and trying an older one.',
          step,
          first_line,
          aside,
        )
        self._manager.close()
        shutil.rmtree(aside, ignore_errors=True)  # left by an earlier fallback
        os.replace(os.path.join(self._directory, str(step)), aside)
        # A failed restore leaves Orbax's manager unable to read other steps: start afresh.
        self._manager = self._new_manager()
    return None

  def close(self) -> None:
    self._manager.close()

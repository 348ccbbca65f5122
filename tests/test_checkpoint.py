"""Checkpointer: rotation and the fallback past a damaged newest checkpoint."""

import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import checkpoint


def _state(step):
  return {'images': jnp.full((3, 2), float(step)), 'step': jnp.asarray(step, jnp.int32)}


def _damage(step_dir, how):
  files = [f for f in glob.glob(os.path.join(step_dir, '**'), recursive=True) if os.path.isfile(f)]
  assert files
  for path in files:
    if how == 'truncated':  # a torn write: the array chunks lose their bytes
      if f'{os.sep}d{os.sep}' in path:
        open(path, 'wb').close()
    elif how == 'garbage':
      with open(path, 'wb') as f:
        f.write(b'\x00 not a checkpoint')
  if how == 'emptied':
    for path in files:
      os.remove(path)


@pytest.mark.parametrize('how', ['truncated', 'garbage', 'emptied'])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, how):
  directory = str(tmp_path / 'checkpoints')
  writer = checkpoint.Checkpointer(directory)
  for step in (2, 4):
    writer.save(step, _state(step))
  writer.close()
  _damage(os.path.join(directory, '4'), how)

  reader = checkpoint.Checkpointer(directory)
  restored = reader.restore_latest(_state(0))
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['images'], np.full((3, 2), 2.0))
  assert 'Checkpoint at step 4 is unreadable' in caplog.text
  assert os.path.isdir(os.path.join(directory, '4.unreadable'))
  # The resumed run writes step 4 again (and on), and a later restore finds the newest.
  reader.save(4, _state(4))
  reader.save(6, _state(6))
  reader.close()
  assert int(checkpoint.Checkpointer(directory).restore_latest(_state(0))['step']) == 6


def test_no_checkpoint_restores_none(tmp_path):
  assert checkpoint.Checkpointer(str(tmp_path / 'c')).restore_latest(_state(0)) is None

"""Atomic files of a workdir and the clean-up after a killed write."""

import os

import numpy as np
import pytest

from dd_jax import config as config_lib
from dd_jax import workdir as workdir_lib


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path):
  path = tmp_path / 'results.json'
  workdir_lib.write_json(str(path), {'accuracy': 1})
  with pytest.raises(RuntimeError):
    with workdir_lib.atomic_write(str(path), 'w') as f:
      f.write('{"accuracy": ')  # half a file...
      raise RuntimeError('killed mid-write')
  assert workdir_lib.read_json(str(path)) == {'accuracy': 1}
  assert os.listdir(tmp_path) == ['results.json']  # no temporary left behind
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
  (tmp_path / 'images').mkdir()
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  stale = [tmp_path / '.synthetic.npz.k3j_x9ab.tmp', tmp_path / 'images' / '.step_000004.png.a.tmp']
  kept = [
    tmp_path / 'synthetic.npz',
    tmp_path / 'images' / 'step_000004.png',
    tmp_path / 'notes.tmp',
    tmp_path / 'checkpoints' / '4' / '.orbax.tmp',
  ]
  for path in stale + kept:
    path.write_bytes(b'x')
  removed = workdir_lib.remove_stale_temporaries(str(tmp_path))
  assert sorted(removed) == sorted(map(str, stale))
  assert all(path.exists() for path in kept)
  assert not any(path.exists() for path in stale)


def test_metrics_append_and_truncate_round_trip(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  for step in (2, 4, 6):
    workdir_lib.append_metrics(path, {'step': step, 'loss': float(np.float32(step / 3))})
  records = workdir_lib.read_metrics(path)
  assert [r['step'] for r in records] == [2, 4, 6]
  workdir_lib.write_metrics(path, [r for r in records if r['step'] <= 4])
  assert [r['step'] for r in workdir_lib.read_metrics(path)] == [2, 4]


def test_snapshot_accepts_fields_added_later_and_refuses_changed_ones(tmp_path, caplog):
  config = config_lib.default_config()
  workdir_lib.snapshot_config(str(tmp_path), config)
  # Simulate a snapshot written before the `idm` section existed.
  snapshot = workdir_lib.read_json(str(tmp_path / 'config.json'))
  del snapshot['idm']
  workdir_lib.write_json(str(tmp_path / 'config.json'), snapshot)
  workdir_lib.snapshot_config(str(tmp_path), config)  # accepted, with a warning
  assert 'predates fields idm.' in caplog.text
  config.ipc = 3
  with pytest.raises(ValueError, match=r'different config:\n  ipc: 10 -> 3'):
    workdir_lib.snapshot_config(str(tmp_path), config)

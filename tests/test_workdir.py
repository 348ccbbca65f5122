"""Atomic files of a workdir and the clean-up after a killed write."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dd_jax import config as config_lib
from dd_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


_HOLDER = """
import sys, time
from dd_jax import workdir
with workdir.lock(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
"""


def _hold(directory):
  """A second process holding `directory`'s lock (returned once it holds it)."""
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
  )
  assert holder.stdout.readline().strip() == 'held'
  return holder


def test_a_busy_workdir_is_refused_and_a_killed_holders_lock_is_not(tmp_path):
  holder = _hold(tmp_path)
  try:
    host = socket.gethostname()
    with pytest.raises(
      workdir_lib.WorkdirBusyError, match=rf'in use by process {holder.pid} on {host}'
    ):
      with workdir_lib.lock(str(tmp_path)):
        pass
  finally:
    holder.kill()  # SIGKILL: no clean-up runs in the holder
    holder.wait()
  with workdir_lib.lock(str(tmp_path)):  # the kernel released it with the process
    with workdir_lib.lock(str(tmp_path)):  # re-entrant in the holding process
      pass
    assert str(os.getpid()) in (tmp_path / '.lock').read_text()


def test_a_second_run_on_a_busy_workdir_is_one_line_and_leaves_it_unharmed(tmp_path):
  """The command line, while another process runs in the workdir: exit 2 in seconds, one line
  naming the holder, and the workdir's files (a temporary of the running process included) kept."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  in_flight = workdir / '.synthetic.npz.abc123.tmp'  # what the running process is writing
  in_flight.write_text('partial')
  holder = _hold(workdir)
  try:
    started = time.perf_counter()
    result = subprocess.run(
      [sys.executable, '-m', 'dd_jax.main', '--config=configs/digits.py', f'--workdir={workdir}'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )
    seconds = time.perf_counter() - started
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2, result.stderr[-2000:]
  message, *hint = result.stderr.strip().splitlines()  # the refusal, then where --traceback is
  assert message.startswith('dd_jax: error: --workdir=') and len(hint) <= 1, result.stderr
  assert f'in use by process {holder.pid} on {socket.gethostname()}' in message
  assert seconds < 60
  assert in_flight.read_text() == 'partial'
  assert sorted(os.listdir(workdir)) == ['.lock', in_flight.name]

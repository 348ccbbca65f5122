"""Files of a run's workdir, each written atomically (temporary file + rename).

<workdir>/config.json       the resolved config; a rerun with a different config is refused
<workdir>/checkpoints/      Orbax (see dd_jax.checkpoint)
<workdir>/metrics.jsonl     one JSON object per logged step / evaluation
<workdir>/images/step_NNNNNN.png
<workdir>/synthetic.npz     final export: pixel-space images, labels, class names, mean/std
<workdir>/results.json      final evaluation summary
<workdir>/.lock             held by the process running in the workdir (`lock`)
<workdir>/stopped.json      a run stopped by a guard (`mark_stopped`); moved aside with its files
                            to <workdir>/stopped_runs/<n>/ by a run of another config
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

# Temporary files of atomic_write are '.<name>.<random>.tmp' beside their target.
_TEMPORARY_SUFFIX = '.tmp'


def is_primary() -> bool:
  """Whether this process writes the run's files: process 0 of a multi-process run (and the
  only process otherwise). The others compute the same values and discard their writes."""
  return jax.process_index() == 0


class TensorBoardLog:
  """A run's scalars as TensorBoard event files in <workdir>/tensorboard, beside metrics.jsonl.

  Written by process 0 only, synchronously (tensorboardX's SummaryWriter queues events for a
  thread, so a kill would lose the last ones). A resumed run purges the events after the step it
  resumes from, as metrics.jsonl drops its lines (`tensorboard --logdir <workdir>` then shows one
  clean curve). An event file is an append-only log: a kill can cut its last record, which
  readers skip.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self._directory = os.path.join(workdir, 'tensorboard')
    self._purge_step = None if resume_step is None else resume_step + 1
    self._writer = None  # opened at the first scalar: a finished run's rerun writes no file

  def scalars(self, step: int, values: dict[str, float], prefix: str = '') -> None:
    """Logs `{prefix}{name}` = value at `step` for every item, and flushes to disk."""
    if not is_primary():
      return
    # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2, summary_pb2

    if self._writer is None:
      os.makedirs(self._directory, exist_ok=True)
      # The name holds whole seconds only; the suffix keeps two segments of a run apart.
      self._writer = EventsWriter(
        os.path.join(self._directory, 'events'), filename_suffix=f'.{time.time_ns()}'
      )
      if self._purge_step is not None:
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.write_event(
          event_pb2.Event(wall_time=time.time(), step=self._purge_step, session_log=start)
        )
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(tag=f'{prefix}{name}', simple_value=float(value))
        for name, value in values.items()
      ]
    )
    self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', *, every_process: bool = False) -> Iterator[Any]:
  """Opens a temporary file beside `path`; renames it over `path` only if the block succeeds.

  A process killed inside the block leaves `path` as it was, plus a hidden temporary file that
  `remove_stale_temporaries` deletes. Outside the primary process (see `is_primary`) the block
  writes to memory and nothing is stored, unless `every_process` (host-local files, e.g. caches).
  """
  if not (every_process or is_primary()):
    yield io.StringIO() if 'b' not in mode else io.BytesIO()
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(
    dir=directory, prefix='.' + os.path.basename(path) + '.', suffix=_TEMPORARY_SUFFIX
  )
  try:
    os.chmod(temporary, 0o644)  # mkstemp makes it owner-only
    with os.fdopen(handle, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def remove_stale_temporaries(workdir: str) -> list[str]:
  """Deletes the temporary files that killed `atomic_write`s left under `workdir`.

  Orbax's checkpoint directories are left to Orbax. Only call this while no other run writes to
  `workdir`; in a multi-process run only the primary process deletes.

  Returns:
    The deleted paths.
  """
  removed = []
  if not is_primary():  # its writes may be in flight
    return removed
  for root, directories, files in os.walk(workdir):
    directories[:] = [d for d in directories if d != 'checkpoints']
    for name in files:
      if name.startswith('.') and name.endswith(_TEMPORARY_SUFFIX):
        removed.append(os.path.join(root, name))
        os.remove(removed[-1])
  return removed


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves a file can be written there (permissions alone do
  not tell: root ignores them, a read-only mount does not).

  Raises:
    ValueError: naming the workdir (or the file in its way) and the operating system's reason.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(
      f'--workdir={workdir} is a file, not a directory; choose another --workdir (or move the '
      'file away).'
    )
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_probe.'):
      pass
  except NotADirectoryError as error:
    files = [p for p in _ancestors(os.path.abspath(workdir)) if os.path.isfile(p)]
    blocking = files[0] if files else workdir
    raise ValueError(
      f'--workdir={workdir} cannot be created: {blocking} is a file, not a directory; choose '
      'another --workdir.'
    ) from error
  except OSError as error:
    raise ValueError(
      f'--workdir={workdir} is not writable ({error.strerror or error}); choose '
      'another directory or fix its permissions.'
    ) from error


def _ancestors(path: str) -> list[str]:
  """'/a/b/c' -> ['/a', '/a/b', '/a/b/c']."""
  parents = [path]
  while os.path.dirname(parents[-1]) != parents[-1]:
    parents.append(os.path.dirname(parents[-1]))
  return parents[::-1][1:]


class WorkdirBusyError(ValueError):
  """Another process is running in the workdir."""


_LOCK_FILE = '.lock'
# This process's held workdir locks: path -> [open lock file, depth]. Re-entrant, so a comparison
# holding its workdir can run its main run there.
_held_locks: dict[str, list] = {}


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/.lock` for the block: one process runs in a workdir at a time.

  An OS-level lock (`flock`) that the kernel releases when its process exits however it exits,
  so a killed run never leaves it held; the file names the holder (pid, host, start) for the
  refusal's message. Only process 0 of a multi-process run takes it (the others write nothing).

  Raises:
    WorkdirBusyError: another process holds it, naming that process and the fix.
  """
  path = os.path.join(os.path.abspath(workdir), _LOCK_FILE)
  if not is_primary():
    yield
    return
  if path in _held_locks:  # this process holds it already
    _held_locks[path][1] += 1
    try:
      yield
    finally:
      _held_locks[path][1] -= 1
    return
  handle = open(path, 'a+')  # noqa: SIM115  (held open for the block)
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or 'another process'
    handle.close()
    raise WorkdirBusyError(
      f'--workdir={workdir} is in use by {holder}; wait for that run to finish (rerunning the '
      'same command then resumes or reuses it), or choose another --workdir.'
    ) from None
  started = datetime.datetime.now().isoformat(timespec='seconds')
  handle.seek(0)
  handle.truncate()
  handle.write(f'process {os.getpid()} on {socket.gethostname()} (since {started})\n')
  handle.flush()
  _held_locks[path] = [handle, 1]
  try:
    yield
  finally:
    _held_locks[path][1] -= 1
    if _held_locks[path][1] == 0:
      del _held_locks[path]
      fcntl.flock(handle, fcntl.LOCK_UN)
      handle.close()


class DiskFullError(OSError):
  """A write of the run failed for want of disk space (errno ENOSPC; the message is one line)."""

  def __init__(self, message: str):
    super().__init__(message)
    self.errno = errno.ENOSPC


@contextlib.contextmanager
def disk_full_stops(workdir: str) -> Iterator[None]:
  """Turns a failed write for want of space (ENOSPC, however wrapped) into one DiskFullError
  naming the file, the workdir and the fix. Every file is written whole or not at all (atomic
  writes; Orbax's temporary checkpoint directories are removed by the next run), so a rerun after
  freeing space resumes from the last checkpoint."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except  (re-raised unless ENOSPC)
    where = _no_space_path(error)
    if where is None:
      raise
    raise DiskFullError(
      f'the disk of --workdir={workdir} is full (no space left{where}); free some space or '
      'move the workdir to a larger disk, then rerun the same command: it resumes from the last '
      'checkpoint.'
    ) from error


def _no_space_path(error: BaseException) -> str | None:
  """' writing <path>' (or '') when `error` or its causes say the disk is full, else None.

  Python reports ENOSPC as an OSError; TensorStore (Orbax's array writer) as a ValueError whose
  text holds the path and 'No space left on device'.
  """
  while error is not None:
    if getattr(error, 'errno', None) == errno.ENOSPC:
      filename = getattr(error, 'filename', None)
      return f' writing {filename}' if filename else ''
    text = str(error)
    if os.strerror(errno.ENOSPC) in text:
      written = re.search(r'writing:? "([^"]+)"', text)
      return f' writing {written.group(1)}' if written else ''
    error = error.__cause__ or error.__context__
  return None


def format_duration(seconds: float) -> str:
  """'1h05m' or '3m07s', for progress lines."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


def write_json(path: str, value: Any) -> None:
  with atomic_write(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_metrics(path: str, records: list[dict[str, Any]]) -> None:
  """Writes JSON lines atomically."""
  with atomic_write(path, 'w') as f:
    f.writelines(json.dumps(record, sort_keys=True) + '\n' for record in records)


def append_metrics(path: str, record: dict[str, Any]) -> None:
  """Appends one JSON line (rewriting the file atomically, so a crash never leaves half a line)."""
  write_metrics(path, read_metrics(path) + [record])


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _flatten(config: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Human-readable 'field: old -> new' lines for two config dicts."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  missing = object()
  return [
    f'{key}: {old_flat.get(key, missing)!r} -> {new_flat.get(key, missing)!r}'.replace(
      repr(missing), '<absent>'
    )
    for key in sorted(set(old_flat) | set(new_flat))
    if old_flat.get(key, missing) != new_flat.get(key, missing)
  ]


# Fields that do not change what a run computes: the baselines tabulated around it.
IGNORED_ON_RESUME = ('compare.',)


def snapshot_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, or checks (`check_config`) that an existing one is the same run."""
  if not check_config(workdir, config):
    write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))


def check_config(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Checks that `workdir` holds no run of another config; writes nothing.

  Differences in IGNORED_ON_RESUME fields are accepted (the snapshot keeps the first values), and
  so are fields the snapshot lacks (added to dd_jax after the run started; a warning lists them):
  the run so far was computed without them.

  Returns:
    Whether `workdir` holds a config.json (of this run).

  Raises:
    ValueError: the workdir holds a run of a different config (listing the differing fields and
      naming the directory to delete or the flag to change).
  """
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    differences = [
      line
      for line in config_differences(previous, current)
      if not line.startswith(IGNORED_ON_RESUME)
    ]
    added = [line for line in differences if ': <absent> -> ' in line]
    if added:
      logging.warning(
        '%s/config.json predates fields %s; resuming with their current values.',
        workdir,
        ', '.join(line.split(':')[0] for line in added),
      )
    differences = [line for line in differences if line not in added]
    if differences:
      raise ValueError(
        f'{workdir} holds a run of a different config:\n  '
        + '\n  '.join(differences)
        + f'\nUse a new --workdir, or delete {workdir} (everything in it) to start over.'
      )
    return True
  return False


_STOPPED_FILE = 'stopped.json'
# A run's own files (the module docstring lists them).
RUN_FILES = (
  'config.json',
  'checkpoints',
  'metrics.jsonl',
  'tensorboard',
  'images',
  'synthetic.npz',
  'results.json',
)
_STOPPED_RUNS = 'stopped_runs'


def mark_stopped(workdir: str, reason: str) -> None:
  """Records that the run in `workdir` was stopped by a guard (divergence, non-finite values):
  rerunning its config would stop the same way (runs are deterministic)."""
  write_json(os.path.join(workdir, _STOPPED_FILE), {'reason': reason})


def set_aside_stopped_run(workdir: str, config: ml_collections.ConfigDict) -> str | None:
  """Moves a guard-stopped run out of the way of a run with another config.

  A stopped run's files (config.json, checkpoints, metrics, images, ...) move to
  `<workdir>/stopped_runs/<n>/`, so the new config starts afresh in the same workdir and nothing
  is deleted.

  Returns:
    The directory the stopped run moved to, or None (no stopped run in `workdir`).

  Raises:
    ValueError: `workdir` holds a stopped run of this very config, naming its step, its reason
      and the fix (a changed config).
  """
  stopped_path = os.path.join(workdir, _STOPPED_FILE)
  if not os.path.exists(stopped_path):
    return None
  stopped = read_json(stopped_path)
  previous = read_json(os.path.join(workdir, 'config.json'))
  differences = [
    line
    for line in config_differences(previous, json.loads(config.to_json()))
    if not line.startswith(IGNORED_ON_RESUME)
  ]
  if not differences:
    raise ValueError(
      f'{workdir} holds a run of this config that was stopped ({stopped["reason"]}); the same '
      'config stops the same way. Change '
      'it (e.g. a lower distill.lr) and rerun: this workdir then sets the stopped run aside.'
    )
  aside_root = os.path.join(workdir, _STOPPED_RUNS)
  os.makedirs(aside_root, exist_ok=True)
  aside = os.path.join(aside_root, str(len(os.listdir(aside_root)) + 1))
  os.makedirs(aside)
  for name in RUN_FILES:  # not a comparison's other runs and baselines, which stay valid
    if os.path.exists(os.path.join(workdir, name)):
      os.replace(os.path.join(workdir, name), os.path.join(aside, name))
  # Moved last: a crash before this point leaves a workdir that still says it is stopped.
  os.replace(stopped_path, os.path.join(aside, _STOPPED_FILE))
  print(
    f'{workdir} held a stopped run of another config; moved its files to {aside}, starting afresh.',
    flush=True,
  )
  return aside


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """Tiles [N, H, W, C] pixel-space images in [0, 1] into one uint8 image, `rows` rows."""
  n, h, w, c = images.shape
  columns = math.ceil(n / rows)
  pad = 1
  grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
  for index in range(n):
    row, column = divmod(index, columns)
    top, left = pad + row * (h + pad), pad + column * (w + pad)
    grid[top : top + h, left : left + w] = images[index]
  grid = np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)
  return grid[..., 0] if c == 1 else grid


def write_png(path: str, grid: np.ndarray, min_side: int = 256) -> None:
  """Writes a uint8 image, upscaled by an integer factor (nearest) so small images are visible."""
  factor = max(1, math.ceil(min_side / max(grid.shape[:2])))
  image = Image.fromarray(grid).resize(
    (grid.shape[1] * factor, grid.shape[0] * factor), Image.NEAREST
  )
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  with atomic_write(path) as f:
    f.write(buffer.getvalue())


def synthetic_arrays(
  images: np.ndarray,
  labels: np.ndarray,
  class_names: tuple[str, ...],
  mean: tuple[float, ...],
  std: tuple[float, ...],
  stored_images: np.ndarray | None = None,
  normalized_images: np.ndarray | None = None,
  step: int | None = None,
) -> dict[str, np.ndarray]:
  """The arrays of synthetic.npz, loadable without dd_jax (numpy only).

  Keys: 'images' float32 [N, H, W, C] in [0, 1] (de-normalised, clipped), the set to train on;
  'labels' int64 [N]; 'class_names'; 'mean', 'std' float32 [C]; for IDM also 'stored_images'
  (the partitioned images that 'images' expands from); 'normalized_images' float32
  [N, H, W, C], the exact array the run evaluated (not clipped); 'step', the run's iterations.
  PyTorch: `torch.from_numpy(d['images']).permute(0, 3, 1, 2)` then normalise with mean/std.
  """
  arrays = {
    'images': np.asarray(images, np.float32),
    'labels': np.asarray(labels, np.int64),
    'class_names': np.asarray(class_names),
    'mean': np.asarray(mean, np.float32),
    'std': np.asarray(std, np.float32),
  }
  if stored_images is not None:
    arrays['stored_images'] = np.asarray(stored_images, np.float32)
  if normalized_images is not None:
    arrays['normalized_images'] = np.asarray(normalized_images, np.float32)
  if step is not None:
    arrays['step'] = np.asarray(step, np.int64)
  return arrays


def export_synthetic(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `synthetic_arrays(...)` to `path` (synthetic.npz), atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  with atomic_write(path) as f:
    f.write(buffer.getvalue())


def synthetic_problem(path: str, arrays: dict[str, np.ndarray]) -> str | None:
  """What is wrong with the synthetic.npz at `path` given the arrays it should hold, or None.

  Returns:
    'is missing', 'is unreadable (<reason>)' or 'differs from the last checkpoint', or None
    when it holds exactly `arrays`.
  """
  if not os.path.exists(path):
    return 'is missing'
  try:
    with np.load(path) as stored:
      same = set(stored.files) == set(arrays) and all(
        np.array_equal(stored[key], value) for key, value in arrays.items()
      )
  except Exception as error:  # pylint: disable=broad-except  (any damage reads as unreadable)
    return f'is unreadable ({type(error).__name__}: {str(error)[:120]})'
  return None if same else 'differs from the last checkpoint'

"""Command-line entry point: distil (and compare) as a config file says.

  python -m dd_jax.main --config=configs/digits.py --workdir=/tmp/dd_digits
  python -m dd_jax.main --config=configs/paper.py:dataset=cifar10,ipc=10,method=dm_iid \\
      --workdir=... --config.dataset.name=folder:/data/cifar10 --config.constraints.cm.weight=0

The config is locked: a misspelled `--config.x=y` is an error. Every field, with its resolved
value and documentation: `python -m dd_jax.info --config=<the same config and overrides>`.
A refused run (config, data, workdir, a diverging optimiser) prints one message and exits with
status 2 (`--traceback` shows where it was raised). Ctrl-C stops at once (status 130);
rerunning a command resumes its workdir from the last checkpoint. Several hosts: start the same
command in every process with `--distributed` (docs/operations.md).
"""

import os
import select
import signal
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from dd_jax import cli, compare, guards, sharding

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (get_config).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; rerun to resume).')
flags.mark_flags_as_required(['config', 'workdir'])
_TRACEBACK = flags.DEFINE_bool(
  cli.TRACEBACK_FLAG.removeprefix('--'),
  False,
  'Show the traceback of a refused run instead of its one-line message.',
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'Multi-process run (one process per host): jax.distributed.initialize '
  'with the flags below, detected on TPU pods, SLURM and Open MPI when left unset.',
)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')

# What a run refuses with: a config, data or workdir problem (ValueError and its subclasses,
# e.g. dd_jax.data.DataError; OSError, e.g. too little disk) or a diverging optimiser. Anything
# else is a bug: full traceback.
REFUSALS = (ValueError, OSError, FloatingPointError, guards.DivergenceError)
INTERRUPTED = 'Interrupted. Rerun the same command to resume from the last checkpoint.'


def _exit_at_once_on_interrupt() -> None:
  """Ctrl-C ends the process at once, even inside a long XLA compilation or computation.

  Python runs signal handlers only between bytecodes, so a KeyboardInterrupt waits for the
  running XLA call (tens of seconds of compilation) and tearing down mid-compilation can crash.
  Instead the C-level handler wakes a thread through a pipe, which prints how to resume and
  leaves without teardown. Every file dd_jax writes is renamed into place whole, and a run
  resumes from its last checkpoint, so nothing is lost that SIGKILL would not lose too.
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd)
  signal.signal(signal.SIGINT, lambda *_: None)  # the wakeup fd needs a Python-level handler

  def wait_for_interrupt():
    while True:
      select.select([read_fd], [], [])
      if signal.SIGINT in os.read(read_fd, 64):
        print(f'\n{INTERRUPTED}', file=sys.stderr, flush=True)
        os._exit(130)

  threading.Thread(target=wait_for_interrupt, daemon=True, name='interrupt').start()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _exit_at_once_on_interrupt()
  if _DISTRIBUTED.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not any(arg.startswith(('--verbosity', '-v')) for arg in sys.argv[1:]):
    # Orbax logs every checkpoint step at INFO (and its import raises absl's verbosity);
    # progress lines are printed separately. Pass --verbosity=0 to see them.
    logging.set_verbosity(logging.WARNING)
  try:
    compare.run_with_baselines(_CONFIG.value, _WORKDIR.value)
  except REFUSALS as error:
    if _TRACEBACK.value:
      raise
    cli.refuse(f'{error}\n(--traceback shows where it was raised.)')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

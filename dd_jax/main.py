"""Command-line entry point: distil (and compare) as a config file says.

  python -m dd_jax.main --config=configs/digits.py --workdir=/tmp/dd_digits
  python -m dd_jax.main --config=configs/paper.py:dataset=cifar10,ipc=10,method=dm_iid \
      --workdir=... --config.dataset.name=folder:/data/cifar10 --config.constraints.cm.weight=0

The config is locked: a misspelled `--config.x=y` is an error. Rerunning a command resumes its
workdir. Several hosts: start the same command in every process with `--distributed` (README,
"Several devices and hosts").
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dd_jax import compare, sharding

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (get_config).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; rerun to resume).')
flags.mark_flags_as_required(['config', 'workdir'])
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'Multi-process run (one process per host): jax.distributed.initialize '
  'with the flags below, detected on TPU pods, SLURM and Open MPI when left unset.',
)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _DISTRIBUTED.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not any(arg.startswith(('--verbosity', '-v')) for arg in sys.argv[1:]):
    # Orbax logs every checkpoint step at INFO (and its import raises absl's verbosity);
    # progress lines are printed separately. Pass --verbosity=0 to see them.
    logging.set_verbosity(logging.WARNING)
  compare.run_with_baselines(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)

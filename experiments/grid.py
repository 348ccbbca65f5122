"""Runs a grid of configs, one resumable workdir each, results in one JSON-lines file.

  python experiments/grid.py --grid=experiments/grids/cifar10_cpu.txt --root=/tmp/grid \\
      --extra="--config.dataset.name=folder:/data/cifar10"
  python experiments/grid.py --root=/tmp/grid \\
      --run="configs/paper.py:dataset=cifar10,ipc=10,method=dm --config.seed=1"

A grid file has one run per line, written like the main command's flags without --workdir
(`name=<n>` first to choose the workdir name; '#' starts a comment). Every run is validated
before the first starts; rerunning the same command skips finished runs and resumes the rest.
Results: <root>/results.jsonl (name, spec, seconds, and the rows of each run's table).
"""

from absl import app, flags, logging

from dd_jax import grid

_GRID = flags.DEFINE_string('grid', None, 'Grid file: one run per line.')
_RUN = flags.DEFINE_multi_string('run', [], 'A run (repeatable), added after the grid file.')
_ROOT = flags.DEFINE_string('root', None, 'Grid directory.', required=True)
_EXTRA = flags.DEFINE_string(
  'extra', '', 'Overrides appended to every run, e.g. "--config.dataset.name=folder:/data/cifar10".'
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  runs = (grid.read_grid(_GRID.value, extra=_EXTRA.value) if _GRID.value else []) + [
    grid.parse_run(f'{run} {_EXTRA.value}') for run in _RUN.value
  ]
  if not runs:
    raise app.UsageError('Give --grid=<file> and/or --run=<spec>.')
  records = grid.run_grid(runs, _ROOT.value)
  for record in records:
    cells = '; '.join(
      f'{row["label"]} {row["mean"]:.2f} +- {row["std"]:.2f}'
      + (' (validation)' if row.get('split') == 'validation' else '')
      for row in record['rows']
    )
    print(f'{record["name"]}: {cells}')


if __name__ == '__main__':
  app.run(main)

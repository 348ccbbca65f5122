"""Report of one or more grid roots: summary.md and PNG figures (dd_jax.report).

python experiments/report.py --roots=/tmp/c10_cpu_grid --out=experiments/results/c10_cpu_report
"""

from absl import app, flags

from dd_jax import report

_ROOTS = flags.DEFINE_list('roots', None, 'Grid roots (experiments/grid.py --root).', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output folder.', required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  written = report.build_report(_ROOTS.value, _OUT.value)
  print(written['markdown'])
  print(
    '\n'.join(['', f'wrote {written["summary_md"]}'] + [f'wrote {p}' for p in written['figures']])
  )


if __name__ == '__main__':
  app.run(main)

"""Downloads and prepares TFDS datasets in array_record format, for `load_dataset('tfds:<name>')`.

    pip install 'dd_jax[prepare]'        # TensorFlow is needed for preparation only
    python -m dd_jax.data.prepare_tfds cifar10 mnist --data_dir=~/tensorflow_datasets

Reading the prepared data afterwards needs no TensorFlow (`tfds.data_source`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def _tensorflow_available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def prepare(name: str, data_dir: str | None = None) -> None:
  """Downloads one TFDS dataset and converts it to array_record under `data_dir` (None: TFDS's)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  print(f'prepared {name} in {builder.data_dir}')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog='python -m dd_jax.data.prepare_tfds', description=__doc__.split('\n')[0]
  )
  parser.add_argument('names', nargs='+', help='TFDS dataset names, e.g. cifar10 mnist')
  parser.add_argument(
    '--data_dir',
    default=None,
    help='TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)',
  )
  args = parser.parse_args(argv)
  if not _tensorflow_available():
    sys.exit(
      'error: preparing a TFDS dataset needs TensorFlow, which is not installed; run\n'
      "    pip install 'dd_jax[prepare]'\n"
      "or use a folder source instead (dataset.name='folder:<path>')."
    )
  data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
  for name in args.names:
    prepare(name, data_dir)


if __name__ == '__main__':
  main()

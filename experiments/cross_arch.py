"""Cross-architecture evaluation of a saved synthetic set (synthetic.npz of any run).

  python experiments/cross_arch.py --synthetic=/tmp/dd_digits/synthetic.npz \\
      --dataset=digits --architectures=ConvNet,AlexNet,VGG11,ResNet18,MLP,LeNet \\
      --augment_strategy=color_crop_cutout_scale_rotate --out=/tmp/cross_arch.json

Trains --num_eval fresh networks of every architecture on the set with the evaluation protocol
(dd_jax.evaluate, after DatasetCondensation's evaluate_synset: --epochs with the --schedule lr
drop, DSA --augment_strategy) and tests them on the real test split; prints a table of mean +-
std per architecture and the largest drop from ConvNet, and writes the results as JSON.
Architectures that cannot take the image size are listed with the reason.
"""

import jax
import numpy as np
from absl import app, flags, logging

from dd_jax import data as data_lib
from dd_jax import evaluate
from dd_jax import lowering as lowering_lib
from dd_jax import train as train_lib
from dd_jax import workdir as workdir_lib

_SYNTHETIC = flags.DEFINE_string('synthetic', None, 'A synthetic.npz.', required=True)
_DATASET = flags.DEFINE_string(
  'dataset', None, 'Dataset spec of the run (config.dataset.name).', required=True
)
_CACHE_DIR = flags.DEFINE_string('cache_dir', None, 'Folder-source decode cache.')
_ARCHITECTURES = flags.DEFINE_list(
  'architectures',
  ['ConvNet', 'AlexNet', 'VGG11', 'ResNet18'],
  'Registry names (python -m dd_jax.info lists them).',
)
_NUM_EVAL = flags.DEFINE_integer('num_eval', 5, 'Networks per architecture.')
_EPOCHS = flags.DEFINE_integer('epochs', 1000, 'Training epochs (the reference: 1000).')
_SCHEDULE = flags.DEFINE_enum(
  'schedule',
  'reference',
  list(train_lib.SCHEDULES),
  'lr schedule (see train.epoch_plan): reference = epochs + 1 epochs, '
  'lr x0.1 from epoch epochs // 2 + 2.',
)
_STRATEGY = flags.DEFINE_string(
  'augment_strategy',
  'color_crop_cutout_flip_scale_rotate',
  'DSA strategy of evaluation (drop flip for digits).',
)
_SEED = flags.DEFINE_integer('seed', 0, 'PRNG seed of the evaluation.')
_LOWERING = flags.DEFINE_enum(
  'lowering',
  'auto',
  lowering_lib.NAMES,
  "How the networks are computed (dd_jax.lowering; 'auto': the default backend's).",
)
_PRECISION = flags.DEFINE_enum(
  'precision', 'auto', lowering_lib.PRECISIONS, "Matmul precision ('auto': the lowering's)."
)
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON results.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  dataset = data_lib.load_dataset(_DATASET.value, cache_dir=_CACHE_DIR.value)
  with np.load(_SYNTHETIC.value) as saved:
    pixels, labels = saved['images'], saved['labels']
    if saved['images'].shape[1:] != dataset.image_shape:
      raise SystemExit(
        f'--synthetic images are {pixels.shape[1:]} but {dataset.name} images '
        f'are {dataset.image_shape}: wrong --dataset?'
      )
  # synthetic.npz holds pixel values in [0, 1]; the networks take normalised images.
  images = (pixels - np.asarray(dataset.mean, np.float32)) / np.asarray(dataset.std, np.float32)
  settings = evaluate.EvalSettings(
    num_eval=_NUM_EVAL.value,
    epochs=_EPOCHS.value,
    augment_strategy=_STRATEGY.value,
    schedule=_SCHEDULE.value,
  )
  report = evaluate.cross_architecture(
    jax.random.key(_SEED.value),
    images,
    labels,
    dataset.normalize(dataset.test_images),
    dataset.test_labels,
    dataset.num_classes,
    tuple(_ARCHITECTURES.value),
    settings,
    lowering_lib.resolve(_LOWERING.value, _PRECISION.value),
  )
  lines = ['| architecture | test accuracy (%) |', '|---|---|']
  for name, result in report['results'].items():
    cell = (
      f'{result["mean"]:.2f} +- {result["std"]:.2f}'
      if 'mean' in result
      else f'n/a ({result["error"]})'
    )
    lines.append(f'| {name} | {cell} |')
  drop = report['largest_drop']
  lines.append('')
  lines.append(
    'largest drop from ConvNet: '
    + (f'{drop["drop"]:.2f} points ({drop["model"]})' if drop else 'n/a')
  )
  print('\n'.join(lines))
  if _OUT.value:
    workdir_lib.write_json(
      _OUT.value,
      {
        **report,
        'synthetic': _SYNTHETIC.value,
        'dataset': _DATASET.value,
        'epochs': _EPOCHS.value,
        'schedule': _SCHEDULE.value,
        'num_eval': _NUM_EVAL.value,
      },
    )


if __name__ == '__main__':
  app.run(main)

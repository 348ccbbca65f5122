"""The work of `python -m dd_jax.evaluate`: a synthetic-set file under a protocol, resumable.

    result = evaluate_file('syn.npz', config, '/tmp/out', architectures=('ConvNet',))
    result['rows']['synthetic/ConvNet']['eval']['accuracies']

`config` is an experiment config whose `dataset`, `seed` and `eval` sections say what to
evaluate on and how (the command builds it from its flags).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dd_jax import data as data_lib
from dd_jax import keys as keys_lib
from dd_jax import lowering as lowering_lib
from dd_jax import models, protocols, stats
from dd_jax import pool as pool_lib
from dd_jax import run as run_lib
from dd_jax import train as train_lib
from dd_jax import workdir as workdir_lib
from dd_jax.evaluate import EvalSettings, accuracy_cells, accuracy_columns, sets


class RefusedError(ValueError):
  """Bad input, found before any training (one line)."""


def _check(
  config: ml_collections.ConfigDict, architectures: tuple[str, ...], out: str, lowering: str
) -> tuple[EvalSettings, data_lib.DatasetSettings, pool_lib.PoolSettings, lowering_lib.Lowering]:
  try:
    settings = EvalSettings.from_config(config)
    dataset_settings = data_lib.DatasetSettings.from_config(config)
    pool_settings = pool_lib.PoolSettings.from_config(config, dataset_settings)
    for name in architectures:
      EvalSettings(**{**settings.__dict__, 'model': name})
    resolved = lowering_lib.resolve(lowering)
    workdir_lib.check_writable(out)
  except ValueError as error:
    raise RefusedError(str(error)) from None
  if not architectures:
    raise RefusedError('--architectures is empty; name at least one network.')
  return settings, dataset_settings, pool_settings, resolved


def evaluate_file(
  path: str,
  config: ml_collections.ConfigDict,
  out: str,
  *,
  architectures: tuple[str, ...] = ('ConvNet',),
  factor: int | None = None,
  scale: str = 'auto',
  index: int = 0,
  random_real: bool = True,
  lowering: str = 'auto',
  skip_unfit: bool = False,
) -> dict[str, Any]:
  """Evaluates the set in `path` (and a random real subset) under `config.eval`'s protocol.

  Everything is checked (settings, output directory, the file against the dataset, the
  architectures against the image size) before any training. Each finished row is written to
  <out>/evaluation.json at once; a rerun with the same settings skips finished rows.

  Args:
    path: the synthetic-set file (`dd_jax.evaluate.sets`).
    config: experiment config (its dataset, seed and eval sections; its pool section gives the
      soft-label teacher, member 0, when `config.eval.soft_labels`).
    out: the output directory.
    architectures: evaluation networks (registry names).
    factor, scale, index: as `sets.read_set` (factor None: the file's or the protocol's).
    random_real: also evaluate `ipc` random real images per class (the set's storage budget).
    lowering: 'auto', 'cpu' or 'accelerator'.
    skip_unfit: skip the architectures that cannot take the image size (listed in 'skipped'),
      instead of refusing.

  Returns:
    {'settings', 'rows': {'synthetic/<net>' or 'random_real/<net>': {'name', 'eval',
    'seconds'}}, 'skipped': {net: reason}, 'largest_drop': {'model', 'drop'} (mean points below
    the first architecture's, with several) or None, 'table'}.

  Raises:
    RefusedError: bad input, before any training.
  """
  settings, dataset_settings, pool_settings, resolved_lowering = _check(
    config, architectures, out, lowering
  )
  try:
    dataset = data_lib.open_dataset(dataset_settings)
    synthetic = sets.read_set(
      path,
      dataset,
      factor=factor,
      scale=scale,
      protocol_factor=protocols.PROTOCOLS[settings.protocol].factor,
      index=index,
    )
  except ValueError as error:
    raise RefusedError(str(error)) from None
  skipped = {}
  for name in architectures:
    try:
      models.get_network(name, dataset.num_classes).check_input_shape(
        dataset.image_shape, '--architectures'
      )
    except ValueError as error:
      if not skip_unfit:
        raise RefusedError(str(error)) from None
      skipped[name] = str(error)
  architectures = tuple(name for name in architectures if name not in skipped)
  if not architectures:
    raise RefusedError(f'no architecture of --architectures takes the images: {skipped}')
  identity = json.loads(
    json.dumps(
      {
        'synthetic': os.path.abspath(path),
        'dataset': dataset_settings.name,
        'validation_fraction': dataset_settings.validation_fraction,
        'seed': config.seed,
        'factor': synthetic.factor,
        'scale': synthetic.scale,
        'eval': protocols.resolve(config.eval.to_dict()),
        'architectures': list(architectures),
        'random_real': random_real,
        'teacher': pool_settings.directory if settings.soft_labels else None,
      }
    )
  )  # as read back from evaluation.json
  records_path = os.path.join(out, 'evaluation.json')
  saved = workdir_lib.read_json(records_path) if os.path.exists(records_path) else None
  if saved is not None and saved.get('settings') != identity:
    before = saved.get('settings', {})
    differing = sorted(k for k in identity if identity[k] != before.get(k))
    raise RefusedError(
      f'--out={out} holds an evaluation with other settings (differing: '
      f'{", ".join(differing)}); use another --out.'
    )
  rows = dict(saved['rows']) if saved else {}
  print(
    f'{path}: {synthetic.stored} stored images ({synthetic.source}, {synthetic.scale}), '
    f'{len(synthetic.images)} training images after decoding with factor {synthetic.factor}; '
    f'protocol {settings.protocol}.',
    flush=True,
  )
  data = run_lib.PreparedData(
    dataset=dataset, sampler=None, test_images=dataset.normalize(dataset.test_images)
  )
  teacher = None
  if settings.soft_labels:  # config.pool's first member, trained once and cached
    teacher = pool_lib.get_or_train_pool(
      pool_settings, dataset, resolved_lowering, test_images=data.test_images
    )
  jobs = []
  for name in architectures:
    net_settings = EvalSettings(**{**settings.__dict__, 'model': name})
    # A run's final evaluation key, when the file is a run's set (its step).
    key = jax.random.fold_in(keys_lib.run_key(config.seed, 'evaluate'), synthetic.step or 0)
    jobs.append((f'synthetic/{name}', net_settings, synthetic.images, synthetic.labels, key))
    if random_real:  # as dd_jax.compare's baseline
      indices = np.asarray(
        data_lib.random_real_subset(
          keys_lib.run_key(config.seed, 'init'), dataset.train_labels, synthetic.ipc
        )
      )
      jobs.append(
        (
          f'random_real/{name}',
          net_settings,
          dataset.normalize(dataset.train_images[indices]),
          dataset.train_labels[indices],
          keys_lib.run_key(config.seed, 'evaluate'),
        )
      )
  for name, net_settings, images, labels, key in jobs:
    if name in rows:
      print(f'{name}: done before ({stats.format_mean_std(rows[name]["eval"]["accuracies"])}).')
      continue
    start = time.perf_counter()
    evaluation = run_lib.evaluate_images(
      net_settings, resolved_lowering, data, images, labels, key, teacher
    )
    rows[name] = {'name': name, 'eval': evaluation, 'seconds': time.perf_counter() - start}
    workdir_lib.write_json(records_path, {'settings': identity, 'rows': rows})
  drop = largest_drop(rows, architectures)
  table = format_table(rows, settings, synthetic, dataset.held_out, path)
  for name, reason in skipped.items():
    table += f'\n{name}: skipped ({reason})'
  if drop:
    table += f'\nlargest drop from {architectures[0]}: {drop["drop"]:.2f} points ({drop["model"]})'
  print(table, flush=True)
  with workdir_lib.atomic_write(os.path.join(out, 'table.md'), 'w') as f:
    f.write(table + '\n')
  return {
    'settings': identity,
    'rows': rows,
    'skipped': skipped,
    'largest_drop': drop,
    'table': table,
  }


def largest_drop(rows: dict[str, Any], architectures: tuple[str, ...]) -> dict[str, Any] | None:
  """The architecture whose mean accuracy on the synthetic set falls furthest below the first
  one's: {'model', 'drop' (points)}, or None with a single architecture."""
  means = {name: rows[f'synthetic/{name}']['eval']['mean'] for name in architectures}
  reference, *others = architectures
  if not others:
    return None
  worst = max(others, key=lambda name: means[reference] - means[name])
  return {'model': worst, 'drop': means[reference] - means[worst]}


def format_table(
  rows: dict[str, Any], settings: EvalSettings, synthetic: sets.SyntheticSet, split: str, path: str
) -> str:
  """The markdown table of an evaluation: one row per set and architecture, the protocol in the
  heading, the last epoch's accuracy (and the best evaluation point, labelled, if any)."""
  epochs = train_lib.epoch_plan(settings.epochs, settings.schedule)[0]
  header, separator = accuracy_columns(settings, split)
  recipe = settings.recipe
  lines = [
    f'{path} under protocol {settings.protocol} ({epochs} epochs, {recipe.algorithm} lr '
    f'{recipe.lr:g}, batch {recipe.batch_size}, {settings.augment_mode} augmentation, CutMix '
    f'{settings.cutmix_probability:g}, factor {synthetic.factor}'
    f'{", soft labels" if settings.soft_labels else ""}); mean +- sample std over '
    f'{stats.count(settings.num_eval, "network")}:',
    '',
    f'| set | network |{header}',
    f'|---|---|{separator}',
  ]
  for name, row in rows.items():
    kind, network = name.split('/')
    label = (
      f'synthetic ({synthetic.stored} stored, {len(synthetic.images)} decoded)'
      if kind == 'synthetic'
      else f'random real (ipc {synthetic.ipc})'
    )
    lines.append(f'| {label} | {network} |{accuracy_cells(row["eval"], settings)}')
  return '\n'.join(lines)

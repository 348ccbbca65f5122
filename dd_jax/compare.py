"""A run and its baselines, summarised in one table (the main job's output).

    table = run_with_baselines(config, workdir)

Runs the configured distillation in `workdir`, each variant of `config.compare.variants` in
`workdir/compare/<variant>` (e.g. plain DM next to DM + IID), the random-real-subset baseline
and, if asked, networks trained on the full training set; every part is resumable and skipped
when already finished. Prints a markdown table and writes it to `workdir/table.md`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from dd_jax import config as config_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import workdir as workdir_lib
from dd_jax.distill import loop

# Constraint variant -> (constraints.cc.weight on, constraints.cm.weight on). A variant name is
# the config's method plus a suffix: 'dm', 'dm_cc', 'dm_cm', 'dm_iid' for a DM config, 'idm',
# 'idm_cc', ... for an IDM config. Each keeps the configured weight of the terms it uses (or the
# method's reference weight, SPEC 4.4, if the config has it at 0) and zeroes the others.
_SUFFIXES = {'': (0, 0), '_cc': (1, 0), '_cm': (0, 1), '_iid': (1, 1)}
VARIANTS = {method + suffix: flags for method in config_lib.METHODS
            for suffix, flags in _SUFFIXES.items()}


def check_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Raises ValueError unless `variant` is a constraint variant of `config.method`."""
  valid = [config.method + suffix for suffix in _SUFFIXES]
  if variant not in valid:
    raise ValueError(f'config.compare.variants: {variant!r} is not a variant of a '
                     f'method={config.method!r} config; choose from {valid}.')


def method_label(config: ml_collections.ConfigDict) -> str:
  """E.g. 'DM', 'DM + CM', 'IDM + IID', 'DM + IID (CC on pool)' from the method and weights."""
  cc, cm = config.constraints.cc.weight > 0, config.constraints.cm.weight > 0
  label = config.method.upper() + {(False, False): '', (True, False): ' + CC',
                                   (False, True): ' + CM', (True, True): ' + IID'}[(cc, cm)]
  if cc and config.constraints.cc.extractor == 'pool':
    label += f' (CC on pool: {config.pool.size} {config.pool.model} x {config.pool.epochs} ep)'
  return label


def variant_config(config: ml_collections.ConfigDict,
                   variant: str) -> ml_collections.ConfigDict:
  """`config` with the constraint weights of `variant`.

  Args:
    config: the base config.
    variant: config.method plus '', '_cc', '_cm' or '_iid'. A term the variant uses keeps the
      config's weight, or the method's reference weight (SPEC 4.4) if the config has it at 0,
      so 'dm_iid' of a plain-DM config uses 0.05 / 0.01 and 'idm_iid' of plain IDM 0.01 / 0.03.
  """
  check_variant(config, variant)
  cc_on, cm_on = VARIANTS[variant]
  reference_cc, reference_cm = config_lib.IID_WEIGHTS[config.method]
  derived = config.copy_and_resolve_references()
  with derived.unlocked():
    cc = config.constraints.cc.weight or reference_cc
    cm = config.constraints.cm.weight or reference_cm
    derived.constraints.cc.weight = cc if cc_on else 0.0
    derived.constraints.cm.weight = cm if cm_on else 0.0
    derived.compare.variants = ''
    derived.compare.random_real = False
    derived.compare.full_train_epochs = 0
  return derived


def _cached(path: str, compute) -> dict[str, Any]:
  if os.path.exists(path):
    return workdir_lib.read_json(path)
  result = compute()
  workdir_lib.write_json(path, result)
  return result


def evaluate_random_real(config: ml_collections.ConfigDict,
                         data: loop.PreparedData) -> dict[str, Any]:
  """The random-real-subset baseline: `config.ipc` real images per class, same protocol.

  The subset is the one `distill.init='real'` starts from (same seed), so the row shows what
  distillation adds to its own initialisation.
  """
  dataset = data.dataset
  keys = loop.RunKeys.from_seed(config.seed)
  indices = evaluate_lib.random_real_subset(keys.init, dataset.train_labels, config.ipc)
  print(f'Evaluating a random real subset ({config.ipc} per class).', flush=True)
  return loop.evaluate_images(config, data, dataset.normalize(dataset.train_images[indices]),
                              dataset.train_labels[indices], keys.evaluate)


def run_with_baselines(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the config, its comparison variants and baselines.

  Returns:
    {'table': the markdown table (also printed and written to workdir/table.md),
     'rows': [{'label', 'accuracies', 'mean', 'std'}, ...] in table order, the run last but for
     the full-training-set row}.
  """
  config_lib.validate_config(config)
  for variant in filter(None, config.compare.variants.split(',')):
    check_variant(config, variant)
  data = loop.prepare_data(config)
  dataset = data.dataset
  rows = []  # (label, evaluation)
  compare_dir = os.path.join(workdir, 'compare')

  if config.compare.random_real:
    rows.append((f'random real (ipc {config.ipc})',
                 _cached(os.path.join(compare_dir, 'random_real.json'),
                         lambda: evaluate_random_real(config, data))))

  for variant in filter(None, config.compare.variants.split(',')):
    derived = variant_config(config, variant)
    print(f'--- variant {variant}: {method_label(derived)} ---', flush=True)
    results = loop.run(derived, os.path.join(compare_dir, variant), data)
    rows.append((method_label(derived), results['eval']))

  print(f'--- {method_label(config)} ---', flush=True)
  rows.append((method_label(config), loop.run(config, workdir, data)['eval']))

  if config.compare.full_train_epochs:
    def full_train():
      full = config.copy_and_resolve_references()
      with full.unlocked():
        full.eval.epochs = config.compare.full_train_epochs
        full.eval.num_eval = config.compare.full_train_num_eval
      print(f'Training on the full training set ({len(dataset.train_labels)} images, '
            f'{full.eval.epochs} epochs).', flush=True)
      return loop.evaluate_images(full, data, dataset.normalize(dataset.train_images),
                                  dataset.train_labels, loop.RunKeys.from_seed(config.seed).evaluate)
    rows.append((f'full training set ({len(dataset.train_labels)} images, '
                 f'{config.compare.full_train_epochs} epochs, '
                 f'{config.compare.full_train_num_eval} networks)',
                 _cached(os.path.join(compare_dir, 'full_train.json'), full_train)))

  table = format_table(rows, dataset.name, config)
  print(table, flush=True)
  with workdir_lib.atomic_write(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(table + '\n')
  return {'table': table,
          'rows': [{'label': label, 'accuracies': list(evaluation['accuracies']),
                    'mean': float(np.mean(evaluation['accuracies'])),
                    'std': float(np.std(evaluation['accuracies']))}
                   for label, evaluation in rows]}


def format_table(rows: list[tuple[str, dict[str, Any]]], dataset_name: str,
                 config: ml_collections.ConfigDict) -> str:
  """Markdown table of mean +- std test accuracy per row."""
  lines = [f'{dataset_name}, ipc {config.ipc}, {config.distill.iterations} iterations; '
           f'{config.eval.model} trained {config.eval.epochs} epochs, mean +- std over '
           f'{config.eval.num_eval} networks:', '',
           '| method | test accuracy (%) |', '|---|---|']
  for label, evaluation in rows:
    accuracies = np.asarray(evaluation['accuracies'])
    lines.append(f'| {label} | {accuracies.mean():.2f} +- {accuracies.std():.2f} |')
  return '\n'.join(lines)

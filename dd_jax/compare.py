"""A run and its baselines, summarised in one table (the main job's output).

    table = run_with_baselines(config, workdir)

Runs the configured distillation in `workdir`, each variant of `config.compare.variants` in
`workdir/compare/<variant>` (e.g. plain DM next to DM + IID), the random-real-subset baseline
and, if asked, networks trained on the full training set; every part is resumable and skipped
when already finished. Prints a markdown table and writes it to `workdir/table.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from dd_jax import data as data_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import experiment, presets, protocols, stats
from dd_jax import keys as keys_lib
from dd_jax import run as run_lib
from dd_jax import train as train_lib
from dd_jax import workdir as workdir_lib


def baseline_settings(config: ml_collections.ConfigDict, **extra: Any) -> dict[str, Any]:
  """What a baseline's accuracies depend on: data, seed, ipc and the evaluation protocol.

  `extra` adds baseline-specific fields. Returned in its JSON form (lists, not tuples), so it
  compares equal to the copy stored beside a cached result.
  """
  dataset = {k: v for k, v in config.dataset.to_dict().items() if k != 'cache_dir'}
  settings = {
    'dataset': dataset,
    'seed': config.seed,
    'ipc': config.ipc,
    'eval': protocols.resolve(config.eval.to_dict()),  # the protocol's values filled in
    **extra,
  }
  return json.loads(json.dumps(settings))


def _cached(path: str, settings: dict[str, Any], compute) -> dict[str, Any]:
  """`compute()`'s result, reused from `path` only if it was computed with `settings`."""
  try:
    cached = workdir_lib.read_json(path) if os.path.exists(path) else None
  except ValueError as error:  # a damaged file: computed again
    print(f'{path} is unreadable ({error}); recomputing.', flush=True)
    cached = None
  if isinstance(cached, dict):
    if cached.get('settings') == settings:
      return cached
    changed = sorted(
      key
      for key in set(settings) | set(cached.get('settings', {}))
      if settings.get(key) != cached.get('settings', {}).get(key)
    )
    print(
      f'{os.path.basename(path)}: computed with other settings (differing: '
      f'{", ".join(changed)}); recomputing.',
      flush=True,
    )
  result = {**compute(), 'settings': settings}
  workdir_lib.write_json(path, result)
  return result


def evaluate_random_real(
  settings: experiment.ExperimentSettings, data: run_lib.PreparedData
) -> dict[str, Any]:
  """The random-real-subset baseline: `ipc` real images per class, same protocol.

  The subset is the one DM's `distill.init='real'` starts from (same seed), so the row shows what
  distillation adds to its own initialisation.
  """
  dataset, ipc = data.dataset, settings.distill.ipc
  indices = data_lib.random_real_subset(
    keys_lib.run_key(settings.seed, 'init'), dataset.train_labels, ipc
  )
  print(f'Evaluating a random real subset ({ipc} per class).', flush=True)
  return run_lib.evaluate_images(
    settings.eval,
    settings.lowering,
    data,
    dataset.normalize(dataset.train_images[indices]),
    dataset.train_labels[indices],
    keys_lib.run_key(settings.seed, 'evaluate'),
    run_lib.teacher_of(settings, data),  # soft labels for the baseline too, as for the set
  )


def run_with_baselines(
  config: ml_collections.ConfigDict,
  workdir: str,
  settings: experiment.ExperimentSettings | None = None,
) -> dict[str, Any]:
  """Runs the config, its comparison variants and baselines.

  Every run's config is validated once (`settings`: the config's, if the caller has them).

  Returns:
    {'table': the markdown table (also printed and written to workdir/table.md),
     'rows': [{'label', 'accuracies', 'mean', 'std', 'split'}, ...] in table order (split:
     'test', or 'validation' with config.dataset.validation_fraction > 0), the run last but for
     the full-training-set row}.
  """
  settings = settings or experiment.validate_config(config)
  data = run_lib.prepare_data(settings)  # data, labels and networks checked: nothing written
  compare_dir = os.path.join(workdir, 'compare')
  # Every run's workdir is checked (writable, no other config inside) before any work: the main
  # run first, so that a changed config names the whole workdir rather than one variant's.
  variants = [
    (variant, presets.variant_config(config, variant)) for variant in settings.compare.variants
  ]
  runs = [(workdir, config, settings)] + [
    (os.path.join(compare_dir, variant), derived, experiment.validate_config(derived))
    for variant, derived in variants
  ]
  workdir_lib.check_writable(workdir)
  with workdir_lib.lock(workdir):  # the whole comparison; its runs lock their own workdirs too
    for run_dir, run_config, _ in runs:
      workdir_lib.check_writable(run_dir)
      workdir_lib.set_aside_stopped_run(run_dir, run_config)
      workdir_lib.check_config(run_dir, run_config)
    with workdir_lib.disk_full_stops(workdir):
      return _run_locked(config, workdir, settings, data, runs, compare_dir)


def _run_locked(
  config: ml_collections.ConfigDict,
  workdir: str,
  settings: experiment.ExperimentSettings,
  data: run_lib.PreparedData,
  runs: list[tuple[str, ml_collections.ConfigDict, experiment.ExperimentSettings]],
  compare_dir: str,
) -> dict[str, Any]:
  unfinished = [
    run_settings
    for run_dir, _, run_settings in runs
    if not os.path.exists(os.path.join(run_dir, 'results.json'))
  ]
  run_lib.check_free_space(
    workdir,
    sum(run_lib.disk_needed(run_settings, data) for run_settings in unfinished),
    what=f'the {len(unfinished)} unfinished run(s) of this comparison',
  )
  if settings.needs_pool:  # a pool built for other data is refused (or the pool built) up front
    run_lib.pool_of(settings, data)
  dataset = data.dataset
  rows = []  # (label, evaluation)

  if config.compare.random_real:
    rows.append(
      (
        f'random real (ipc {config.ipc})',
        _cached(
          os.path.join(compare_dir, 'random_real.json'),
          baseline_settings(config),
          lambda: evaluate_random_real(settings, data),
        ),
      )
    )

  for variant, (run_dir, derived, run_settings) in zip(settings.compare.variants, runs[1:]):
    print(f'--- variant {variant}: {presets.method_label(derived)} ---', flush=True)
    results = run_lib.run(derived, run_dir, data, run_settings)
    rows.append((presets.method_label(derived), results['eval']))

  print(f'--- {presets.method_label(config)} ---', flush=True)
  rows.append((presets.method_label(config), run_lib.run(config, workdir, data, settings)['eval']))

  if config.compare.full_train_epochs:

    def full_train():
      full = dataclasses.replace(
        settings.eval,
        epochs=settings.compare.full_train_epochs,
        num_eval=settings.compare.full_train_num_eval,
        eval_every=0,  # the last epoch only, on the labels
        soft_labels=False,
      )
      print(
        f'Training on the full training set ({len(dataset.train_labels)} images, '
        f'{full.epochs} epochs).',
        flush=True,
      )
      return run_lib.evaluate_images(
        full,
        settings.lowering,
        data,
        dataset.normalize(dataset.train_images),
        dataset.train_labels,
        keys_lib.run_key(settings.seed, 'evaluate'),
      )

    rows.append(
      (
        f'full training set ({len(dataset.train_labels)} images, '
        f'{stats.count(config.compare.full_train_epochs, "epoch")}, '
        f'{stats.count(config.compare.full_train_num_eval, "network")})',
        _cached(
          os.path.join(compare_dir, 'full_train.json'),
          baseline_settings(
            config,
            full_train_epochs=config.compare.full_train_epochs,
            full_train_num_eval=config.compare.full_train_num_eval,
          ),
          full_train,
        ),
      )
    )

  table = format_table(rows, dataset.name, config, dataset.held_out)
  print(table, flush=True)
  with workdir_lib.atomic_write(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(table + '\n')
  return {'table': table, 'rows': [_row(label, e, dataset.held_out) for label, e in rows]}


def _row(label: str, evaluation: dict[str, Any], split: str) -> dict[str, Any]:
  mean, std = stats.mean_std(evaluation['accuracies'])
  accuracies = list(evaluation['accuracies'])
  row = {'label': label, 'accuracies': accuracies, 'mean': mean, 'std': std, 'split': split}
  row['protocol'] = evaluation.get('protocol', 'dm')  # records before protocols: DM's
  if 'best_accuracies' in evaluation:
    row.update({k: evaluation[k] for k in ('best_accuracies', 'best_mean', 'best_std')})
  return row


def format_table(
  rows: list[tuple[str, dict[str, Any]]],
  dataset_name: str,
  config: ml_collections.ConfigDict,
  split: str = 'test',
) -> str:
  """Markdown table of mean +- sample std accuracy per row, on `split` ('test' or 'validation').

  The heading names the evaluation protocol; the accuracy is the last epoch's, and with
  evaluation points (`eval_every`) a second column gives the best point per network, labelled
  as chosen on `split`.
  """
  settings = evaluate_lib.EvalSettings.from_config(config)
  epochs_trained, _ = train_lib.epoch_plan(settings.epochs, settings.schedule)
  header, separator = evaluate_lib.accuracy_columns(settings, split)
  lines = [
    f'{dataset_name}, ipc {config.ipc}, {config.distill.iterations} iterations; protocol '
    f'{settings.protocol}: {settings.model} trained {epochs_trained} epochs, mean +- sample std '
    f'over {stats.count(settings.num_eval, "network")}:',
    '',
    f'| method |{header}',
    f'|---|{separator}',
  ]
  for label, evaluation in rows:
    lines.append(f'| {label} |{evaluate_lib.accuracy_cells(evaluation, settings)}')
  return '\n'.join(lines)

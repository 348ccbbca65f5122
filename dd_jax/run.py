"""A resumable distillation run: the loop around the jitted step, evaluation, checkpoints, export.

    settings = experiment.validate_config(config)     # once per run, before any work
    results = run(config, workdir, settings=settings)

The run works from its settings; the raw config is kept only for the workdir's snapshot (a rerun
with another config is refused) and the method's label in tables.

Rerunning the same config on the same workdir resumes from the last checkpoint and ends with the
same synthetic set as an uninterrupted run: every random draw comes from a named stream of
`config.seed` (dd_jax.keys; the step from state t uses fold_in(distill_key, t)).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dd_jax import checkpoint as checkpoint_lib
from dd_jax import data as data_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import experiment, guards, models, presets, stats
from dd_jax import extractors as extractors_lib
from dd_jax import keys as keys_lib
from dd_jax import pool as pool_lib
from dd_jax import sharding as sharding_lib
from dd_jax import train as train_lib
from dd_jax import workdir as workdir_lib
from dd_jax.distill import base
from dd_jax.lowering import Lowering


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The opened dataset and what every run needs from it."""

  dataset: data_lib.Dataset
  sampler: data_lib.ClassSampler
  test_images: jax.Array  # normalised float32 [M, H, W, C]: dataset.held_out, test or validation
  # Pretrained pools loaded for this dataset, by directory: runs sharing the data share them.
  pools: dict[str, pool_lib.Pool] = dataclasses.field(default_factory=dict)


def prepare_data(settings: experiment.ExperimentSettings) -> PreparedData:
  """Opens the dataset and runs the method's data-dependent checks before any work."""
  dataset = data_lib.open_dataset(settings.dataset)
  settings.method.check_data(settings.distill, dataset)
  # Both networks must take the images: the evaluation one otherwise fails only after distilling.
  settings.method.network(
    settings.distill, dataset.num_classes, settings.lowering
  ).check_input_shape(dataset.image_shape, 'config.model.name')
  models.get_network(settings.eval.model, dataset.num_classes).check_input_shape(
    dataset.image_shape, 'config.eval.model'
  )
  return PreparedData(
    dataset=dataset,
    sampler=data_lib.ClassSampler.from_dataset(dataset),
    test_images=dataset.normalize(dataset.test_images),
  )


def _evaluation_steps(settings: base.DistillSettings) -> list[int]:
  every, last = settings.eval_every, settings.iterations
  return sorted(set(range(every, last + 1, every)) | {last})


def evaluate_images(
  settings: evaluate_lib.EvalSettings,
  lowering: Lowering,
  data: PreparedData,
  images: Any,
  labels: Any,
  key: jax.Array,
  teacher: pool_lib.Pool | None = None,
) -> dict[str, Any]:
  """The evaluation protocol on a normalised image set, as recorded (`evaluation_record`).

  With `settings.soft_labels`, the networks train on `teacher`'s first member's soft labels of
  the images (`train.soft_targets`).
  """
  soft_labels = None
  if settings.soft_labels:
    logits = pool_lib.member_logits(teacher, 0, images)
    soft_labels = train_lib.soft_targets(logits, jnp.asarray(labels, jnp.int32))
  accuracies = evaluate_lib.evaluate_set(
    key,
    images,
    labels,
    data.test_images,
    data.dataset.test_labels,
    data.dataset.num_classes,
    settings,
    lowering,
    soft_labels,
  )
  warning = guards.chance_level_warning(
    [float(a) for a in accuracies.last],
    data.dataset.num_classes,
    f'{len(images)} training images',
  )
  if warning:
    print(warning, flush=True)
  return evaluation_record(accuracies, settings, data.dataset.held_out)


def evaluation_record(
  accuracies: evaluate_lib.Accuracies, settings: evaluate_lib.EvalSettings, split: str
) -> dict[str, Any]:
  """An evaluation as results.json and metrics.jsonl record it, accuracies in percent.

  Keys: 'accuracies', 'mean', 'std' (after the last epoch), 'model', 'split', 'protocol'; with
  evaluation points (`eval_every`) also 'best_accuracies', 'best_mean', 'best_std' (the best
  point per network, a choice on `split`) and 'curve_epochs', 'curve' ([T][P]).
  """
  mean, std = stats.mean_std(accuracies.last)
  record = {
    'accuracies': [float(a) for a in accuracies.last],
    'mean': mean,
    'std': std,
    'model': settings.model,
    'split': split,
    'protocol': settings.protocol,
  }
  if settings.soft_labels:
    record['labels'] = 'soft'  # hard labels are the default and not marked
  if settings.eval_every:
    best_mean, best_std = stats.mean_std(accuracies.best)
    record.update(
      best_accuracies=[float(a) for a in accuracies.best],
      best_mean=best_mean,
      best_std=best_std,
      curve_epochs=list(accuracies.epochs),
      curve=[[float(a) for a in row] for row in accuracies.curve],
    )
  return record


def pool_of(settings: experiment.ExperimentSettings, data: PreparedData) -> pool_lib.Pool:
  """The pretrained pool of `settings.pool`, loaded (or trained) once per data."""
  directory = settings.pool.directory
  if directory not in data.pools:
    data.pools[directory] = pool_lib.get_or_train_pool(
      settings.pool, data.dataset, settings.lowering, test_images=data.test_images
    )
  return data.pools[directory]


def teacher_of(settings: experiment.ExperimentSettings, data: PreparedData) -> pool_lib.Pool | None:
  """The soft-label teacher (the pool, member 0) when the evaluation asks for soft labels."""
  return pool_of(settings, data) if settings.eval.soft_labels else None


def centralization_extractor(
  settings: experiment.ExperimentSettings, data: PreparedData
) -> extractors_lib.Extractor:
  """The CC extractor the settings ask for."""
  if not settings.uses_pool:
    return extractors_lib.matching_net_extractor
  return extractors_lib.pool_extractor(pool_of(settings, data))


def device_mesh(settings: experiment.ExperimentSettings) -> jax.sharding.Mesh | None:
  """The mesh the step splits over (config.distill.devices), or None for one device."""
  available = jax.device_count()
  devices = settings.distill.devices or available
  if devices > available:
    raise ValueError(
      f'config.distill.devices={devices}, but jax sees {available} device(s); '
      'use 0 (all) or a smaller number.'
    )
  if devices == 1:
    return None
  if not settings.method.supports_mesh:
    logging.warning('%s runs on one device (distill.devices applies to DM).', settings.method.name)
    return None
  return sharding_lib.class_mesh(devices, num_nets=settings.distill.num_nets)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A method ready to run: its initial state and step.

  Attributes:
    state: the initial state.
    step: the step `(state, sampler) -> (state, metrics)`.
    training_set: `state -> (images, labels)`, what evaluation trains on and synthetic.npz
      holds (IDM: the expanded images).
  """

  state: Any
  step: base.Step
  training_set: Callable[[Any], tuple[jax.Array, jax.Array]]


def _initial_images(
  settings: experiment.ExperimentSettings, dataset: data_lib.Dataset
) -> tuple[np.ndarray, np.ndarray]:
  return settings.method.initial_images(
    settings.distill, dataset, keys_lib.run_key(settings.seed, 'init')
  )


def build_method(settings: experiment.ExperimentSettings, data: PreparedData) -> Prepared:
  """The initial state (built once) and the step of the configured method on `data`."""
  method, distill, lowering = settings.method, settings.distill, settings.lowering
  dataset = data.dataset
  net = method.network(distill, dataset.num_classes, lowering)
  if net.has_batch_stats and (distill.weights.cc or distill.weights.cm):
    logging.warning(
      '%s has batch norm: the reference code applies neither CC nor CM in its '
      'batch-norm branch; dd_jax applies them as configured.',
      distill.model,
    )
  extractor = centralization_extractor(settings, data)
  images, labels = _initial_images(settings, dataset)
  spec = base.DataSpec.of(dataset)
  state = method.init_state(distill, spec, images, labels, net, settings.seed)
  mesh = device_mesh(settings)
  if mesh is not None:
    state = sharding_lib.place_state(state, mesh)
  # A method with its own use of the pool (`Method.uses_pool`) receives it.
  pool = {'pool': pool_of(settings, data)} if method.uses_pool else {}
  step = method.make_step(net, distill, spec, lowering, extractor, mesh, **pool)
  return Prepared(
    state=state, step=step, training_set=lambda s: method.training_set(s, dataset.num_classes)
  )


# Disk use beyond the arrays, per unit (measured on finished workdirs, rounded up).
_CHECKPOINT_OVERHEAD = 256 * 2**10  # Orbax's metadata files and directories per checkpoint
_BYTES_PER_LOG_LINE = 2048  # a metrics.jsonl line and its TensorBoard events
_FIXED_FILES = 4 * 2**20  # config.json, results.json, lock, filesystem blocks


def disk_needed(
  settings: experiment.ExperimentSettings, data: PreparedData, checkpoints_kept: int = 2
) -> int:
  """Bytes a run writes at its peak, from the shapes of its state (its images drawn, the rest
  traced abstractly) and its schedule.

  Counted: (checkpoints_kept + 1) checkpoints (Orbax writes a new step, in a temporary
  directory, before deleting the oldest); the exported training set four times (synthetic.npz
  holds it in pixels and normalised, and its temporary copy), and twice per evaluation when
  the checkpoint is chosen on the test split; one PNG grid per evaluation (uncompressed bound);
  metrics.jsonl twice (rewritten through a temporary file) and the TensorBoard events; the small
  files; then a 10% margin.
  """
  method, distill, num_classes = settings.method, settings.distill, data.dataset.num_classes
  net = method.network(distill, num_classes, settings.lowering)
  images, labels = _initial_images(settings, data.dataset)
  spec = base.DataSpec.of(data.dataset)

  def initial_state():
    state = method.init_state(distill, spec, images, labels, net, settings.seed)
    return state, method.training_set(state, num_classes)[0]

  state, training_images = jax.eval_shape(initial_state)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  image_bytes = training_images.size * training_images.dtype.itemsize
  evaluations = len(_evaluation_steps(distill))
  # A grid of uint8 pixels upscaled to at least 256 pixels a side (workdir.write_png).
  height, width = images.shape[1:3]
  factor = max(1, -(-256 // max(height * num_classes, width * distill.ipc)))
  png_bytes = images.size * factor**2 + 2**16
  log_lines = distill.iterations // distill.log_every + evaluations
  needed = (
    (checkpoints_kept + 1) * (state_bytes + _CHECKPOINT_OVERHEAD)
    + 4 * image_bytes
    + (2 * evaluations * image_bytes if settings.eval.selects_checkpoint else 0)
    + evaluations * png_bytes
    + 3 * log_lines * _BYTES_PER_LOG_LINE
    + _FIXED_FILES
  )
  return int(1.1 * needed)


def check_free_space(workdir: str, needed: int, what: str = 'this run') -> None:
  """Refuses to start when the disk of `workdir` has fewer than `needed` bytes free.

  Raises:
    OSError: naming the workdir, the free and the needed space, and the fix.
  """
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise OSError(
      f'--workdir={workdir} has {free / 2**20:.1f} MiB free, but checkpoints and the '
      f'export of {what} need about {needed / 2**20:.1f} MiB; free some space or '
      'choose a workdir on another disk.'
    )


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: PreparedData | None = None,
  settings: experiment.ExperimentSettings | None = None,
) -> dict[str, Any]:
  """Distils a synthetic set as `config` says, resumably, in `workdir`.

  Args:
    config: the run's config: snapshot in the workdir and named in tables.
    workdir: run directory (created); see dd_jax.workdir for its files.
    data: the opened dataset, to share it between runs of the same data.
    settings: `experiment.validate_config(config)`, if the caller has it (else validated here,
      before any work).

  Returns:
    The final results (also written to <workdir>/results.json).
  """
  settings = settings or experiment.validate_config(config)
  workdir_lib.check_writable(workdir)
  with workdir_lib.lock(workdir):  # one process in a workdir; before anything is removed
    return _run_locked(config, workdir, data, settings)


def _run_locked(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: PreparedData | None,
  settings: experiment.ExperimentSettings,
) -> dict[str, Any]:
  workdir_lib.remove_stale_temporaries(workdir)
  if data is None:
    data = prepare_data(settings)
  else:
    settings.method.check_data(settings.distill, data.dataset)
  workdir_lib.set_aside_stopped_run(workdir, config)
  workdir_lib.check_config(workdir, config)
  if not os.path.exists(os.path.join(workdir, 'results.json')):  # else it rewrites its exports
    check_free_space(workdir, disk_needed(settings, data))
  prepared = build_method(settings, data)
  # Written only now: a run refused by any check above leaves its workdir reusable.
  workdir_lib.snapshot_config(workdir, config)
  with workdir_lib.disk_full_stops(workdir):
    try:
      state, evaluation, finished = _distill(workdir, data, settings, prepared)
    except (FloatingPointError, guards.DivergenceError) as error:
      workdir_lib.mark_stopped(workdir, str(error))
      raise
    return _export(config, workdir, data, settings, prepared, state, evaluation, finished)


def _read_results(workdir: str) -> dict[str, Any] | None:
  """A run's results.json, or None if it is missing or unreadable (a rerun rebuilds it)."""
  try:
    results = workdir_lib.read_json(os.path.join(workdir, 'results.json'))
  except (OSError, ValueError):
    return None
  return results if isinstance(results, dict) and 'eval' in results else None


def _distill(
  workdir: str,
  data: PreparedData,
  settings: experiment.ExperimentSettings,
  prepared: Prepared,
) -> tuple[Any, dict[str, Any], bool]:
  """Runs (or resumes) the steps to the end, evaluating and checkpointing as configured.

  Returns:
    The final state; its evaluation (of this run's last step, or, for a run that had already
    finished, as recorded in metrics.jsonl: evaluated again only when the record is missing);
    whether the run had already finished (no step ran).
  """
  distill, dataset = settings.distill, data.dataset
  state = prepared.state
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    if int(state.step) < distill.iterations:
      print(f'Resuming {workdir} from step {int(state.step)}.', flush=True)
    else:
      print(f'{workdir} has finished its {distill.iterations} steps.', flush=True)
    # Drop metrics logged after the checkpoint: they are about to be recomputed identically.
    kept = [m for m in workdir_lib.read_metrics(metrics_path) if m['step'] <= int(state.step)]
    workdir_lib.write_metrics(metrics_path, kept)

  total = distill.iterations
  evaluation_steps = _evaluation_steps(distill)
  evaluate_key = keys_lib.run_key(settings.seed, 'evaluate')
  tensorboard = workdir_lib.TensorBoardLog(workdir, int(state.step) if restored else None)
  try:
    record = lambda step, state: _evaluate_and_record(
      settings, data, prepared, state, step, evaluate_key, workdir, tensorboard
    )
    window, window_start = [], time.perf_counter()  # per-step metrics since the last log line
    start_step = int(state.step)
    last_saved = start_step if restored is not None else None
    if start_step < total:
      weights = distill.weights
      print(
        f'Distilling {dataset.name} with {settings.method.name.upper()}: '
        f'{dataset.num_classes} classes x ipc {distill.ipc}, {distill.model}, {total} '
        f'iterations (weights cc={weights.cc} on {distill.extractor}, cm={weights.cm}).',
        flush=True,
      )
    last_evaluation = None
    logged = [m for m in workdir_lib.read_metrics(metrics_path) if 'loss' in m]
    first_loss = logged[0]['loss'] if logged else None  # the divergence guard's reference
    warned = set()
    for step in range(start_step + 1, total + 1):
      state, metrics = prepared.step(state, data.sampler)
      window.append(metrics)
      log_now = step % distill.log_every == 0 or step == total
      evaluate_now = step in evaluation_steps
      save_now = step % distill.checkpoint_every == 0 or evaluate_now
      if log_now or evaluate_now or save_now:
        # Nothing non-finite is logged, evaluated or checkpointed: the last checkpoint stays good.
        window_metrics = jax.device_get(window)
        guards.check_finite(window_metrics, state.images, step, workdir, last_saved)
      if log_now:
        means = {k: float(np.mean([m[k] for m in window_metrics])) for k in window_metrics[0]}
        rate = len(window) / (time.perf_counter() - window_start)
        names = ['loss'] + sorted(k for k in means if k not in ('loss', 'grad_norm'))
        terms = ' '.join(f'{k} {means[k]:.4g}' for k in names)
        print(
          f'step {step}/{total} | {rate:.2f} it/s | {terms} | ETA '
          f'{workdir_lib.format_duration((total - step) / rate)}',
          flush=True,
        )
        workdir_lib.append_metrics(metrics_path, {'step': step, 'its_per_s': rate, **means})
        tensorboard.scalars(step, {**means, 'its_per_s': rate}, prefix='distill/')
        window, window_start = [], time.perf_counter()
        first_loss = means['loss'] if first_loss is None else first_loss
        overshoot = guards.image_overshoot(state.images, dataset.mean, dataset.std)
        warnings = guards.divergence_warnings(
          first_loss, means['loss'], overshoot, step, distill.lr
        )
        for kind, warning in warnings.items():
          if kind not in warned:  # each kind once per run
            warned.add(kind)
            print(warning, flush=True)
      if evaluate_now:
        last_evaluation = record(step, state)
      if save_now:
        checkpointer.save(step, state)
        last_saved = step
    if last_evaluation is None:  # no step ran: the evaluation of the last one, as recorded
      recorded = [
        m['eval']
        for m in workdir_lib.read_metrics(metrics_path)
        if m['step'] == total and 'eval' in m
      ]
      last_evaluation = recorded[-1] if recorded else record(total, state)
    return state, last_evaluation, start_step == total
  finally:  # also on an error: no file of the workdir stays open
    checkpointer.close()
    tensorboard.close()


def _export(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: PreparedData,
  settings: experiment.ExperimentSettings,
  prepared: Prepared,
  state: Any,
  evaluation: dict[str, Any],
  finished: bool,
) -> dict[str, Any]:
  """Writes synthetic.npz and results.json of the final state, or, for a run that had already
  `finished`, checks them and rewrites what is missing, unreadable or different (saying so).

  Returns:
    The results (as in results.json).
  """
  dataset, distill = data.dataset, settings.distill
  synthetic = _synthetic_arrays(data, settings, prepared, state)
  if settings.eval.selects_checkpoint:
    step, evaluation = _best_evaluation(workdir)
    with np.load(_evaluated_path(workdir, step)) as saved:
      synthetic = {key: saved[key] for key in saved.files}
  results = {
    'dataset': dataset.name,
    'method': presets.method_label(config),  # as the tables name it, e.g. 'DM + IID (reference)'
    'base_method': settings.method.name,
    'ipc': distill.ipc,
    'iterations': distill.iterations,
    'weights': distill.weights._asdict(),
    'cc_extractor': distill.extractor,
    'eval': evaluation,
  }
  if settings.eval.selects_checkpoint:
    results['checkpoint'] = {'chosen_on': dataset.held_out, 'step': int(synthetic['step'])}
  results = json.loads(json.dumps(results))  # as read back from results.json
  synthetic_path = os.path.join(workdir, 'synthetic.npz')
  problem = workdir_lib.synthetic_problem(synthetic_path, synthetic)
  if problem:
    if finished:
      print(f'{synthetic_path} {problem}; rewriting it from the last checkpoint.', flush=True)
    workdir_lib.export_synthetic(synthetic_path, synthetic)
  if _read_results(workdir) != results:
    if finished:
      print(f'{workdir}/results.json is missing, unreadable or outdated; rewriting it.', flush=True)
    workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)
  return results


def _synthetic_arrays(
  data: PreparedData, settings: experiment.ExperimentSettings, prepared: Prepared, state: Any
) -> dict[str, np.ndarray]:
  """The arrays of synthetic.npz for `state` (`workdir.synthetic_arrays`)."""
  dataset = data.dataset
  images, labels = map(sharding_lib.to_host, prepared.training_set(state))
  pixels = lambda x: np.asarray(dataset.denormalize(sharding_lib.to_host(x), clip=True)) / 255.0
  stored = settings.method.stored_images(state)
  return workdir_lib.synthetic_arrays(
    pixels(images),
    np.asarray(labels),
    dataset.class_names,
    dataset.mean,
    dataset.std,
    stored_images=None if stored is None else pixels(stored),
    normalized_images=np.asarray(images),
    step=int(state.step),
  )


def _evaluated_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'evaluated', f'step_{step:06d}.npz')


def _best_evaluation(workdir: str) -> tuple[int, dict[str, Any]]:
  """(step, evaluation) of the evaluation point with the best mean accuracy on the run's held-out
  split (the earliest of ties): config.eval.select_checkpoint 'validation' or 'test'."""
  evaluations = {
    m['step']: m['eval']
    for m in workdir_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    if 'eval' in m
  }
  step = max(sorted(evaluations), key=lambda s: evaluations[s]['mean'])
  return step, evaluations[step]


def _evaluate_and_record(
  settings: experiment.ExperimentSettings,
  data: PreparedData,
  prepared: Prepared,
  state: Any,
  step: int,
  evaluate_key: jax.Array,
  workdir: str,
  tensorboard: workdir_lib.TensorBoardLog,
) -> dict[str, Any]:
  start = time.perf_counter()
  images, labels = map(sharding_lib.to_host, prepared.training_set(state))
  evaluation = evaluate_images(
    settings.eval,
    settings.lowering,
    data,
    images,
    labels,
    jax.random.fold_in(evaluate_key, step),
    teacher_of(settings, data),
  )
  seconds = time.perf_counter() - start
  if settings.eval.selects_checkpoint:  # kept for the choice at the end
    os.makedirs(os.path.join(workdir, 'evaluated'), exist_ok=True)
    workdir_lib.export_synthetic(
      _evaluated_path(workdir, step), _synthetic_arrays(data, settings, prepared, state)
    )
  print(
    f'step {step}: {evaluation["model"]} {evaluation["split"]} accuracy '
    f'{stats.format_mean_std(evaluation["accuracies"])} over '
    f'{stats.count(len(evaluation["accuracies"]), "network")} ({seconds:.0f}s)',
    flush=True,
  )
  workdir_lib.append_metrics(
    os.path.join(workdir, 'metrics.jsonl'),
    {'step': step, 'eval': evaluation, 'eval_seconds': seconds},
  )
  split = evaluation['split']
  tensorboard.scalars(
    step,
    {f'{split}_accuracy': evaluation['mean'], f'{split}_accuracy_std': evaluation['std']},
    'eval/',
  )
  dataset = data.dataset
  pixels = np.asarray(dataset.denormalize(sharding_lib.to_host(state.images), clip=True)) / 255.0
  workdir_lib.write_png(
    os.path.join(workdir, 'images', f'step_{step:06d}.png'),
    workdir_lib.image_grid(pixels, rows=dataset.num_classes),
  )
  return evaluation

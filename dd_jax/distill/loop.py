"""A resumable distillation run: the loop around the jitted step, evaluation, checkpoints, export.

    results = run(config, workdir)

Rerunning the same config on the same workdir resumes from the last checkpoint and ends with the
same synthetic set as an uninterrupted run: every random draw comes from keys derived from
`config.seed` (the step from state t uses fold_in(distill_key, t)).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dd_jax import checkpoint as checkpoint_lib
from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import losses
from dd_jax import models
from dd_jax import pool as pool_lib
from dd_jax import sharding as sharding_lib
from dd_jax import workdir as workdir_lib
from dd_jax.distill import dm
from dd_jax.distill import idm


@dataclasses.dataclass(frozen=True)
class RunKeys:
  """Independent PRNG streams of a run, all derived from config.seed."""
  init: jax.Array
  distill: jax.Array
  evaluate: jax.Array
  queue: jax.Array  # IDM's initial model queue

  @classmethod
  def from_seed(cls, seed: int) -> 'RunKeys':
    root = jax.random.key(seed)
    return cls(*(jax.random.fold_in(root, i) for i in range(4)))


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The opened dataset and what every run needs from it."""
  dataset: data_lib.Dataset
  sampler: data_lib.ClassSampler
  test_images: jax.Array  # normalised float32 [M, H, W, C]
  # Pretrained pools loaded for this dataset, by directory: runs sharing the data share them.
  pools: dict[str, pool_lib.Pool] = dataclasses.field(default_factory=dict)


def prepare_data(config: ml_collections.ConfigDict) -> PreparedData:
  """Opens the dataset and checks the data-dependent fields (ipc, batch_real) before any work."""
  dataset = data_lib.load_dataset(config.dataset.name, data_dir=config.dataset.data_dir or None,
                                  cache_dir=config.dataset.cache_dir or None,
                                  normalization=config.dataset.normalization)
  data_lib.check_ipc(dataset, config.ipc)
  if config.method == 'idm':
    _check_idm_data(config, dataset)
  smallest = int(np.min(dataset.train_class_counts()))
  if config.distill.batch_real > smallest:
    raise ValueError(f'config.distill.batch_real={config.distill.batch_real} is larger than the '
                     f'smallest class of {dataset.name} ({smallest} training images); real images '
                     f'are drawn without replacement, so set --config.distill.batch_real<='
                     f'{smallest}.')
  return PreparedData(dataset=dataset, sampler=data_lib.ClassSampler.from_dataset(dataset),
                      test_images=dataset.normalize(dataset.test_images))


def _check_idm_data(config: ml_collections.ConfigDict, dataset: data_lib.Dataset) -> None:
  height, width = dataset.image_shape[:2]
  if height % 2 or width % 2:
    raise ValueError(f'method=idm splits images into 2x2 quadrants; {dataset.name} images are '
                     f'{height}x{width} (odd). Use --config.method=dm.')
  smallest = int(np.min(dataset.train_class_counts()))
  if config.distill.init == 'real' and 4 * config.ipc > smallest:
    raise ValueError(f'method=idm with distill.init=real fills each stored image with 4 real '
                     f'images: config.ipc={config.ipc} needs {4 * config.ipc} per class, but the '
                     f'smallest class of {dataset.name} has {smallest}; lower --config.ipc or '
                     'use --config.distill.init=noise.')
  if config.idm.train_batch > len(dataset.train_labels):
    raise ValueError(f'config.idm.train_batch={config.idm.train_batch} exceeds the '
                     f'{len(dataset.train_labels)} training images of {dataset.name}.')


def objective_weights(config: ml_collections.ConfigDict) -> losses.ObjectiveWeights:
  cc, cm = config.constraints.cc, config.constraints.cm
  return losses.ObjectiveWeights(cc=float(cc.weight), cm=float(cm.weight), cc_form=cc.form,
                                 cc_alpha=float(cc.alpha), cc_beta=float(cc.beta),
                                 cm_grouping=cm.grouping)


def initial_images(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                   key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Class-blocked initial synthetic (stored) images, normalised, and their labels."""
  labels = np.repeat(np.arange(dataset.num_classes), config.ipc)
  if config.distill.init == 'real' and config.method == 'idm':
    # Each stored image: 4 distinct real images of its class, 2x2 average-pooled (SPEC 6).
    indices = evaluate_lib.random_real_subset(key, dataset.train_labels, 4 * config.ipc)
    real = dataset.normalize(dataset.train_images[indices])
    real = real.reshape(dataset.num_classes, 4, config.ipc, *dataset.image_shape)
    images = np.asarray(jax.vmap(idm.partitioned_init)(real)).reshape(
        len(labels), *dataset.image_shape)
  elif config.distill.init == 'real':
    indices = evaluate_lib.random_real_subset(key, dataset.train_labels, config.ipc)
    images = np.asarray(dataset.normalize(dataset.train_images[indices]))
  else:
    images = np.asarray(jax.random.normal(key, (len(labels), *dataset.image_shape)))
  return images, labels


def _evaluation_steps(config: ml_collections.ConfigDict) -> list[int]:
  every, last = config.distill.eval_every, config.distill.iterations
  return sorted(set(range(every, last + 1, every)) | {last})


def evaluate_images(config: ml_collections.ConfigDict, data: PreparedData, images: Any,
                    labels: Any, key: jax.Array) -> dict[str, Any]:
  """Evaluation protocol on a normalised image set; accuracies in percent."""
  settings = evaluate_lib.EvalSettings.from_config(config.eval)
  accuracies = evaluate_lib.evaluate_set(key, images, labels, data.test_images,
                                         data.dataset.test_labels, data.dataset.num_classes,
                                         settings)
  return {'accuracies': [float(a) for a in accuracies], 'mean': float(np.mean(accuracies)),
          'std': float(np.std(accuracies)), 'model': settings.model}


@dataclasses.dataclass(frozen=True)
class Method:
  """A distillation method ready to run.

  Attributes:
    state: the initial state (DM: `dm.DistillState`; IDM: `idm.IDMState`).
    step: the step `(state, sampler) -> (state, metrics)`.
    training_set: `state -> (images, labels)`, what evaluation trains on and synthetic.npz
      holds (IDM: the expanded images).
    weights: the loss weights in use.
  """
  state: Any
  step: Callable[[Any, data_lib.ClassSampler], tuple[Any, dict[str, jax.Array]]]
  training_set: Callable[[Any], tuple[jax.Array, jax.Array]]
  weights: losses.ObjectiveWeights


def centralization_extractor(config: ml_collections.ConfigDict,
                             data: PreparedData) -> dm.CentralizationExtractor:
  """The CC extractor the config asks for; a pool is loaded (or trained) once per data."""
  if config.constraints.cc.extractor != 'pool' or not config.constraints.cc.weight:
    return dm.matching_net_extractor
  directory = config.pool.dir or pool_lib.default_pool_dir(config)
  if directory not in data.pools:
    data.pools[directory] = pool_lib.get_or_train_pool(config, data.dataset,
                                                       test_images=data.test_images)
  return pool_lib.pool_extractor(data.pools[directory])


def real_chunk(config: ml_collections.ConfigDict, num_classes: int) -> int:
  """config.distill.real_chunk, or its default: the largest divisor of the step's real images
  up to 64 on CPU (measured fastest, see the README's speed section), one class elsewhere."""
  total = num_classes * config.distill.batch_real
  if config.distill.real_chunk:
    if total % config.distill.real_chunk:
      raise ValueError(f'config.distill.real_chunk={config.distill.real_chunk} must divide the '
                       f'{num_classes} x {config.distill.batch_real} real images of a step.')
    return config.distill.real_chunk
  if jax.default_backend() != 'cpu':
    return config.distill.batch_real
  return max(d for d in range(1, 65) if total % d == 0)


def device_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """The mesh the DM step splits over (config.distill.devices), or None for one device."""
  available = jax.device_count()
  devices = config.distill.devices or available
  if devices > available:
    raise ValueError(f'config.distill.devices={devices}, but jax sees {available} device(s); '
                     'use 0 (all) or a smaller number.')
  if devices == 1:
    return None
  if config.method != 'dm':
    logging.warning('%s runs on one device (distill.devices applies to DM).', config.method)
    return None
  return sharding_lib.class_mesh(devices, num_nets=config.distill.num_nets)


def build_method(config: ml_collections.ConfigDict, data: PreparedData,
                 keys: RunKeys) -> Method:
  """The initial state and the step of `config.method` on `data`."""
  dataset = data.dataset
  # The DM step runs no convolution backward inside a loop, so XLA's own convolution is right
  # everywhere (im2col, the CPU default, exists for loops: see models.layers.resolve_conv_impl).
  net = models.get_network(config.model.name, dataset.num_classes,
                           conv_impl='xla' if config.method == 'dm' else 'auto')
  optimizer = optax.sgd(config.distill.lr, momentum=config.distill.momentum)
  weights = objective_weights(config)
  if net.has_batch_stats and (weights.cc or weights.cm):
    logging.warning('%s has batch norm: the reference code applies neither CC nor CM in its '
                    'batch-norm branch (SPEC 4.4); dd_jax applies them as configured.',
                    config.model.name)
  extractor = centralization_extractor(config, data)
  images, labels = initial_images(config, dataset, keys.init)
  if config.method == 'dm':
    settings = dm.DMSettings(num_classes=dataset.num_classes, ipc=config.ipc,
                             batch_real=config.distill.batch_real,
                             num_nets=config.distill.num_nets, strategy=config.augment.strategy,
                             weights=weights, mean=dataset.mean, std=dataset.std,
                             real_chunk=real_chunk(config, dataset.num_classes))
    state = dm.init_state(images, labels, optimizer, keys.distill)
    mesh = device_mesh(config)
    if mesh is not None:
      state = sharding_lib.place_state(state, mesh)
    return Method(state=state, step=dm.make_dm_step(net, settings, optimizer, extractor, mesh),
                  training_set=lambda state: (state.images, state.labels), weights=weights)
  settings = idm.IDMSettings(
      num_classes=dataset.num_classes, ipc=config.ipc, batch_real=config.distill.batch_real,
      strategy=config.augment.strategy, weights=weights, mean=dataset.mean, std=dataset.std,
      ce_weight=config.idm.ce_weight, accuracy_window=config.idm.accuracy_window,
      queue_init=config.idm.queue_init, queue_capacity=config.idm.queue_capacity,
      push_every=config.idm.push_every, train_nets=config.idm.train_nets,
      train_steps=config.idm.train_steps, train_batch=config.idm.train_batch,
      train_lr=config.idm.train_lr, train_momentum=config.idm.train_momentum,
      train_weight_decay=config.idm.train_weight_decay)
  state = idm.init_idm_state(images, labels, optimizer, net, settings, keys.distill, keys.queue)
  return Method(state=state, step=idm.make_idm_step(net, settings, optimizer, extractor),
                training_set=lambda s: idm.expanded_set(s.images, s.labels, dataset.num_classes),
                weights=weights)


def check_free_space(workdir: str, method: Method, checkpoints_kept: int = 2) -> None:
  """Refuses to start when the workdir's disk cannot hold the checkpoints and the export.

  Needed: (checkpoints_kept + 1) copies of the state (Orbax writes a new step before deleting
  the oldest), two copies of the exported training set (synthetic.npz, PNG grids), 10% margin.
  """
  state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(method.state))
  image_bytes = method.training_set(method.state)[0].nbytes
  needed = int(1.1 * ((checkpoints_kept + 1) * state_bytes + 2 * image_bytes))
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise OSError(f'--workdir={workdir} has {free / 2**20:.1f} MiB free, but checkpoints and the '
                  f'export of this run need about {needed / 2**20:.1f} MiB; free some space or '
                  'choose a workdir on another disk.')


def run(config: ml_collections.ConfigDict, workdir: str,
        data: PreparedData | None = None) -> dict[str, Any]:
  """Distils a synthetic set as `config` says, resumably, in `workdir`.

  Args:
    config: a validated-or-not config (validated here before any work).
    workdir: run directory (created); see dd_jax.workdir for its files.
    data: the opened dataset, to share it between runs of the same data.

  Returns:
    The final results (also written to <workdir>/results.json).
  """
  config_lib.validate_config(config)
  workdir_lib.check_writable(workdir)
  workdir_lib.remove_stale_temporaries(workdir)
  data = data or prepare_data(config)
  workdir_lib.snapshot_config(workdir, config)
  dataset = data.dataset
  results_path = os.path.join(workdir, 'results.json')

  keys = RunKeys.from_seed(config.seed)
  method = build_method(config, data, keys)
  state = method.state
  check_free_space(workdir, method)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    print(f'Resuming {workdir} from step {int(state.step)}.', flush=True)
    # Drop metrics logged after the checkpoint: they are about to be recomputed identically.
    kept = [m for m in workdir_lib.read_metrics(metrics_path) if m['step'] <= int(state.step)]
    workdir_lib.write_metrics(metrics_path, kept)

  total = config.distill.iterations
  evaluation_steps = _evaluation_steps(config)
  window, window_start = [], time.perf_counter()  # per-step metrics since the last log line
  start_step = int(state.step)
  last_saved = start_step if restored is not None else None
  if start_step < total:
    weights = method.weights
    print(f'Distilling {dataset.name} with {config.method.upper()}: {dataset.num_classes} '
          f'classes x ipc {config.ipc}, {config.model.name}, {total} iterations (weights '
          f'cc={weights.cc} on {config.constraints.cc.extractor}, cm={weights.cm}).', flush=True)
  last_evaluation = None
  for step in range(start_step + 1, total + 1):
    state, metrics = method.step(state, data.sampler)
    window.append(metrics)
    log_now = step % config.distill.log_every == 0 or step == total
    evaluate_now = step in evaluation_steps
    save_now = step % config.distill.checkpoint_every == 0 or evaluate_now
    if log_now or evaluate_now or save_now:
      # Nothing non-finite is logged, evaluated or checkpointed: the last checkpoint stays good.
      window_metrics = jax.device_get(window)
      check_finite(window_metrics, state.images, step, workdir, last_saved)
    if log_now:
      means = {k: float(np.mean([m[k] for m in window_metrics])) for k in window_metrics[0]}
      rate = len(window) / (time.perf_counter() - window_start)
      names = ['loss'] + sorted(k for k in means if k not in ('loss', 'grad_norm'))
      terms = ' '.join(f'{k} {means[k]:.4g}' for k in names)
      print(f'step {step}/{total} | {rate:.2f} it/s | {terms} | ETA '
            f'{workdir_lib.format_duration((total - step) / rate)}', flush=True)
      workdir_lib.append_metrics(metrics_path, {'step': step, 'its_per_s': rate, **means})
      window, window_start = [], time.perf_counter()
    if evaluate_now:
      last_evaluation = _evaluate_and_record(config, data, method, state, step, keys, workdir)
    if save_now:
      checkpointer.save(step, state)
      last_saved = step
  checkpointer.close()

  if last_evaluation is None and os.path.exists(results_path):
    return workdir_lib.read_json(results_path)  # already finished
  if last_evaluation is None:  # resumed exactly at the end without a results file
    last_evaluation = _evaluate_and_record(config, data, method, state, total, keys, workdir)
  images, labels = map(sharding_lib.to_host, method.training_set(state))
  pixels = lambda x: np.asarray(dataset.denormalize(sharding_lib.to_host(x), clip=True))
  workdir_lib.export_synthetic(
      os.path.join(workdir, 'synthetic.npz'), pixels(images), np.asarray(labels),
      dataset.class_names, dataset.mean, dataset.std,
      stored_images=pixels(state.images) if config.method == 'idm' else None)
  results = {'dataset': dataset.name, 'method': config.method, 'ipc': config.ipc,
             'iterations': total, 'weights': method.weights._asdict(),
             'cc_extractor': config.constraints.cc.extractor, 'eval': last_evaluation}
  workdir_lib.write_json(results_path, results)
  return results


def check_finite(window_metrics: list[dict[str, Any]], images: jax.Array, step: int,
                 workdir: str, last_saved: int | None) -> None:
  """Stops the run when a loss term or the synthetic images went non-finite.

  Args:
    window_metrics: host metrics of the steps `step - len(window_metrics) + 1 .. step`.
    images: the synthetic images after `step`.
    step: the current step.
    workdir: the run directory (named in the message).
    last_saved: the step of the newest checkpoint, or None.

  Raises:
    FloatingPointError: naming the first step with a non-finite metric (loss terms, grad_norm,
      ...) and those metrics, or else the images; and the checkpoint a rerun would resume from.
  """
  first_step = step - len(window_metrics) + 1
  images_finite = bool(jnp.all(jnp.isfinite(images)))
  problem = None
  for offset, metrics in enumerate(window_metrics):
    bad = sorted(name for name, value in metrics.items() if not np.all(np.isfinite(value)))
    if bad:
      problem = f'{", ".join(bad)} became non-finite at step {first_step + offset}'
      if not images_finite:
        problem += f' (the synthetic images at step {step} are non-finite too)'
      break
  if problem is None and not images_finite:
    problem = (f'the synthetic images became non-finite between steps {first_step} and {step} '
               'while every loss term stayed finite')
  if problem is None:
    return
  resume = (f'the last checkpoint (step {last_saved}) in {workdir}/checkpoints is intact'
            if last_saved is not None else 'no checkpoint was written')
  raise FloatingPointError(
      f'Stopped: {problem}; {resume}. Lower distill.lr or the constraint weights '
      '(constraints.cc.weight, constraints.cm.weight) and rerun in a new --workdir.')


def _evaluate_and_record(config, data, method, state, step, keys, workdir) -> dict[str, Any]:
  start = time.perf_counter()
  images, labels = map(sharding_lib.to_host, method.training_set(state))
  evaluation = evaluate_images(config, data, images, labels,
                               jax.random.fold_in(keys.evaluate, step))
  seconds = time.perf_counter() - start
  print(f'step {step}: {evaluation["model"]} test accuracy {evaluation["mean"]:.2f} +- '
        f'{evaluation["std"]:.2f} over {len(evaluation["accuracies"])} networks '
        f'({seconds:.0f}s)', flush=True)
  workdir_lib.append_metrics(os.path.join(workdir, 'metrics.jsonl'),
                             {'step': step, 'eval': evaluation, 'eval_seconds': seconds})
  dataset = data.dataset
  pixels = np.asarray(dataset.denormalize(sharding_lib.to_host(state.images), clip=True))
  workdir_lib.write_png(os.path.join(workdir, 'images', f'step_{step:06d}.png'),
                        workdir_lib.image_grid(pixels, rows=dataset.num_classes))
  return evaluation

"""The pretrained feature pool of class centralization: build once, store, reuse.

    pool = get_or_train_pool(settings, dataset, lowering)  # loads settings.directory or trains
    extractor = extractors.pool_extractor(pool)      # draws members for a distillation step

The reference (Deng et al., CVPR 2024) pretrains 1000 ResNet18 (instance norm) on the real
training set for 40 epochs each (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
constant lr, no augmentation) and draws one member at random every distillation iteration;
class centralization acts on its pooled features (`embed`). Drawing is `dd_jax.extractors`'.
The interpolated extractor of DANCE and NCFM mixes a member's initial state (`initial_variables`,
recomputed, not stored) with its final one (`interpolate`).

Member i is trained from its own key fold_in(key(seed), i) alone, so the members do not depend
on how many are trained together (`parallel`; see train.over_networks) or on the lowering beyond
float rounding.

Layout of a pool directory:

    <dir>/members/<start>-<end>/       Orbax checkpoint of the stacked variables of members
                                       [start, end) (one training chunk)
    <dir>/members/<start>-<end>.json   that chunk's record, written after its checkpoint: the
                                       pool's identity, the members' test accuracies, seconds
    <dir>/metadata.json                written last and atomically: marks the pool complete

A build that is interrupted resumes from its completed chunks (same settings, same `parallel`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dd_jax import data as data_lib
from dd_jax import models, progress
from dd_jax import settings as settings_lib
from dd_jax import train as train_lib
from dd_jax import workdir as workdir_lib
from dd_jax.lowering import Lowering

# Version of the on-disk layout and of the training recipe; a change makes old pools mismatch.
FORMAT_VERSION = 1

# The metadata fields that identify a pool (what `pool_metadata` returns); a stored pool is
# reused only when all of them match. Other metadata fields (accuracies, timing, chunks) inform.
IDENTITY_FIELDS = (
  'format_version',
  'dataset',
  'num_classes',
  'image_shape',
  'num_train_images',
  'mean',
  'std',
  'model',
  'size',
  'epochs',
  'batch_size',
  'lr',
  'momentum',
  'weight_decay',
  'seed',
  'training',
)

_METADATA_FILE = 'metadata.json'
_MEMBERS_DIR = 'members'


@dataclasses.dataclass(frozen=True)
class PoolSettings(settings_lib.Settings):
  """How the pool is trained and where it is stored (config section `pool`).

  Attributes:
    model: registry name of the members' architecture (e.g. 'ResNet18').
    size: number of members.
    epochs: training epochs of every member.
    recipe: the SGD recipe (config fields `batch_size`, `lr`, `momentum`, `weight_decay`); the lr
      is constant.
    schedule, milestones, gamma: the lr schedule (`train.TrainSettings`): 'constant' (the IID
      reference's pool), or 'multistep' at these fractions of the epochs (the IDC family's:
      (2/3, 5/6) x 0.2).
    augment_strategy, augment_mode: the augmentation of every minibatch ('' none; 'idc' with
      'color_crop': the IDC family's DiffAug with per-image parameters).
    cutmix_probability: CutMix per minibatch (the IDC family's pools: 0.5).
    parallel: members trained together (train.over_networks); does not change the members.
    seed: member i is trained from fold_in(key(seed), i).
    directory: where the pool is stored (config field `dir`; `from_config` makes it absolute,
      or `default_pool_dir` when empty).
  """

  model: str = settings_lib.field('ResNet18', choices=models.network_names)
  size: int = settings_lib.field(1000, check=settings_lib.POSITIVE)
  epochs: int = settings_lib.field(40, check=settings_lib.POSITIVE)
  recipe: train_lib.OptimizerRecipe = train_lib.OptimizerRecipe()
  schedule: str = settings_lib.field('constant', choices=train_lib.SCHEDULES)
  milestones: tuple[float, ...] = ()
  gamma: float = train_lib.MULTISTEP_GAMMA
  augment_strategy: str = ''
  augment_mode: str = settings_lib.field('dsa', choices=train_lib.AUGMENT_MODES)
  cutmix_probability: float = 0.0
  parallel: int = settings_lib.field(8, check=settings_lib.POSITIVE)
  seed: int = settings_lib.field(0, check=settings_lib.NON_NEGATIVE)
  directory: str = settings_lib.field('', config_name='dir')

  def check(self) -> None:
    object.__setattr__(self, 'milestones', tuple(self.milestones))  # hashable
    self.train_settings()  # its checks name the same fields

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, dataset: data_lib.DatasetSettings
  ) -> PoolSettings:
    """The settings of section `pool` of the experiment config; an empty `dir` becomes
    `default_pool_dir` of the dataset.

    Raises:
      ValueError: a value out of range, naming it as `config.pool.<field>`.
    """
    recipe = settings_lib.from_section(train_lib.OptimizerRecipe, config.pool, 'pool')
    settings = settings_lib.from_section(cls, config.pool, 'pool', recipe=recipe)
    directory = settings.directory or default_pool_dir(settings, dataset)
    return dataclasses.replace(settings, directory=os.path.abspath(directory))

  def train_settings(self) -> train_lib.TrainSettings:
    """Per-member training."""
    return train_lib.TrainSettings(
      epochs=self.epochs,
      recipe=self.recipe,
      augment_strategy=self.augment_strategy,
      schedule=self.schedule,
      milestones=self.milestones,
      gamma=self.gamma,
      augment_mode=self.augment_mode,
      cutmix_probability=self.cutmix_probability,
    )

  def training(self) -> dict[str, Any]:
    """The recipe beyond SGD's numbers, as pool metadata records it."""
    return {
      'schedule': self.schedule,
      'milestones': [float(m) for m in self.milestones],
      'gamma': float(self.gamma),
      'augment_strategy': self.augment_strategy,
      'augment_mode': self.augment_mode,
      'cutmix_probability': float(self.cutmix_probability),
    }


# Pools saved before the recipe was recorded were trained with this one.
_DEFAULT_TRAINING = PoolSettings(size=1).training()


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
  """A trained pool.

  Attributes:
    net: the members' architecture.
    variables: the members' variables stacked on a leading axis of length `size`, as host
      (numpy) arrays: a step sends only its drawn members to the device.
    metadata: `pool_metadata(...)` plus 'test_accuracies' (percent, one per member),
      'mean_test_accuracy' (on the dataset's held-out split, 'held_out': 'test' or 'validation'),
      'train_seconds', 'parallel', 'chunks' ([start, end) pairs) and
      'chunk_seconds'.
    settings: the settings it was built with (`initial_variables` recomputes its members'
      starting points from them), or None when unknown.
  """

  net: models.Network
  variables: Any
  metadata: dict[str, Any]
  settings: PoolSettings | None = None

  @property
  def size(self) -> int:
    """Number of members."""
    return int(jax.tree_util.tree_leaves(self.variables)[0].shape[0])


def pool_metadata(dataset: data_lib.Dataset, settings: PoolSettings) -> dict[str, Any]:
  """What identifies a pool: the data it was trained on and how (JSON-serialisable).

  Args:
    dataset: the real dataset the members are trained on.
    settings: the training settings (`parallel` is left out: it does not change the members).

  Returns:
    A dict with exactly the keys of `IDENTITY_FIELDS`.
  """
  return {
    'format_version': FORMAT_VERSION,
    'dataset': dataset.name,
    'num_classes': int(dataset.num_classes),
    'image_shape': [int(d) for d in dataset.image_shape],
    'num_train_images': int(len(dataset.train_images)),
    'mean': [float(m) for m in dataset.mean],
    'std': [float(s) for s in dataset.std],
    'model': settings.model,
    'size': int(settings.size),
    'epochs': int(settings.epochs),
    'batch_size': int(settings.recipe.batch_size),
    'lr': float(settings.recipe.lr),
    'momentum': float(settings.recipe.momentum),
    'weight_decay': float(settings.recipe.weight_decay),
    'seed': int(settings.seed),
    'training': settings.training(),
  }


def _chunks(size: int, parallel: int) -> list[tuple[int, int]]:
  """[start, end) member ranges trained together; the last one may be shorter."""
  return [(start, min(start + parallel, size)) for start in range(0, size, parallel)]


def _member_keys(seed: int, start: int, end: int) -> jax.Array:
  """[end - start] typed PRNG keys of members start..end-1: fold_in(key(seed), i)."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(start, end))


@functools.partial(jax.jit, static_argnames=('net', 'input_shape', 'settings'))
def _init_chunk(
  keys: jax.Array,
  net: models.Network,
  input_shape: tuple[int, ...],
  settings: train_lib.TrainSettings,
) -> train_lib.TrainCarry:
  return train_lib.init_networks(keys, net, input_shape, settings.recipe.optimizer())


# The images are arguments, not closed-over constants: a training set must not be baked into the
# compiled program. The carry is donated (the previous epoch's state is never needed again).
@functools.partial(
  jax.jit, static_argnames=('net', 'settings', 'lowering', 'progress_every'), donate_argnums=(0,)
)
def _train_epoch(
  carry: train_lib.TrainCarry,
  epoch_index: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  net: models.Network,
  settings: train_lib.TrainSettings,
  lowering: Lowering,
  progress_every: int,
) -> train_lib.TrainCarry:
  with lowering.precision_scope():
    epoch = train_lib.make_epoch_fn(net, images, labels, settings, lowering, progress_every)
    return train_lib.over_networks(epoch, lowering.loop_networks)(carry, epoch_index)


@functools.partial(jax.jit, static_argnames=('net', 'lowering'))
def _test_accuracies(
  variables: Any,
  test_images: jax.Array,
  test_labels: jax.Array,
  net: models.Network,
  lowering: Lowering,
) -> jax.Array:
  with lowering.precision_scope():
    return train_lib.accuracies(variables, net, test_images, test_labels)


def _abstract_chunk(net: models.Network, image_shape: tuple[int, ...], num_members: int) -> Any:
  """Shapes and dtypes (on the default device) of `num_members` stacked variables."""
  keys = jax.random.split(jax.random.key(0), num_members)
  shapes = jax.eval_shape(jax.vmap(lambda k: net.init(k, (1, *image_shape))), keys)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes
  )


def _chunk_path(directory: str, start: int, end: int) -> str:
  return os.path.join(directory, _MEMBERS_DIR, f'{start:06d}-{end:06d}')


def _save_chunk(
  directory: str, start: int, end: int, variables: Any, record: dict[str, Any]
) -> None:
  """Writes members [start, end) (stacked variables) and then their record (marks completion)."""
  path = _chunk_path(directory, start, end)
  if os.path.exists(path + '.json'):
    os.remove(path + '.json')
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, variables)
  checkpointer.wait_until_finished()
  checkpointer.close()
  workdir_lib.write_json(path + '.json', {**record, 'start': start, 'end': end})


def _restore_chunk(
  directory: str, start: int, end: int, net: models.Network, image_shape: tuple[int, ...]
) -> Any:
  """The stacked variables of members [start, end), as host numpy arrays."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(
      _chunk_path(directory, start, end), _abstract_chunk(net, image_shape, end - start)
    )
  finally:
    checkpointer.close()
  return jax.device_get(restored)


def _read_chunk_record(directory: str, start: int, end: int) -> dict[str, Any] | None:
  path = _chunk_path(directory, start, end) + '.json'
  return workdir_lib.read_json(path) if os.path.isfile(path) else None


def _check_identity(
  found: dict[str, Any], expected: dict[str, Any], directory: str, what: str
) -> None:
  """Raises ValueError listing every identifying field where `found` differs from `expected`."""
  missing = '<absent>'
  found = {'training': _DEFAULT_TRAINING, **found}
  differences = [
    f'  {field}: built for {found.get(field, missing)!r}, wanted {expected.get(field, missing)!r}'
    for field in IDENTITY_FIELDS
    if found.get(field, missing) != expected.get(field, missing)
  ]
  if differences:
    raise ValueError(
      f'{directory} holds {what} built for different data or settings:\n'
      + '\n'.join(differences)
      + f'\nChoose another directory with --config.pool.dir=<dir>, or delete {directory} to '
      'rebuild the pool there.'
    )


def _stack_on_host(chunks: list[Any]) -> Any:
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *chunks)


def _mark_complete(directory: str, metadata: dict[str, Any]) -> None:
  """Writes metadata.json (atomically, last) and removes chunk files it does not list."""
  workdir_lib.write_json(os.path.join(directory, _METADATA_FILE), metadata)
  listed = {os.path.basename(_chunk_path(directory, s, e)) for s, e in metadata['chunks']}
  members_dir = os.path.join(directory, _MEMBERS_DIR)
  for name in os.listdir(members_dir):
    if name.removesuffix('.json') not in listed:  # left by a build with another `parallel`
      path = os.path.join(members_dir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def train_pool(
  dataset: data_lib.Dataset,
  settings: PoolSettings,
  lowering: Lowering,
  *,
  test_images: jax.Array | None = None,
  log: Callable[[str], Any] = print,
  directory: str | None = None,
) -> Pool:
  """Trains the pool's `size` members on the full training set, `parallel` at a time.

  Args:
    dataset: the real dataset; all its training images (normalised) are the training set.
    settings: the pool settings.
    lowering: how the members are computed and trained together (not what they are).
    test_images: [M, H, W, C] normalised test images (default: dataset.normalize(test_images));
      each member's test accuracy is recorded in the metadata.
    log: called with each progress line (members, epoch, seconds per epoch, ETA).
    directory: if given, every completed chunk of members is saved there as it finishes, and
      chunks already completed there (by an interrupted build of the same pool) are restored
      instead of retrained; metadata.json is written last, marking the pool complete.

  Returns:
    The pool; its variables are stacked on a leading axis of length `settings.size`.

  Raises:
    ValueError: `directory` holds chunks of a pool with different identifying metadata.
  """
  net = models.get_network(settings.model, dataset.num_classes, conv=lowering.train_conv)
  identity = pool_metadata(dataset, settings)
  train_settings = settings.train_settings()
  image_shape = tuple(dataset.image_shape)
  images = dataset.normalize(dataset.train_images)
  labels = jnp.asarray(dataset.train_labels, jnp.int32)
  if test_images is None:
    test_images = dataset.normalize(dataset.test_images)
  test_images = jnp.asarray(test_images, jnp.float32)
  test_labels = jnp.asarray(dataset.test_labels, jnp.int32)

  batches = train_lib.full_batches(len(labels), train_settings)
  every = progress.every_for(batches, ticks_wanted=20)
  chunks = _chunks(settings.size, settings.parallel)
  member_variables, accuracies, chunk_seconds = [], [], []
  steady_epoch_seconds = None  # an epoch's duration without compilation, for the ETA
  for chunk_index, (start, end) in enumerate(chunks):
    record = _read_chunk_record(directory, start, end) if directory else None
    if record is not None:
      _check_identity(record, identity, directory, 'a partial pool build')
      member_variables.append(_restore_chunk(directory, start, end, net, image_shape))
      accuracies.extend(record['test_accuracies'])
      chunk_seconds.append(record['seconds'])
      log(
        f'pool: members {start + 1}-{end} of {settings.size} restored from '
        f'{_chunk_path(directory, start, end)}'
      )
      continue
    chunk_start_time = time.perf_counter()
    carry = _init_chunk(_member_keys(settings.seed, start, end), net, image_shape, train_settings)
    for epoch in range(settings.epochs):
      epoch_start_time = time.perf_counter()
      # A bar through each epoch (the first also compiles): ticks counted from epoch 0.
      ticks = (epoch + 1) * batches // every - epoch * batches // every
      description = f'pool: members {start + 1}-{end}, epoch {epoch + 1}/{settings.epochs}'
      with progress.bar(ticks * (end - start if lowering.loop_networks else 1), description):
        carry = _train_epoch(
          carry,
          jnp.asarray(epoch, jnp.int32),
          images,
          labels,
          net,
          train_settings,
          lowering,
          every,
        )
        jax.block_until_ready(carry)
      epoch_seconds = time.perf_counter() - epoch_start_time
      if epoch > 0 or steady_epoch_seconds is None:
        steady_epoch_seconds = epoch_seconds
      # Remaining work in epochs of this chunk's size (a shorter last chunk counts less).
      remaining = (settings.epochs - epoch - 1) + sum(
        settings.epochs * (e - s) / (end - start) for s, e in chunks[chunk_index + 1 :]
      )
      log(
        f'pool: members {start + 1}-{end} of {settings.size}, epoch {epoch + 1}/'
        f'{settings.epochs}, {epoch_seconds:.1f} s/epoch, ETA '
        f'{workdir_lib.format_duration(remaining * steady_epoch_seconds)}'
      )
    variables = carry[0]
    if test_images.shape[0]:
      chunk_accuracies = [
        round(100.0 * float(a), 4)
        for a in _test_accuracies(variables, test_images, test_labels, net, lowering)
      ]
    else:
      chunk_accuracies = [None] * (end - start)
    variables = jax.device_get(variables)  # finished members wait on the host
    seconds = time.perf_counter() - chunk_start_time
    if directory:
      _save_chunk(
        directory,
        start,
        end,
        variables,
        {**identity, 'test_accuracies': chunk_accuracies, 'seconds': seconds},
      )
    member_variables.append(variables)
    accuracies.extend(chunk_accuracies)
    chunk_seconds.append(seconds)

  known = [a for a in accuracies if a is not None]
  metadata = {
    **identity,
    'test_accuracies': accuracies,
    'mean_test_accuracy': float(np.mean(known)) if known else None,
    'held_out': dataset.held_out,  # what the 'test' accuracies were measured on
    'train_seconds': float(sum(chunk_seconds)),
    'parallel': int(settings.parallel),
    'chunks': [list(c) for c in chunks],
    'chunk_seconds': chunk_seconds,
  }
  if directory:
    _mark_complete(directory, metadata)
  return Pool(
    net=net, variables=_stack_on_host(member_variables), metadata=metadata, settings=settings
  )


def load_pool(directory: str, expected_metadata: dict[str, Any], lowering: Lowering) -> Pool | None:
  """The complete pool saved under `directory`, or None if there is none.

  Args:
    directory: the pool directory.
    expected_metadata: `pool_metadata(dataset, settings)` of the pool wanted.
    lowering: how the members' network is computed.

  Returns:
    The pool (variables on the host), or None when `directory` holds no complete
    pool (missing, empty, or an unfinished build without metadata.json).

  Raises:
    ValueError: the complete pool there was built for other data or settings; the message lists
      each differing field and the fix.
  """
  directory = os.path.abspath(directory)
  metadata_path = os.path.join(directory, _METADATA_FILE)
  if not os.path.isfile(metadata_path):
    return None
  metadata = workdir_lib.read_json(metadata_path)
  _check_identity(metadata, expected_metadata, directory, 'a pool')
  net = models.get_network(metadata['model'], metadata['num_classes'], conv=lowering.train_conv)
  image_shape = tuple(metadata['image_shape'])
  chunks = [
    _restore_chunk(directory, start, end, net, image_shape) for start, end in metadata['chunks']
  ]
  return Pool(net=net, variables=_stack_on_host(chunks), metadata=metadata)


def _dataset_slug(spec: str) -> str:
  """A readable, filesystem-safe and unique name of a dataset spec (config.dataset.name).

  E.g. 'folder:/a/b/cifar10' -> 'cifar10-<hash>', 'tfds:cifar10' -> 'cifar10-<hash>', where the
  8-hex-digit hash is of the full spec (paths made absolute, so relative spellings agree).
  """
  source, sep, arg = spec.partition(':')
  if sep and source in ('folder', 'npz'):
    arg = os.path.abspath(os.path.expanduser(arg))
    full, readable = f'{source}:{arg}', os.path.basename(arg.rstrip(os.sep)) or source
  elif sep:
    full, readable = spec, arg
  else:
    full, readable = spec, spec
  readable = re.sub(r'[^A-Za-z0-9._-]+', '-', readable).strip('-.') or 'dataset'
  return f'{readable}-{hashlib.sha256(full.encode()).hexdigest()[:8]}'


def default_pool_dir(settings: PoolSettings, dataset: data_lib.DatasetSettings) -> str:
  """<cache>/pools/<dataset-slug>_<model>_<size>x<epochs>_seed<seed>[_val<fraction>s<seed>].

  <cache> is dataset.cache_dir, else $DD_JAX_CACHE, else ~/.cache/dd_jax; a recipe other than
  the default (constant lr, no augmentation) adds _<schedule>_<hash of the recipe>. Settings not
  in the name (lr, batch size, ...) are checked against the stored metadata when loading.
  """
  cache = dataset.cache_dir or data_lib.default_cache_dir()
  name = (
    f'{_dataset_slug(dataset.name)}_{settings.model}_{settings.size}x{settings.epochs}'
    f'_seed{settings.seed}'
  )
  if dataset.validation_fraction:  # trained without the held-out part: another pool
    name += f'_val{dataset.validation_fraction:g}s{dataset.validation_seed}'
  if settings.training() != _DEFAULT_TRAINING:  # another recipe: another pool
    recipe = json.dumps(settings.training(), sort_keys=True).encode()
    name += f'_{settings.schedule}_{hashlib.sha256(recipe).hexdigest()[:8]}'
  return os.path.join(cache, 'pools', name)


def get_or_train_pool(
  settings: PoolSettings,
  dataset: data_lib.Dataset,
  lowering: Lowering,
  log: Callable[[str], Any] = print,
  *,
  test_images: jax.Array | None = None,
) -> Pool:
  """The pool of `settings` for `dataset`: loaded from `settings.directory` if saved there, else
  trained (resumably) and saved there.

  Args:
    settings: the pool settings, with their directory.
    dataset: the real dataset.
    lowering: how the members are computed and trained.
    log: called with progress and summary lines.
    test_images: normalised test images, if already at hand (else normalised here).

  Returns:
    The pool.

  Raises:
    ValueError: the pool directory holds a pool built for other data or settings.
  """
  directory = settings.directory
  expected = pool_metadata(dataset, settings)
  pool = load_pool(directory, expected, lowering)
  if pool is not None:
    log(
      f'pool: loaded {pool.size} {pool.net.name} members from {directory} '
      f'({_accuracy_summary(pool.metadata)})'
    )
    return dataclasses.replace(pool, settings=settings)
  log(
    f'pool: no complete pool at {directory}; training {settings.size} {settings.model} x '
    f'{settings.epochs} epochs on {dataset.name}, {settings.parallel} at a time'
  )
  pool = train_pool(
    dataset, settings, lowering, test_images=test_images, log=log, directory=directory
  )
  log(
    f'pool: saved {pool.size} members to {directory} ({_accuracy_summary(pool.metadata)}, '
    f'trained in {workdir_lib.format_duration(pool.metadata["train_seconds"])})'
  )
  return pool


def _accuracy_summary(metadata: dict[str, Any]) -> str:
  mean, split = metadata.get('mean_test_accuracy'), metadata.get('held_out', 'test')
  return f'no {split} accuracy' if mean is None else f"members' mean {split} accuracy {mean:.2f}%"


def member_logits(pool: Pool, member: int, images: Any, batch_size: int = 1000) -> jax.Array:
  """[N, K] logits of pool member `member` (its final weights, eval mode) on [N, H, W, C]
  normalised images, in batches of `batch_size`."""
  variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x[member]), pool.variables)
  apply = jax.jit(pool.net.apply)
  images = jnp.asarray(images, jnp.float32)
  return jnp.concatenate(
    [apply(variables, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
  )


def initial_variables(
  settings: PoolSettings,
  net: models.Network,
  image_shape: tuple[int, ...],
  start: int = 0,
  end: int | None = None,
) -> Any:
  """The variables members [start, end) of the pool started training from, bitwise.

  The pool stores its members' final states only; the interpolated extractor of DANCE and NCFM
  (`interpolate`) also needs their initial states, which this recomputes from the pool's seed
  exactly as `train_pool` drew them (a member's do not depend on the chunk it was trained in).

  Args:
    settings: the pool's settings (its seed; its recipe's optimizer, part of the initial carry).
    net: the pool's network (`Pool.net`).
    image_shape: [H, W, C] of the pool's training images.
    start: the first member.
    end: one past the last member; None: `settings.size`.

  Returns:
    The members' initial variables stacked on a leading axis of length end - start, as host
    (numpy) arrays, like `Pool.variables`.

  Raises:
    ValueError: not 0 <= start < end <= settings.size.
  """
  end = settings.size if end is None else end
  if not 0 <= start < end <= settings.size:
    raise ValueError(
      f'initial_variables: members [{start}, {end}) are not a non-empty range of the pool '
      f'of {settings.size}.'
    )
  keys = _member_keys(settings.seed, start, end)
  shape = tuple(int(d) for d in image_shape)
  return jax.device_get(_init_chunk(keys, net, shape, settings.train_settings())[0])


def interpolate(initial: Any, final: Any, lam: float | jax.Array) -> Any:
  """The interpolated ("middle") extractor: lam * initial + (1 - lam) * final, leaf by leaf.

  DANCE's and NCFM's theta_mid (docs/method.md): every variable is interpolated, norm
  affine parameters (and any normalisation statistics) included. lam = 0 gives `final` and lam = 1
  `initial`, exactly for finite values. Safe under `jax.jit` with a traced `lam`.

  Args:
    initial: a variables pytree of floating arrays (e.g. one member of `initial_variables`).
    final: a pytree of the same structure, shapes and dtypes (the trained member).
    lam: a scalar, usually in [0, 1]; cast to each leaf's dtype.

  Returns:
    The interpolated variables (jax arrays), structured as `final`.

  Raises:
    ValueError: the structures or a leaf's shape differ, or a leaf is not floating.
  """

  def mix(path, a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    name = jax.tree_util.keystr(path)
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
        f'interpolate: {name} is {a.dtype}{list(a.shape)} in initial but '
        f'{b.dtype}{list(b.shape)} in final.'
      )
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f'interpolate: {name} is {a.dtype}, not floating.')
    weight = jnp.asarray(lam, a.dtype)
    return weight * a + (1 - weight) * b

  return jax.tree_util.tree_map_with_path(mix, initial, final)

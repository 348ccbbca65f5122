"""`load_dataset`: one entry point for every data source, selected by a spec string; and
`open_dataset`, the dataset of a run's `DatasetSettings` (config section `dataset`)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import zipfile
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from dd_jax import keys as keys_lib
from dd_jax import settings as settings_lib
from dd_jax.data.dataset import (
  KNOWN_STATS,
  DataError,
  Dataset,
  compute_channel_stats,
  hold_out_validation,
  known_dataset_key,
)
from dd_jax.data.folder import load_folder

SOURCES = ('digits', 'tfds:<name>', 'folder:<path>', 'npz:<path>')
_TFDS_BATCH = 1024  # records per random-access read
_PROGRESS_MIN_RECORDS = 2000


class _Loaded(NamedTuple):
  """What a source reader returns; `stats` = (mean, std) stored with the data, if any."""

  name: str
  class_names: tuple[str, ...]
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def load_dataset(
  spec: str,
  *,
  data_dir: str | None = None,
  cache_dir: str | None = None,
  normalization: str = 'auto',
) -> Dataset:
  """Loads a dataset into host memory.

  Sources (`spec`):
    'digits': scikit-learn's 8x8 digits (1797 images, 10 classes), pixel values 0..16 mapped to
      uint8 by round(v * 255 / 16), shape [N, 8, 8, 1]. Fixed stratified split:
      `train_test_split(test_size=0.25, stratify=y, random_state=0)` -> 1347 train / 450 test.
    'tfds:<name>': a prepared TFDS dataset (e.g. mnist, fashion_mnist, svhn_cropped, cifar10,
      cifar100; any dataset with 'image' and 'label' features and 'train'/'test' splits), read with
      `tfds.data_source(..., download=False)` from `data_dir` (default: TFDS's). Preparing needs
      TensorFlow: `python -m dd_jax.data.prepare_tfds <name> --data_dir=<dir>`.
    'folder:<path>': ImageFolder (train/<class>/*, test/<class>/*) or tiny-imagenet-200 layout,
      decoded once and cached under `cache_dir` (see `dd_jax.data.folder`).
    'npz:<path>': a .npz file with x_train, y_train, x_test, y_test (uint8 [N, H, W, C] or
      [N, H, W]; integer labels) and optionally class_names [K] (str), mean [C] and std [C]
      (in [0, 1] pixel units).

  Args:
    spec: the source, as above (config field `dataset.name`).
    data_dir: TFDS data directory (tfds sources only).
    cache_dir: decoded-image cache for folder sources; default $DD_JAX_CACHE or ~/.cache/dd_jax.
    normalization: 'auto' (mean/std stored in an npz file, else the reference code's constants
      when the dataset is known by name, e.g. 'cifar10' or a folder named 'tiny-imagenet-200', else
      computed from the training split), 'computed' (always from the training split), or a
      known dataset name (one of `KNOWN_STATS`) to force its constants.

  Returns:
    The `Dataset`.

  Raises:
    DataError: the spec, path, files or normalization are unusable (the message says how to fix).
  """
  try:
    forced_key = _check_normalization(normalization)
    source, _, arg = spec.partition(':')
    if spec == 'digits':
      loaded = _load_digits()
    elif source in ('tfds', 'folder', 'npz') and not arg:
      raise DataError(f'missing {"name" if source == "tfds" else "path"} after "{source}:"')
    elif source == 'tfds':
      loaded = _load_tfds(arg, data_dir)
    elif source == 'folder':
      loaded = _Loaded(*load_folder(arg, cache_dir))
    elif source == 'npz':
      loaded = _load_npz(arg)
    else:
      raise DataError(f'unknown data source; valid sources: {", ".join(SOURCES)}')

    if forced_key is not None:
      mean, std = KNOWN_STATS[forced_key]
    elif normalization == 'auto' and loaded.stats is not None:
      mean, std = loaded.stats
    elif normalization == 'auto' and known_dataset_key(loaded.name) is not None:
      mean, std = KNOWN_STATS[known_dataset_key(loaded.name)]
    else:
      mean, std = compute_channel_stats(loaded.x_train)
    num_channels = loaded.x_train.shape[-1]
    if len(mean) != num_channels:
      raise DataError(
        f'normalization constants {mean} have {len(mean)} channel(s) but the images '
        f'have {num_channels}; use normalization="computed"'
      )
    return Dataset(
      name=loaded.name,
      train_images=loaded.x_train,
      train_labels=loaded.y_train,
      test_images=loaded.x_test,
      test_labels=loaded.y_test,
      class_names=loaded.class_names,
      mean=mean,
      std=std,
    )
  except DataError as e:
    raise DataError(f'dataset.name={spec!r}: {e}') from e.__cause__


def _check_normalization(normalization: str) -> str | None:
  """Validates `normalization`; returns the forced KNOWN_STATS key, if any."""
  if normalization in ('auto', 'computed'):
    return None
  key = known_dataset_key(normalization)
  if key is None:
    raise DataError(
      f'unknown normalization {normalization!r}; use "auto", "computed" or one of '
      f'{", ".join(KNOWN_STATS)}'
    )
  return key


def _load_digits() -> _Loaded:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=0.25, stratify=labels, random_state=0
  )
  class_names = tuple(str(c) for c in range(10))
  return _Loaded('digits', class_names, x_train, y_train, x_test, y_test)


def _check_every_class_present(path, class_names, y_train, y_test) -> None:
  """Raises `DataError` naming the classes without training or test images.

  Without it, labels that are not 0..K-1 (1-based, or a gap) surface later as a class with 0
  images, e.g. in an `ipc` message that suggests ipc <= 0.
  """
  for split, labels in (('y_train', y_train), ('y_test', y_test)):
    if labels.size == 0:
      raise DataError(f'{path}: {split} is empty')
    if labels.min() < 0 or labels.max() >= len(class_names):
      raise DataError(
        f'{path}: {split} holds labels in [{labels.min()}, {labels.max()}] but there are '
        f'{len(class_names)} class_names; labels must be 0..{len(class_names) - 1}'
      )
    counts = np.bincount(labels, minlength=len(class_names))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      present = np.flatnonzero(counts)
      raise DataError(
        f'{path}: {len(empty)} of the {len(class_names)} classes have no images in {split} '
        f'(classes {_head(empty)}; the labels present are {_head(present)}). Labels must be '
        '0..K-1 with every class in both splits: remap them (e.g. 1-based labels to 0-based), '
        'or give class_names that list only the classes present.'
      )


def _head(values: np.ndarray, count: int = 10) -> str:
  return str(values[:count].tolist())[:-1] + (', ...]' if values.size > count else ']')


def _as_nhwc_uint8(images: np.ndarray, what: str) -> np.ndarray:
  if images.ndim == 3:  # [N, H, W] grayscale
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DataError(
      f'{what} must be uint8 [N, H, W, C] or [N, H, W], got {images.dtype} {images.shape}'
    )
  return images


def _load_npz(path: str) -> _Loaded:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise DataError(f'file {path} does not exist')
  if not zipfile.is_zipfile(path):
    raise DataError(f'{path} is not an .npz archive (write it with np.savez)')
  with np.load(path, allow_pickle=False) as arrays:
    missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in arrays.files]
    if missing:
      raise DataError(
        f'{path} lacks the array(s) {", ".join(missing)}; an npz source needs '
        f'x_train, y_train, x_test, y_test (optional: class_names, mean, std)'
      )
    x_train = _as_nhwc_uint8(arrays['x_train'], f'{path}: x_train')
    x_test = _as_nhwc_uint8(arrays['x_test'], f'{path}: x_test')
    y_train, y_test = arrays['y_train'], arrays['y_test']
    for name, images, labels in (('train', x_train, y_train), ('test', x_test, y_test)):
      if not len(images):
        raise DataError(
          f'{path}: x_{name} holds no images; an npz source needs images in both splits'
        )
      if labels.shape != (len(images),):
        one_hot = labels.ndim == 2 and labels.shape[0] == len(images)
        raise DataError(
          f'{path}: y_{name} has shape {labels.shape}, but labels must be integer class ids of '
          f'shape ({len(images)},), one per image of x_{name}'
          + ('; these look one-hot: save y.argmax(axis=1)' if one_hot else '')
        )
    if not (np.issubdtype(y_train.dtype, np.integer) and np.issubdtype(y_test.dtype, np.integer)):
      raise DataError(f'{path}: y_train / y_test must be integer labels')
    if min(y_train.min(), y_test.min()) < 0:
      raise DataError(f'{path}: labels must be class ids >= 0 (y_train / y_test hold negatives)')
    if 'class_names' in arrays.files:
      class_names = tuple(str(c) for c in arrays['class_names'])
    else:
      class_names = tuple(str(c) for c in range(int(max(y_train.max(), y_test.max())) + 1))
    _check_every_class_present(path, class_names, y_train, y_test)
    stored_stats = None
    if 'mean' in arrays.files and 'std' in arrays.files:
      stored_stats = (tuple(arrays['mean'].tolist()), tuple(arrays['std'].tolist()))
  name = os.path.splitext(os.path.basename(path))[0]
  return _Loaded(
    name,
    class_names,
    x_train,
    y_train.astype(np.int32),
    x_test,
    y_test.astype(np.int32),
    stored_stats,
  )


def _not_prepared_message(name: str, data_dir: str | None) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  target = data_dir or getattr(tfds.core.constants, 'DATA_DIR', '~/tensorflow_datasets')
  return (
    f'TFDS dataset {name!r} is not prepared in {target} (dd_jax reads it with '
    f'download=False). Prepare it once (needs TensorFlow and network access):\n'
    f"    pip install 'dd_jax[prepare]'\n"
    f'    python -m dd_jax.data.prepare_tfds {name} --data_dir={target}\n'
    f'or use a folder source instead: dataset.name="folder:/path/to/{name}" '
    f'(<path>/train/<class>/*, <path>/test/<class>/*)'
  )


@contextlib.contextmanager
def _tfds_warnings_silenced():
  """TFDS logs warnings about unprepared folders (through absl) that our own message explains."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _load_tfds(name: str, data_dir: str | None) -> _Loaded:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with _tfds_warnings_silenced():
    return _read_tfds(tfds, name, data_dir)


def _read_tfds(tfds: Any, name: str, data_dir: str | None) -> _Loaded:
  try:
    sources = {
      split: tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      for split in ('train', 'test')
    }
  except tfds.core.registered.DatasetNotFoundError as e:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split(':')[0].split('/')[0], known, n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ' (see tfds.list_builders())'
    raise DataError(f'TFDS has no dataset named {name!r}{hint}') from e
  except Exception as e:  # pylint: disable=broad-except
    # Unprepared data surfaces as a NotImplementedError about TFRECORD; say what to run instead.
    # (The builder is only consulted on failure: under tfds.testing.mock_data it claims to be
    # unprepared although data_source works.)
    if not tfds.builder(name, data_dir=data_dir).is_prepared():
      raise DataError(_not_prepared_message(name, data_dir)) from e
    raise DataError(
      f'TFDS dataset {name!r} is prepared but cannot be read with random access ({e}); '
      f'prepare it again in array_record format: python -m dd_jax.data.prepare_tfds {name}'
      + (f' --data_dir={data_dir}' if data_dir else '')
    ) from e
  class_names = tuple(tfds.builder(name, data_dir=data_dir).info.features['label'].names)
  splits = [_read_tfds_split(sources[split], f'{name}/{split}') for split in ('train', 'test')]
  (x_train, y_train), (x_test, y_test) = splits
  return _Loaded(name.split(':')[0], class_names, x_train, y_train, x_test, y_test)


def _read_tfds_split(source, what: str) -> tuple[np.ndarray, np.ndarray]:
  """All records of a TFDS data source -> (uint8 [N, H, W, C], int32 [N])."""
  num_records = len(source)
  if num_records == 0:
    raise DataError(f'TFDS split {what} is empty')
  first = source[0]
  if 'image' not in first or 'label' not in first:
    raise DataError(f'TFDS split {what} needs "image" and "label" features, has {sorted(first)}')
  image_shape, image_dtype = np.shape(first['image']), np.asarray(first['image']).dtype
  if image_dtype != np.uint8:
    raise DataError(f'TFDS split {what}: images must be uint8, got {image_dtype}')
  images = np.empty((num_records, *image_shape), np.uint8)
  labels = np.empty(num_records, np.int32)
  batched = True  # __getitems__ is much faster, but raises under tfds.testing.mock_data
  with tqdm(
    total=num_records,
    desc=f'reading {what}',
    leave=False,
    disable=num_records < _PROGRESS_MIN_RECORDS,
  ) as progress:
    for start in range(0, num_records, _TFDS_BATCH):
      indices = list(range(start, min(start + _TFDS_BATCH, num_records)))
      records = None
      if batched:
        try:
          records = source.__getitems__(indices)
        except Exception:  # pylint: disable=broad-except
          batched = False
      if records is None:
        records = [source[i] for i in indices]
      for i, record in zip(indices, records):
        if np.shape(record['image']) != image_shape:
          raise DataError(
            f'TFDS split {what}: record {i} has image shape '
            f'{np.shape(record["image"])}, record 0 has {image_shape}'
          )
        images[i] = record['image']
        labels[i] = record['label']
      progress.update(len(indices))
  return _as_nhwc_uint8(images, f'TFDS split {what} images'), labels


@dataclasses.dataclass(frozen=True)
class DatasetSettings(settings_lib.Settings):
  """Which data a run uses (config section `dataset`; see `dd_jax.config` for each field).

  Attributes:
    name: the source spec (`load_dataset`).
    data_dir: TFDS data directory ('' = TFDS's default).
    cache_dir: decoded-image and pool cache ('' = $DD_JAX_CACHE or ~/.cache/dd_jax).
    normalization: 'auto', 'computed' or a known dataset's name.
    validation_fraction: fraction of every training class held out as validation data, in
      [0, 1); 0: accuracies are measured on the test set.
    validation_seed: the split's seed.
  """

  name: str = 'tfds:cifar10'
  data_dir: str = ''
  cache_dir: str = ''
  normalization: str = 'auto'
  validation_fraction: float = 0.0
  validation_seed: int = settings_lib.field(0, check=settings_lib.NON_NEGATIVE)

  def check(self) -> None:
    if not 0.0 <= self.validation_fraction < 1.0:
      raise settings_lib.SettingError(
        'validation_fraction',
        self.validation_fraction,
        'must lie in [0, 1): the fraction of each class held out for validation (e.g. 0.1), '
        'or 0 to evaluate on the test set',
      )

  @classmethod
  def from_config(cls, config: Any) -> DatasetSettings:
    return settings_lib.from_section(cls, config.dataset, 'dataset')


def open_dataset(settings: DatasetSettings) -> Dataset:
  """The dataset of `settings`, with its validation split held out if asked for."""
  dataset = load_dataset(
    settings.name,
    data_dir=settings.data_dir or None,
    cache_dir=settings.cache_dir or None,
    normalization=settings.normalization,
  )
  if settings.validation_fraction:
    dataset = hold_out_validation(
      dataset,
      settings.validation_fraction,
      keys_lib.run_key(settings.validation_seed, 'validation'),
    )
  return dataset

"""The in-memory `Dataset`, normalisation, and the checks shared by every data source."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np


class DataError(ValueError):
  """A data source or dataset setting is unusable; the message says what is wrong and the fix."""


HELD_OUT_SPLITS = ('test', 'validation')

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Per-channel (mean, std) in [0, 1] pixel units, exactly as in the reference code.
KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  'mnist': ((0.1307,), (0.3081,)),
  'fashion_mnist': ((0.2861,), (0.3530,)),
  'svhn_cropped': ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
  'cifar100': ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
  'tiny_imagenet': _IMAGENET_STATS,
  'imagenet': _IMAGENET_STATS,
}

# Spellings (lower case, punctuation removed) that mean a known dataset, e.g. a folder called
# 'tiny-imagenet-200' or 'CIFAR-10', or the TFDS name 'svhn_cropped'.
_ALIASES = {
  'mnist': 'mnist',
  'fashionmnist': 'fashion_mnist',
  'svhn': 'svhn_cropped',
  'svhncropped': 'svhn_cropped',
  'cifar10': 'cifar10',
  'cifar100': 'cifar100',
  'tinyimagenet': 'tiny_imagenet',
  'tinyimagenet200': 'tiny_imagenet',
  'imagenet': 'imagenet',
  'imagenet2012': 'imagenet',
  'imagenet1k': 'imagenet',
}


def known_dataset_key(name: str) -> str | None:
  """The `KNOWN_STATS` key that `name` refers to, or None.

  Matching ignores case, punctuation and a TFDS version/config suffix, so 'cifar10', 'CIFAR-10',
  'cifar10:3.0.2' and 'tiny-imagenet-200' are all recognised.
  """
  base = name.split(':')[0].split('/')[0]
  return _ALIASES.get(re.sub(r'[^a-z0-9]', '', base.lower()))


def compute_channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units.

  Args:
    images: uint8 [N, H, W, C].

  Returns:
    (mean, std), each a tuple of C floats.
  """
  num_channels = images.shape[-1]
  pixels = images.reshape(-1, num_channels)
  total = np.zeros(num_channels, np.float64)
  total_sq = np.zeros(num_channels, np.float64)
  # Chunked float64 sums: exact enough (integers < 2**53) without a full float copy of the data.
  for start in range(0, len(pixels), 1 << 22):
    chunk = pixels[start : start + (1 << 22)].astype(np.float64)
    total += chunk.sum(0)
    total_sq += np.square(chunk).sum(0)
  count = max(len(pixels), 1)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return tuple(float(m) / 255.0 for m in mean), tuple(float(s) / 255.0 for s in std)


def normalize(images: jax.Array | np.ndarray, mean, std) -> jax.Array:
  """uint8 pixels -> float32 `(x / 255 - mean) / std`, per channel. Works inside `jax.jit`.

  Args:
    images: uint8 (or float pixel values 0..255) [..., C].
    mean, std: C floats in [0, 1] pixel units.

  Returns:
    float32 array with the shape of `images`.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(x: jax.Array | np.ndarray, mean, std, *, clip: bool = False) -> jax.Array:
  """The inverse of `normalize`: normalised float -> pixel values 0..255 (float32).

  `denormalize(normalize(u8), mean, std)` equals `u8` (as float) to rounding.

  Args:
    x: float [..., C] in normalised space.
    mean, std: C floats in [0, 1] pixel units.
    clip: clip to [0, 255] (for display or saving; synthetic images can leave the range).

  Returns:
    float32 array with the shape of `x`.
  """
  std, mean = jnp.asarray(std, jnp.float32), jnp.asarray(mean, jnp.float32)
  pixels = (jnp.asarray(x, jnp.float32) * std + mean) * 255.0
  return jnp.clip(pixels, 0.0, 255.0) if clip else pixels


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled image classification dataset held in host memory.

  Attributes:
    name: dataset name (e.g. 'cifar10', 'digits', a folder's basename).
    train_images: uint8 [N, H, W, C] (NHWC).
    train_labels: int32 [N], values in [0, num_classes).
    test_images: uint8 [M, H, W, C].
    test_labels: int32 [M].
    class_names: K names; label k is `class_names[k]`.
    mean: C per-channel means in [0, 1] pixel units, used by `normalize`.
    std: C per-channel standard deviations in [0, 1] pixel units.
    held_out: what test_images are: 'test' (the dataset's test split) or 'validation' (a part
      of its training split held out by `hold_out_validation`).
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  held_out: str = 'test'

  def __post_init__(self):
    set_field = lambda field, value: object.__setattr__(self, field, value)  # frozen
    set_field('class_names', tuple(str(c) for c in self.class_names))
    if len(self.class_names) < 2:
      raise DataError(
        f'{self.name} has {len(self.class_names)} class ({", ".join(self.class_names)}); '
        'distillation and its evaluation need at least two classes'
      )
    set_field('mean', tuple(float(m) for m in self.mean))
    set_field('std', tuple(float(s) for s in self.std))
    for split in ('train', 'test'):
      images = getattr(self, f'{split}_images')
      labels = np.asarray(getattr(self, f'{split}_labels'))
      if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
          f'{self.name}: {split}_images must be uint8 [N, H, W, C], '
          f'got {images.dtype} {images.shape}'
        )
      if labels.shape != (len(images),):
        raise DataError(
          f'{self.name}: {split}_labels must have shape ({len(images)},), got {labels.shape}'
        )
      if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
        raise DataError(
          f'{self.name}: {split}_labels must lie in [0, {len(self.class_names)}), '
          f'got [{labels.min()}, {labels.max()}]'
        )
      set_field(f'{split}_labels', labels.astype(np.int32, copy=False))
    if self.test_images.shape[1:] != self.train_images.shape[1:]:
      raise DataError(
        f'{self.name}: train images are {self.train_images.shape[1:]} but test '
        f'images are {self.test_images.shape[1:]}'
      )
    num_channels = self.train_images.shape[-1]
    if len(self.mean) != num_channels or len(self.std) != num_channels:
      raise DataError(
        f'{self.name}: mean/std need {num_channels} values (one per channel), '
        f'got mean={self.mean} std={self.std}'
      )
    if min(self.std) <= 0:
      raise DataError(f'{self.name}: std must be positive, got {self.std}')
    if self.held_out not in HELD_OUT_SPLITS:
      raise DataError(
        f'{self.name}: held_out must be one of {HELD_OUT_SPLITS}, got {self.held_out}'
      )

  def __repr__(self) -> str:  # the default repr would print the arrays
    return (
      f'Dataset(name={self.name!r}, train={self.train_images.shape}, '
      f'{self.held_out}={self.test_images.shape}, num_classes={self.num_classes}, '
      f'mean={self.mean}, std={self.std})'
    )

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C)."""
    return tuple(self.train_images.shape[1:])

  def train_class_counts(self) -> np.ndarray:
    """int64 [K]: number of training images of each class."""
    return np.bincount(self.train_labels, minlength=self.num_classes)

  def normalize(self, images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 [..., C] -> float32 normalised with this dataset's mean/std (jit-safe)."""
    return normalize(images, self.mean, self.std)

  def denormalize(self, x: jax.Array | np.ndarray, *, clip: bool = False) -> jax.Array:
    """Normalised float [..., C] -> pixel values 0..255, the inverse of `normalize` (jit-safe)."""
    return denormalize(x, self.mean, self.std, clip=clip)


def check_ipc(dataset: Dataset, ipc: int) -> None:
  """Raises `DataError` unless 1 <= ipc <= the training count of the smallest class.

  Real-image initialisation draws `ipc` distinct training images per class, so every class
  must have at least that many.
  """
  if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or ipc <= 0:
    raise DataError(f'ipc must be a positive integer (images per class), got {ipc!r}')
  counts = dataset.train_class_counts()
  smallest = int(np.argmin(counts))
  if counts[smallest] == 0:
    raise DataError(
      f'class {smallest} ({dataset.class_names[smallest]!r}) of {dataset.name!r} has no training '
      'images: every class needs some (are the labels 0..K-1?)'
    )
  if ipc > counts[smallest]:
    raise DataError(
      f'ipc={ipc} is larger than the {counts[smallest]} training images of class {smallest} '
      f'({dataset.class_names[smallest]!r}), the smallest class of {dataset.name!r}; '
      f'use ipc <= {counts[smallest]}'
    )


def hold_out_validation(dataset: Dataset, fraction: float, key: jax.Array) -> Dataset:
  """The dataset with a stratified, seeded part of its training split held out for validation.

  Class k keeps round(fraction * n_k) of its n_k training images (at least 1, at most n_k - 1)
  as validation data, drawn by a permutation from fold_in(key, k); the rest stay training data.
  The test split is dropped, so nothing computed on the result can see it. Normalisation stays
  the dataset's (for 'computed' statistics, those of the whole training split: a per-channel
  mean and std, not a choice tuned on the validation data).

  Args:
    dataset: a dataset whose test images are its test split.
    fraction: in (0, 1).
    key: PRNG key of the split (the same key gives the same split).

  Returns:
    A Dataset with held_out='validation': train_* the remaining training images (original
    order), test_* the validation images (class by class).

  Raises:
    DataError: a fraction outside (0, 1), a dataset already split, or a class with fewer than
      2 training images.
  """
  if not 0.0 < fraction < 1.0:
    raise DataError(
      f'config.dataset.validation_fraction={fraction!r} must lie in (0, 1) (0 disables it).'
    )
  if dataset.held_out != 'test':
    raise DataError(f'{dataset.name}: a validation split is already held out.')
  counts = dataset.train_class_counts()
  if counts.min() < 2:
    smallest = int(np.argmin(counts))
    raise DataError(
      f'config.dataset.validation_fraction: class {smallest} '
      f'({dataset.class_names[smallest]!r}) has {counts[smallest]} training image(s), too few '
      'to hold one out; use validation_fraction=0.'
    )
  held = []
  for class_id, count in enumerate(counts):
    members = np.flatnonzero(dataset.train_labels == class_id)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, class_id), len(members)))
    size = min(max(int(round(fraction * count)), 1), int(count) - 1)
    held.append(members[order[:size]])
  held = np.concatenate(held)
  keep = np.ones(len(dataset.train_labels), bool)
  keep[held] = False
  return dataclasses.replace(
    dataset,
    train_images=dataset.train_images[keep],
    train_labels=dataset.train_labels[keep],
    test_images=dataset.train_images[held],
    test_labels=dataset.train_labels[held],
    held_out='validation',
  )

"""Class-balanced sampling of real training images, on device and without replacement.

    sampler = ClassSampler.from_dataset(dataset)            # device-resident uint8 images
    batch = sample_class(sampler, key, class_id, n)          # uint8 [n, H, W, C]
    batches = sample_all_classes(sampler, key, n)            # uint8 [K, n, H, W, C]
    firsts = first_of_all_classes(sampler, n)                # the first n of every class
    images, labels = sample_uniform(sampler, key, n)         # n images from the whole set

Both functions are jitted with `n` static and can be called inside other jitted / vmapped code
(`class_id` and `key` may be traced).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.data.dataset import DataError, Dataset


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=['images', 'labels', 'class_indices', 'class_counts'],
  meta_fields=['smallest_class', 'smallest_count'],
)
@dataclasses.dataclass(frozen=True)
class ClassSampler:
  """Training images grouped by class, as a pytree of device arrays.

  Attributes:
    images: uint8 [N, H, W, C], all training images.
    labels: int32 [N], their labels.
    class_indices: int32 [K, max_count]; row k lists the indices (into `images`) of class k's
      images in its first class_counts[k] slots; the remaining slots are padding.
    class_counts: int32 [K], number of images per class.
    smallest_class: (static) id of the class with the fewest images.
    smallest_count: (static) its count: the largest `n` that can be drawn from every class.
  """

  images: jax.Array
  labels: jax.Array
  class_indices: jax.Array
  class_counts: jax.Array
  smallest_class: int
  smallest_count: int

  @property
  def num_classes(self) -> int:
    return self.class_indices.shape[0]

  @classmethod
  def create(
    cls, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None
  ) -> ClassSampler:
    """Groups images by label and puts everything on the default device.

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N], values in [0, num_classes).
      num_classes: K; default max(labels) + 1.

    Raises:
      DataError: some class has no images (nothing could be drawn for it).
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(np.argmin(counts))
    if counts[smallest] == 0:
      raise DataError(f'class {smallest} has no training images; cannot sample from it')
    class_indices = np.zeros((num_classes, counts.max()), np.int32)
    order = np.argsort(labels, kind='stable')
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for k in range(num_classes):
      class_indices[k, : counts[k]] = order[starts[k] : starts[k] + counts[k]]
    return cls(
      images=jax.device_put(np.asarray(images)),
      labels=jax.device_put(labels.astype(np.int32)),
      class_indices=jax.device_put(class_indices),
      class_counts=jax.device_put(counts.astype(np.int32)),
      smallest_class=smallest,
      smallest_count=int(counts[smallest]),
    )

  @classmethod
  def from_dataset(cls, dataset: Dataset) -> ClassSampler:
    """A sampler over `dataset`'s training split."""
    return cls.create(dataset.train_images, dataset.train_labels, dataset.num_classes)


def _check_sample_size(sampler: ClassSampler, n: int) -> None:
  if not isinstance(n, int) or n <= 0:
    raise DataError(f'n must be a positive (static) integer, got {n!r}')
  if n > sampler.smallest_count:
    raise DataError(
      f'cannot draw n={n} images per class without replacement: class '
      f'{sampler.smallest_class} has only {sampler.smallest_count} training images'
    )


@functools.partial(jax.jit, static_argnames='n')
def sample_class_indices(
  sampler: ClassSampler, key: jax.Array, class_id: jax.Array | int, n: int
) -> jax.Array:
  """Indices (into `sampler.images`) of n distinct images of class `class_id`, uniformly at random.

  Args:
    sampler: the `ClassSampler`.
    key: PRNG key.
    class_id: int scalar (may be traced).
    n: static; 1 <= n <= the smallest class count (checked at trace time).

  Returns:
    int32 [n].
  """
  _check_sample_size(sampler, n)
  max_count = sampler.class_indices.shape[1]
  # A uniform random score per slot, +inf on padding; the n smallest scores form a uniformly
  # random n-subset of the real slots (top_k is cheaper than a full permutation).
  scores = jax.random.uniform(key, (max_count,))
  scores = jnp.where(jnp.arange(max_count) < sampler.class_counts[class_id], scores, jnp.inf)
  _, slots = jax.lax.top_k(-scores, n)
  return sampler.class_indices[class_id, slots]


@functools.partial(jax.jit, static_argnames='n')
def sample_class(
  sampler: ClassSampler, key: jax.Array, class_id: jax.Array | int, n: int
) -> jax.Array:
  """n distinct training images of class `class_id`: uint8 [n, H, W, C].

  See `sample_class_indices` for the arguments.
  """
  return sampler.images[sample_class_indices(sampler, key, class_id, n)]


@functools.partial(jax.jit, static_argnames='n')
def sample_all_classes(sampler: ClassSampler, key: jax.Array, n: int) -> jax.Array:
  """n distinct images of every class, independent draws per class.

  Args:
    sampler: the `ClassSampler`.
    key: PRNG key; class k uses `jax.random.split(key, K)[k]`.
    n: static; 1 <= n <= the smallest class count.

  Returns:
    uint8 [K, n, H, W, C], row k from class k.
  """
  keys = jax.random.split(key, sampler.num_classes)
  class_ids = jnp.arange(sampler.num_classes)
  return jax.vmap(lambda k, c: sample_class(sampler, k, c, n))(keys, class_ids)


@functools.partial(jax.jit, static_argnames='n')
def first_of_all_classes(sampler: ClassSampler, n: int) -> jax.Array:
  """The first n images of every class, in dataset order (NCFM's fixed real subset).

  Args:
    sampler: the `ClassSampler`.
    n: static; 1 <= n <= the smallest class count.

  Returns:
    uint8 [K, n, H, W, C], row k from class k.
  """
  if not isinstance(n, int) or not 0 < n <= sampler.smallest_count:
    raise DataError(
      f'n must be an integer in [1, {sampler.smallest_count}] (the smallest class), got {n!r}'
    )
  return sampler.images[sampler.class_indices[:, :n]]


@functools.partial(jax.jit, static_argnames='n')
def sample_uniform(sampler: ClassSampler, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """n distinct training images drawn uniformly from the whole set, with their labels.

  Args:
    sampler: the `ClassSampler`.
    key: PRNG key.
    n: static; 1 <= n <= the number of training images.

  Returns:
    (uint8 [n, H, W, C] images, int32 [n] labels).
  """
  num_images = sampler.images.shape[0]
  if not isinstance(n, int) or not 0 < n <= num_images:
    raise DataError(f'n must be an integer in [1, {num_images}] (the training set size), got {n!r}')
  # The n smallest of N uniform scores: a uniformly random n-subset (cheaper than a permutation).
  _, indices = jax.lax.top_k(-jax.random.uniform(key, (num_images,)), n)
  return sampler.images[indices], sampler.labels[indices]


def random_real_subset(key: jax.Array, labels: np.ndarray, ipc: int) -> np.ndarray:
  """Indices of `ipc` random training images per class, class-blocked (on the host).

  The random-real baseline's set and the real initialisation of synthetic images.

  Args:
    key: PRNG key; class k draws from fold_in(key, k).
    labels: [N] training labels.
    ipc: images per class.

  Returns:
    [K * ipc] indices, class 0's first.
  """
  labels = np.asarray(labels)
  indices = []
  for class_id in range(int(labels.max()) + 1):
    members = np.flatnonzero(labels == class_id)
    chosen = jax.random.choice(
      jax.random.fold_in(key, class_id), len(members), (ipc,), replace=False
    )
    indices.append(members[np.asarray(chosen)])
  return np.concatenate(indices)

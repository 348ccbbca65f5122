"""Reading a synthetic set from a file, from dd_jax or another codebase, checked against a dataset.

    synthetic = read_set(path, dataset, factor=None, scale='auto', protocol_factor=2)
    synthetic.images   # [N', H, W, C] normalised with the dataset's mean/std, decoded
    synthetic.labels   # [N'] int

Formats (by content, not by name):
- dd_jax's `synthetic.npz` (keys 'images' in [0, 1], 'labels', 'class_names', 'mean', 'std',
  and from 2026-12 'normalized_images', the exact array the run evaluated, and 'step'): the
  images are already decoded (factor 1).
- a plain .npz with 'images' ([N, H, W, C] or [N, C, H, W]) and 'labels' ([N] int).
- a PyTorch file (.pt / .pth; needs torch): DM's reference layout `{'data': [[images, labels],
  ...]}` (one pair per experiment; `index` picks one), a pair `[images, labels]` (the IDC family
  saves its stored images so), or a dict with 'images' and 'labels'; images NCHW.
Pixel scale ('scale'): 'pixels' ([0, 1], or [0, 255] for integer arrays), 'normalized' (with the
dataset's mean and std, as dd_jax and DM's reference normalise), or 'auto': normalised if any
value is negative, else pixels. Foreign files are decoded with `factor` (default the protocol's:
the IDC family stores factor-2 multi-formation images).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np

from dd_jax import multiformation
from dd_jax.data import Dataset

SCALES = ('auto', 'pixels', 'normalized')
# Normalised values beyond this are not a normalised image set (a misread scale or layout).
_MAX_NORMALIZED = 100.0


class SetError(ValueError):
  """A synthetic-set file that cannot be read or does not fit the dataset (one line)."""


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
  """A synthetic set ready to evaluate.

  Attributes:
    images: [N, H, W, C] float32, normalised with the dataset's mean and std, decoded.
    labels: [N] int32.
    stored: the number of stored images (before decoding).
    factor: the multi-formation factor it was decoded with (1: none).
    source: 'dd_jax', 'npz' or 'torch'.
    scale: how the file stored the images: 'pixels' or 'normalized'.
    step: the iterations of the dd_jax run that wrote it (its evaluation key), else None.
  """

  images: np.ndarray
  labels: np.ndarray
  stored: int
  factor: int
  source: str
  scale: str
  step: int | None = None

  @property
  def ipc(self) -> int:
    """Stored images per class (the storage budget)."""
    return self.stored // max(1, len(np.unique(self.labels)))


def _torch_arrays(path: str, index: int) -> tuple[Any, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel  (optional)
  except ImportError:
    raise SetError(
      f'--synthetic={path} is a PyTorch file, and reading it needs torch: '
      '`pip install torch` (CPU wheels suffice), or save the arrays with numpy.savez.'
    ) from None
  try:
    saved = torch.load(path, map_location='cpu', weights_only=False)
  except Exception as error:  # pylint: disable=broad-except  (any unreadable file)
    raise SetError(f'--synthetic={path} is not readable by torch.load ({error}).') from None
  if isinstance(saved, dict) and 'data' in saved:  # DM's reference: one [images, labels] per exp
    pairs = saved['data']
    if not 0 <= index < len(pairs):
      raise SetError(
        f'--synthetic={path} holds {len(pairs)} experiments; --index={index} is out of range.'
      )
    saved = pairs[index]
  if isinstance(saved, dict) and {'images', 'labels'} <= set(saved):
    saved = (saved['images'], saved['labels'])
  if not (isinstance(saved, (list, tuple)) and len(saved) == 2):
    raise SetError(
      f'--synthetic={path}: expected {{"data": [[images, labels], ...]}} (DM), '
      '[images, labels] or {"images", "labels"}.'
    )
  images, labels = (np.asarray(x.detach().cpu().numpy()) for x in saved)
  return np.transpose(images, (0, 2, 3, 1)), labels


def _is_npz(path: str) -> bool:
  """An npz is a zip of .npy files; PyTorch's files are zips too (of a pickle and storages)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return all(name.endswith('.npy') for name in archive.namelist())


def _read_arrays(path: str, index: int) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
  """(images, labels, source, extras) as the file holds them; images NHWC."""
  if not os.path.isfile(path):
    raise SetError(f'--synthetic={path} does not exist (or is not a file).')
  if _is_npz(path):
    try:
      with np.load(path, allow_pickle=False) as saved:
        arrays = {key: saved[key] for key in saved.files}
    except Exception as error:  # pylint: disable=broad-except  (any damage)
      raise SetError(f'--synthetic={path} is an unreadable npz ({error}).') from None
    if not {'images', 'labels'} <= set(arrays):
      raise SetError(
        f'--synthetic={path} has arrays {sorted(arrays)}; it needs "images" and "labels".'
      )
    images = arrays['images']
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
      images = np.transpose(images, (0, 2, 3, 1))  # NCHW, as PyTorch codes keep them
    source = 'dd_jax' if {'class_names', 'mean', 'std'} <= set(arrays) else 'npz'
    return images, arrays['labels'], source, arrays
  images, labels = _torch_arrays(path, index)
  return images, labels, 'torch', {}


def _normalized(
  images: np.ndarray, scale: str, dataset: Dataset, path: str
) -> tuple[np.ndarray, str]:
  values = images.astype(np.float32)
  if scale == 'auto':
    scale = 'normalized' if values.min() < 0 else 'pixels'
  if scale == 'pixels':
    if np.issubdtype(images.dtype, np.integer) or values.max() > 1.0:
      if values.max() > 255 or values.min() < 0:
        raise SetError(f'--synthetic={path}: pixel values span [{values.min()}, {values.max()}].')
      values = values / 255.0
    return (values - np.asarray(dataset.mean)) / np.asarray(dataset.std), scale
  if np.abs(values).max() > _MAX_NORMALIZED:
    raise SetError(
      f'--synthetic={path}: values reach {np.abs(values).max():.3g}, not a normalised image '
      'set; pixel values? (--images=pixels)'
    )
  return values, scale


def read_set(
  path: str,
  dataset: Dataset,
  *,
  factor: int | None = None,
  scale: str = 'auto',
  protocol_factor: int = 1,
  index: int = 0,
) -> SyntheticSet:
  """Reads, checks and decodes a synthetic set for `dataset`, before any training.

  Args:
    path: the file (see the module docstring for the formats).
    dataset: the dataset it is evaluated on (image shape, classes, normalisation).
    factor: the multi-formation factor to decode with; None: 1 for dd_jax files (decoded
      already), `protocol_factor` for the others.
    scale: one of `SCALES`.
    protocol_factor: the evaluation protocol's factor.
    index: the experiment of a DM reference file.

  Returns:
    The set.

  Raises:
    SetError: unreadable, or images whose size or channels, or labels whose classes, do not fit
      the dataset (one line naming the file and what differs).
  """
  if scale not in SCALES:
    raise SetError(f'--images={scale!r} is not valid; choose one of {list(SCALES)}.')
  images, labels, source, extras = _read_arrays(path, index)
  if images.ndim != 4:
    raise SetError(f'--synthetic={path}: images have shape {images.shape}, not [N, H, W, C].')
  if images.shape[1:] != tuple(dataset.image_shape):
    raise SetError(
      f'--synthetic={path}: images are {images.shape[1:]} (H, W, C) but {dataset.name} images '
      f'are {tuple(dataset.image_shape)}: wrong --dataset?'
    )
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
    raise SetError(
      f'--synthetic={path}: {len(labels)} labels of type {labels.dtype} for {len(images)} '
      'images; one integer label per image is needed.'
    )
  if labels.min() < 0 or labels.max() >= dataset.num_classes:
    raise SetError(
      f'--synthetic={path}: labels span {labels.min()}..{labels.max()} but {dataset.name} has '
      f'{dataset.num_classes} classes (0..{dataset.num_classes - 1}): wrong --dataset?'
    )
  step = int(extras['step']) if 'step' in extras else None
  exact = extras.get('normalized_images')
  if (
    source == 'dd_jax'
    and exact is not None
    and scale == 'auto'
    and np.allclose(extras['mean'], dataset.mean)
    and np.allclose(extras['std'], dataset.std)
  ):
    normalized, scale = exact.astype(np.float32), 'normalized'  # what the run evaluated
  else:
    normalized, scale = _normalized(images, scale, dataset, path)
  if factor is None:
    factor = 1 if source == 'dd_jax' else protocol_factor
  stored = len(images)
  if factor > 1:
    order = np.argsort(labels, kind='stable')  # class-blocked, as decode_classes needs
    normalized, labels = normalized[order], labels[order]
    counts = np.bincount(labels, minlength=dataset.num_classes)
    if len(set(counts[counts > 0])) != 1 or (counts == 0).any():
      raise SetError(
        f'--synthetic={path}: decoding with factor {factor} needs the same number of images in '
        f'every class (counts {counts.tolist()}); --factor=1 if the set is not multi-formation.'
      )
    try:
      decoded, labels = multiformation.decode_classes(
        normalized, labels, dataset.num_classes, factor
      )
    except ValueError as error:
      raise SetError(f'--synthetic={path}: {error}') from None
    normalized = np.asarray(decoded)
  return SyntheticSet(
    images=np.asarray(normalized, np.float32),
    labels=np.asarray(labels, np.int32),
    stored=stored,
    factor=factor,
    source=source,
    scale=scale,
    step=step,
  )

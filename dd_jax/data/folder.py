"""Image folders (ImageFolder and tiny-imagenet-200 layouts), decoded once and cached as .npz.

Layouts (class order = sorted class folder names / wnids in both):

  ImageFolder:        <root>/train/<class>/**/<image>, <root>/test/<class>/**/<image>
                      ('val' is accepted when there is no 'test'; images may sit in sub-folders)
  tiny-imagenet-200:  <root>/train/<wnid>/images/*.JPEG, <root>/val/images/*.JPEG and
                      <root>/val/val_annotations.txt ('filename<TAB>wnid<TAB>...'); val is the
                      test split, the unlabelled <root>/test is ignored. Detected by the
                      annotations file.

Images are decoded with PIL. The dataset has 1 channel when every image is grayscale, otherwise
3 (RGB; grayscale images are replicated, alpha is dropped). The decoded arrays are cached in
`<cache_dir>/<basename>-<fingerprint>.npz`, where the fingerprint hashes the absolute root path and
every image's relative path, class, size and mtime, so editing the folder invalidates the cache.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dd_jax import workdir as workdir_lib
from dd_jax.data.dataset import DataError

IMAGE_EXTENSIONS = frozenset(
  {'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm'}
)
_GRAYSCALE_MODES = frozenset({'1', 'L', 'LA', 'I', 'I;16', 'F'})
_CACHE_VERSION = 'dd_jax-folder-v1'  # bump when the decoding rules change
_PROGRESS_MIN_IMAGES = 2000  # no progress bar for small folders

# (path relative to root, class index) per image.
_Listing = list[tuple[str, int]]


def default_cache_dir() -> str:
  """$DD_JAX_CACHE, else ~/.cache/dd_jax."""
  return os.environ.get('DD_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'dd_jax')


def _is_image(name: str) -> bool:
  return not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def _images_under(root: str, rel_dir: str) -> list[str]:
  """Sorted relative paths of all image files below root/rel_dir (recursively)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, rel_dir)):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel = os.path.relpath(dirpath, root)
    found.extend(os.path.join(rel, f) for f in filenames if _is_image(f))
  return sorted(found)


def _list_class_folders(root: str, split_dir: str) -> dict[str, list[str]]:
  """{class name: relative image paths} for root/split_dir/<class>/**; empty classes raise."""
  per_class = {
    c: _images_under(root, os.path.join(split_dir, c))
    for c in _subdirs(os.path.join(root, split_dir))
  }
  if not per_class:
    raise DataError(f'{os.path.join(root, split_dir)} has no class folders')
  for class_name, files in per_class.items():
    if not files:
      raise DataError(
        f'class folder {os.path.join(root, split_dir, class_name)} contains no '
        f'images (extensions: {", ".join(sorted(IMAGE_EXTENSIONS))})'
      )
  return per_class


def _check_same_classes(train: set[str], test: set[str], root: str) -> None:
  if train != test:
    only = lambda s: ', '.join(sorted(s)[:10]) + (' ...' if len(s) > 10 else '') or '-'
    raise DataError(
      f'{root}: train and test class sets differ; only in train: '
      f'{only(train - test)}; only in test: {only(test - train)}'
    )


def _list_folder(root: str) -> tuple[str, list[str], _Listing, _Listing]:
  """Returns (layout, class_names, train listing, test listing) without opening any image."""
  if not os.path.isdir(os.path.join(root, 'train')):
    raise DataError(
      f'{root} has no train/ folder; expected <root>/train/<class>/* and '
      f'<root>/test/<class>/* (or the tiny-imagenet-200 layout)'
    )
  annotations = os.path.join(root, 'val', 'val_annotations.txt')
  if os.path.isfile(annotations):
    layout = 'tiny-imagenet'
    train_per_class = _list_class_folders(root, 'train')
    test_pairs = []
    with open(annotations) as f:
      for line_no, line in enumerate(f, 1):
        if line.strip():
          fields = line.rstrip('\n').split('\t')
          if len(fields) < 2:
            raise DataError(
              f'{annotations}:{line_no}: expected "filename<TAB>wnid...", got {line!r}'
            )
          test_pairs.append((os.path.join('val', 'images', fields[0]), fields[1]))
    if not test_pairs:
      raise DataError(f'{annotations} lists no images')
    for rel_path, _ in test_pairs:
      if not os.path.isfile(os.path.join(root, rel_path)):
        raise DataError(f'{annotations} lists {rel_path}, which does not exist')
    _check_same_classes(set(train_per_class), {wnid for _, wnid in test_pairs}, root)
  else:
    test_dir = 'test' if os.path.isdir(os.path.join(root, 'test')) else 'val'
    if not os.path.isdir(os.path.join(root, test_dir)):
      raise DataError(f'{root} has train/ but no test/ (or val/) folder')
    layout = 'imagefolder'
    train_per_class = _list_class_folders(root, 'train')
    test_per_class = _list_class_folders(root, test_dir)
    _check_same_classes(set(train_per_class), set(test_per_class), root)
    test_pairs = [(p, c) for c, files in test_per_class.items() for p in files]
  class_names = sorted(train_per_class)
  class_index = {c: i for i, c in enumerate(class_names)}
  train = [(p, class_index[c]) for c, files in train_per_class.items() for p in files]
  test = sorted((p, class_index[c]) for p, c in test_pairs)
  return layout, class_names, train, test


def _fingerprint(
  root: str, layout: str, class_names: list[str], train: _Listing, test: _Listing
) -> str:
  """sha256 over the root path and every file's (relative path, class, size, mtime)."""
  digest = hashlib.sha256(f'{_CACHE_VERSION}\0{root}\0{layout}\0{class_names}'.encode())
  for split, listing in (('train', train), ('test', test)):
    for rel_path, label in listing:
      stat = os.stat(os.path.join(root, rel_path))
      digest.update(f'{split}\0{rel_path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def _decode(path: str) -> np.ndarray:
  """uint8 [H, W] for a grayscale image, uint8 [H, W, 3] otherwise."""
  try:
    with Image.open(path) as image:
      image = image.convert('L' if image.mode in _GRAYSCALE_MODES else 'RGB')
      return np.asarray(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot decode image {path}: {e}') from e


def _decode_all(paths: list[str], desc: str) -> np.ndarray:
  """Decodes equally sized images into uint8 [N, H, W, C]; fails fast on the first bad file."""
  first = _decode(paths[0])
  height, width = first.shape[:2]
  images = np.empty((len(paths), height, width, 3), np.uint8)
  is_gray = np.zeros(len(paths), bool)
  # Serial on purpose: a thread or process pool measured no faster on 2 cores (PIL holds the GIL
  # for small images; processes pay for pickling), and it is a one-off cost before caching.
  progress = tqdm(
    paths, desc=desc, leave=False, mininterval=1.0, disable=len(paths) < _PROGRESS_MIN_IMAGES
  )
  for i, path in enumerate(progress):
    image = _decode(path)
    if image.shape[:2] != (height, width):
      raise DataError(
        f'images differ in size: {paths[0]} is {width}x{height} (WxH) but '
        f'{path} is {image.shape[1]}x{image.shape[0]}; resize them to one size'
      )
    is_gray[i] = image.ndim == 2
    images[i] = image[..., None] if image.ndim == 2 else image
  return np.ascontiguousarray(images[..., :1]) if is_gray.all() else images


def _load_cache(path: str) -> dict[str, np.ndarray] | None:
  try:
    with np.load(path, allow_pickle=False) as cached:
      return {key: cached[key] for key in ('x_train', 'y_train', 'x_test', 'y_test', 'class_names')}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    warnings.warn(f'ignoring unreadable cache file {path} ({e}); decoding again', stacklevel=2)
    return None


def _save_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes atomically, so readers never see a partial cache; a failure only warns."""
  try:
    with workdir_lib.atomic_write(path, every_process=True) as f:  # each host its own cache
      np.savez(f, **arrays)  # uncompressed: loading 60k CIFAR images takes a fraction of a second
  except OSError as e:
    warnings.warn(
      f'could not write the dataset cache {path} ({e}); the next load decodes again',
      stacklevel=2,
    )


def load_folder(
  path: str, cache_dir: str | None = None
) -> tuple[str, tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads an image folder, from the .npz cache when the folder is unchanged.

  Args:
    path: the dataset root (ImageFolder or tiny-imagenet-200 layout, see the module docstring).
    cache_dir: where decoded arrays are cached; default `default_cache_dir()`.

  Returns:
    (name = the root's basename, class_names, train_images uint8 [N, H, W, C],
     train_labels int32 [N], test_images uint8 [M, H, W, C], test_labels int32 [M]).
  """
  root = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
  if not os.path.isdir(root):
    raise DataError(f'folder {root} does not exist (or is not a directory)')
  name = os.path.basename(root)
  layout, class_names, train, test = _list_folder(root)
  fingerprint = _fingerprint(root, layout, class_names, train, test)
  cache_path = os.path.join(cache_dir or default_cache_dir(), f'{name}-{fingerprint[:20]}.npz')

  arrays = _load_cache(cache_path)
  if arrays is None:
    paths = [os.path.join(root, p) for p, _ in train + test]
    images = _decode_all(paths, desc=f'decoding {name}')
    arrays = {
      'x_train': images[: len(train)],
      'y_train': np.array([label for _, label in train], np.int32),
      'x_test': images[len(train) :],
      'y_test': np.array([label for _, label in test], np.int32),
      'class_names': np.array(class_names, dtype=str),
    }
    _save_cache(cache_path, arrays)
  return (
    name,
    tuple(str(c) for c in arrays['class_names']),
    arrays['x_train'],
    arrays['y_train'],
    arrays['x_test'],
    arrays['y_test'],
  )

"""Multi-formation: each stored image holds f x f smaller images in a grid of non-overlapping
crops, and stands for the f * f images obtained by upsampling every crop back to full size.

One implementation for IDM's partition (f = 2, crops in column-major order) and the IDC family's
"single" decode and "mix" initialisation (IDC, DANCE, NCFM, DSDM, M3D: any f, row-major order):

    stored = mix_init(real_of_class, ipc, factor)            # [f*f*ipc, H, W, C] -> [ipc, ...]
    images = decode(stored, factor)                          # [ipc, ...] -> [f*f*ipc, ...]
    images, labels = decode_classes(stored_all, labels_all, num_classes, factor)

Crop order: 'row' numbers the crops row by row (f = 2: top-left, top-right, bottom-left,
bottom-right; IDC's `decode_zoom`), 'column' column by column (f = 2: top-left, bottom-left,
top-right, bottom-right; IDM's initialisation). Decoded images are crop-major: all first crops
of the N stored images, then all second crops, ...

Upsampling is bilinear with half-pixel centres (PyTorch's `nn.Upsample(mode='bilinear')`,
align_corners=False; at the border the nearest pixel is repeated, as PyTorch clamps the source
coordinate). Both resamplings are affine with weights summing to 1, so they commute with the
per-channel normalisation: stored images may be in pixel space or normalised.

H and W must be multiples of f (the references pad or use uneven crops otherwise; refused here).
Pure functions of arrays, safe under `jax.jit`, `jax.vmap` and `jax.grad`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ORDERS = ('row', 'column')
DOWNSAMPLINGS = ('nearest', 'mean')


def _check(factor: int, order: str, height: int, width: int) -> None:
  if factor < 1:
    raise ValueError(f'multi-formation factor={factor} must be >= 1.')
  if order not in ORDERS:
    raise ValueError(f'crop order={order!r} must be one of {", ".join(ORDERS)}.')
  if height % factor or width % factor:
    raise ValueError(
      f'multi-formation with factor={factor} cuts {height}x{width} images into '
      f'{factor}x{factor} crops: the height and width must be multiples of {factor}.'
    )


def split(images: jax.Array, factor: int, order: str = 'row') -> jax.Array:
  """Cuts each image into f x f non-overlapping crops.

  Args:
    images: [N, H, W, C], H and W multiples of `factor`.
    factor: f.
    order: 'row' or 'column' (see the module docstring).

  Returns:
    [f * f, N, H / f, W / f, C]: entry k holds crop k of every image.
  """
  n, height, width, channels = images.shape
  _check(factor, order, height, width)
  h, w = height // factor, width // factor
  grid = images.reshape(n, factor, h, factor, w, channels)  # [n, row, h, column, w, C]
  major, minor = (1, 3) if order == 'row' else (3, 1)
  return grid.transpose(major, minor, 0, 2, 4, 5).reshape(factor * factor, n, h, w, channels)


def assemble(crops: jax.Array, order: str = 'row') -> jax.Array:
  """The inverse of `split`: [f * f, N, h, w, C] -> [N, f * h, f * w, C]."""
  count, n, h, w, channels = crops.shape
  factor = round(count**0.5)
  if factor * factor != count:
    raise ValueError(f'assemble takes f * f crops per image; got {count}.')
  _check(factor, order, factor * h, factor * w)
  grid = crops.reshape(factor, factor, n, h, w, channels)  # [major, minor, n, h, w, C]
  # Back to [n, row, h, column, w, C]; for 'column' the major grid axis is the column.
  axes = (2, 0, 3, 1, 4, 5) if order == 'row' else (2, 1, 3, 0, 4, 5)
  return grid.transpose(axes).reshape(n, factor * h, factor * w, channels)


def decode(images: jax.Array, factor: int, order: str = 'row') -> jax.Array:
  """The f * f images that stored images stand for ("single" decode).

  Args:
    images: [N, H, W, C] stored images, H and W multiples of `factor`.
    factor: f (1: the images themselves).
    order: 'row' (IDC family) or 'column' (IDM).

  Returns:
    [f * f * N, H, W, C], crop-major: row k * N + n is crop k of image n, upsampled x f.
  """
  crops = split(images, factor, order)
  count, n, h, w, channels = crops.shape
  upsampled = jax.image.resize(crops, (count, n, factor * h, factor * w, channels), 'bilinear')
  return upsampled.reshape(count * n, factor * h, factor * w, channels)


def decode_classes(
  images: jax.Array, labels: jax.Array, num_classes: int, factor: int, order: str = 'row'
) -> tuple[jax.Array, jax.Array]:
  """`decode` class by class: a class-blocked stored set -> the class-blocked decoded set.

  Args:
    images: [K * ipc, H, W, C] stored images, class-blocked (ipc rows per class).
    labels: [K * ipc] their labels.
    num_classes: K.
    factor: f.
    order: 'row' or 'column'.

  Returns:
    ([K * f * f * ipc, H, W, C], [K * f * f * ipc]): class c's block is `decode` of its ipc
    stored images; its labels are its ipc labels repeated f * f times (crop-major, as IDC's
    `torch.cat([target] * f * f)`).
  """
  ipc = images.shape[0] // num_classes
  per_class = jax.vmap(functools.partial(decode, factor=factor, order=order))
  decoded = per_class(images.reshape(num_classes, ipc, *images.shape[1:]))
  decoded_labels = jnp.tile(labels.reshape(num_classes, 1, ipc), (1, factor * factor, 1))
  return decoded.reshape(-1, *images.shape[1:]), decoded_labels.reshape(-1)


def downsample(images: jax.Array, factor: int, method: str = 'nearest') -> jax.Array:
  """Shrinks images by f: [..., H, W, C] -> [..., H / f, W / f, C].

  Args:
    images: [..., H, W, C], H and W multiples of `factor`.
    factor: f.
    method: 'nearest': keep pixel (f * i, f * j), the top-left of each f x f block (PyTorch's
      default `F.interpolate` mode at an integer ratio, IDC's "mix" initialisation); 'mean':
      f x f average pooling (IDM's initialisation).

  Returns:
    [..., H / f, W / f, C].
  """
  *leading, height, width, channels = images.shape
  _check(factor, 'row', height, width)
  if method == 'nearest':
    return images[..., ::factor, ::factor, :]
  if method == 'mean':
    blocks = images.reshape(*leading, height // factor, factor, width // factor, factor, channels)
    return jnp.mean(blocks, axis=(-4, -2))
  raise ValueError(f'downsample method={method!r} must be one of {", ".join(DOWNSAMPLINGS)}.')


def mix_init(
  real: jax.Array, ipc: int, factor: int, order: str = 'row', method: str = 'nearest'
) -> jax.Array:
  """Stored images of one class, each tiled with f * f downsampled real images ("mix" init).

  Args:
    real: [f * f * ipc, H, W, C] real images of the class (the IDC family takes the class's
      first f * f * ipc training images).
    ipc: stored images to make.
    factor: f.
    order: crop order: 'row' (IDC family) or 'column' (IDM).
    method: `downsample`'s method: 'nearest' (IDC family) or 'mean' (IDM).

  Returns:
    [ipc, H, W, C]: crop k of stored image i is real image k * ipc + i, downsampled by f, so
    `decode` returns the real images in their order (blurred by the down- and upsampling).
  """
  if real.shape[0] != factor * factor * ipc:
    raise ValueError(
      f'mix_init of {ipc} stored images at factor {factor} takes {factor * factor * ipc} '
      f'real images; got {real.shape[0]}.'
    )
  crops = downsample(real.reshape(factor * factor, ipc, *real.shape[1:]), factor, method)
  return assemble(crops, order)

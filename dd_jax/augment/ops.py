"""Pure, differentiable DSA image ops with explicit parameters.

Every op takes NHWC float images ``[N, H, W, C]`` in normalised space plus one
parameter array of shape ``[N]`` per parameter (one value per image) and returns
images of the same shape and dtype. Randomness lives in :mod:`dd_jax.augment.dsa`;
these functions are deterministic (and jitted, so eager calls are cheap), can be
tested against hand-computed results and are differentiable with respect to the images.

The spatial resampling ops (``scale``, ``rotate``) follow PyTorch's ``affine_grid`` /
``grid_sample`` with their defaults (``align_corners=False``, bilinear, zero padding), as the
reference DSA code calls them (DatasetCondensation utils.py, ``rand_scale`` / ``rand_rotate``):
pixel ``i`` of a side of ``n`` pixels sits at normalised coordinate ``(2 i + 1) / n - 1``, and a
normalised source coordinate ``x`` is pixel ``((x + 1) n - 1) / 2``. Identity parameters
reproduce the input exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

# Ratios of the reference DSA implementation (ParamDiffAug).
CROP_RATIO = 0.125  # max translation, as a fraction of the side length
CUTOUT_RATIO = 0.5  # cutout square side, as a fraction of the side length


def round_half_up(value: float) -> int:
  """Rounds like the reference's ``int(value + 0.5)`` (not Python's banker's rounding)."""
  return int(math.floor(value + 0.5))


def max_shift(length: int) -> int:
  """Largest crop translation S = round(0.125 * length) for a side of ``length`` pixels."""
  return round_half_up(CROP_RATIO * length)


def cutout_side(length: int) -> int:
  """Cutout square side round(0.5 * length) for a side of ``length`` pixels."""
  return round_half_up(CUTOUT_RATIO * length)


def _per_image(values: jax.Array, dtype) -> jax.Array:
  """Reshapes per-image parameters ``[N]`` to ``[N, 1, 1, 1]`` for broadcasting over NHWC."""
  return jnp.asarray(values, dtype).reshape(-1, 1, 1, 1)


# --------------------------------------------------------------------------- colour


@jax.jit
def brightness(images: jax.Array, u: jax.Array) -> jax.Array:
  """Adds ``u - 0.5`` to every pixel of each image.

  Args:
      images: ``[N, H, W, C]`` float images.
      u: ``[N]`` draws in [0, 1).

  Returns:
      ``[N, H, W, C]`` images ``x + (u - 0.5)``.
  """
  return images + (_per_image(u, images.dtype) - 0.5)


@jax.jit
def saturation(images: jax.Array, u: jax.Array) -> jax.Array:
  """Scales each pixel's deviation from its channel mean by ``2u``.

  Args:
      images: ``[N, H, W, C]`` float images.
      u: ``[N]`` draws in [0, 1).

  Returns:
      ``[N, H, W, C]`` images ``(x - m) * 2u + m``, with ``m`` the per-pixel mean over C.
  """
  pixel_mean = jnp.mean(images, axis=-1, keepdims=True)
  return (images - pixel_mean) * (2.0 * _per_image(u, images.dtype)) + pixel_mean


@jax.jit
def contrast(images: jax.Array, u: jax.Array) -> jax.Array:
  """Scales each image's deviation from its global mean by ``u + 0.5``.

  Args:
      images: ``[N, H, W, C]`` float images.
      u: ``[N]`` draws in [0, 1).

  Returns:
      ``[N, H, W, C]`` images ``(x - m) * (u + 0.5) + m``, with ``m`` the per-image mean
      over H, W and C.
  """
  image_mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
  return (images - image_mean) * (_per_image(u, images.dtype) + 0.5) + image_mean


@jax.jit
def color(
  images: jax.Array, u_brightness: jax.Array, u_saturation: jax.Array, u_contrast: jax.Array
) -> jax.Array:
  """The 'color' op: brightness, then saturation, then contrast (each ``u`` is ``[N]``)."""
  images = brightness(images, u_brightness)
  images = saturation(images, u_saturation)
  return contrast(images, u_contrast)


# --------------------------------------------------------------------------- integer-grid ops


@jax.jit
def translate(images: jax.Array, shift_rows: jax.Array, shift_cols: jax.Array) -> jax.Array:
  """Shifts each image by whole pixels, filling uncovered pixels with 0 (the 'crop' op).

  Positive shifts move the content down / right: ``out[i, j] = x[i - dr, j - dc]``,
  and 0 where that source lies outside the image.

  Args:
      images: ``[N, H, W, C]`` float images.
      shift_rows: ``[N]`` integer row shifts ``dr``.
      shift_cols: ``[N]`` integer column shifts ``dc``.

  Returns:
      ``[N, H, W, C]`` shifted images.
  """
  _, height, width, _ = images.shape

  def shift_one(image, shift_row, shift_col):
    source_rows = jnp.arange(height) - shift_row
    source_cols = jnp.arange(width) - shift_col
    inside = ((source_rows >= 0) & (source_rows < height))[:, None] & (
      (source_cols >= 0) & (source_cols < width)
    )[None, :]
    # Gather with clipped indices, then zero the pixels whose source was outside.
    clipped_rows = jnp.clip(source_rows, 0, height - 1)
    clipped_cols = jnp.clip(source_cols, 0, width - 1)
    gathered = image[clipped_rows][:, clipped_cols]
    return jnp.where(inside[:, :, None], gathered, 0)

  return jax.vmap(shift_one)(
    images, jnp.asarray(shift_rows, jnp.int32), jnp.asarray(shift_cols, jnp.int32)
  )


@functools.partial(jax.jit, static_argnames='size')
def cutout(
  images: jax.Array,
  centre_rows: jax.Array,
  centre_cols: jax.Array,
  size: int | tuple[int, int] | None = None,
) -> jax.Array:
  """Sets a square (clipped at the borders) of each image to 0.

  The square covers rows ``[r - size_rows // 2, r - size_rows // 2 + size_rows)`` and the
  analogous columns, for centre ``(r, c)``; parts outside the image are ignored.

  Args:
      images: ``[N, H, W, C]`` float images.
      centre_rows: ``[N]`` integer centre rows ``r``.
      centre_cols: ``[N]`` integer centre columns ``c``.
      size: side of the square, or ``(rows, cols)``; default ``round(0.5 * H)`` by
    ``round(0.5 * W)``.

  Returns:
      ``[N, H, W, C]`` images with the square set to 0.
  """
  _, height, width, _ = images.shape
  if size is None:
    size = (cutout_side(height), cutout_side(width))
  size_rows, size_cols = (size, size) if isinstance(size, int) else size
  top = jnp.asarray(centre_rows, jnp.int32)[:, None] - size_rows // 2
  left = jnp.asarray(centre_cols, jnp.int32)[:, None] - size_cols // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top) & (rows < top + size_rows)  # [N, H]
  in_cols = (cols >= left) & (cols < left + size_cols)  # [N, W]
  keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # [N, H, W]
  return images * keep[..., None].astype(images.dtype)


@jax.jit
def flip(images: jax.Array, do_flip: jax.Array) -> jax.Array:
  """Mirrors the images selected by ``do_flip`` left-right.

  Args:
      images: ``[N, H, W, C]`` float images.
      do_flip: ``[N]`` booleans.

  Returns:
      ``[N, H, W, C]`` images, ``x[:, :, ::-1]`` where ``do_flip`` else ``x``.
  """
  return jnp.where(jnp.asarray(do_flip, bool).reshape(-1, 1, 1, 1), images[:, :, ::-1, :], images)


# --------------------------------------------------------------------------- bilinear resampling


def _centre_offsets(height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Pixel offsets ``[H, W]`` of every pixel centre from the image centre (rows, cols).

  With ``align_corners=False`` a normalised coordinate is this offset divided by half the side
  (``n / 2``), and a normalised source coordinate maps back to ``(n - 1) / 2 + (n / 2) * x``.
  """
  rows, cols = jnp.meshgrid(
    jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing='ij'
  )
  return rows - (height - 1) / 2.0, cols - (width - 1) / 2.0


def _resample(images: jax.Array, source_rows: jax.Array, source_cols: jax.Array) -> jax.Array:
  """Bilinear sampling with zero padding (each out-of-image neighbour contributes 0).

  Args:
      images: ``[N, H, W, C]`` float images.
      source_rows: ``[N, H, W]`` (fractional) source row of every output pixel.
      source_cols: ``[N, H, W]`` (fractional) source column of every output pixel.

  Returns:
      ``[N, H, W, C]`` resampled images.
  """

  def sample_channel(channel, rows, cols):
    return map_coordinates(channel, [rows, cols], order=1, mode='constant', cval=0.0)

  sample_image = jax.vmap(sample_channel, in_axes=(-1, None, None), out_axes=-1)
  return jax.vmap(sample_image)(images, source_rows, source_cols)


@jax.jit
def scale(images: jax.Array, sx: jax.Array, sy: jax.Array) -> jax.Array:
  """Rescales about the image centre: output pixel ``p`` samples ``centre + s * (p - centre)``.

  Factors above 1 therefore shrink the content (and pad with zeros); below 1 zoom in.
  Same as ``grid_sample(x, affine_grid(theta=[[sx, 0, 0], [0, sy, 0]], x.shape))`` (PyTorch's
  defaults, ``align_corners=False``); a pure scaling gives the same pixels with
  ``align_corners=True``.

  Args:
      images: ``[N, H, W, C]`` float images.
      sx: ``[N]`` factors along the width (columns).
      sy: ``[N]`` factors along the height (rows).

  Returns:
      ``[N, H, W, C]`` rescaled images.
  """
  _, height, width, _ = images.shape
  row_offsets, col_offsets = _centre_offsets(height, width)
  sx = jnp.asarray(sx, jnp.float32)[:, None, None]
  sy = jnp.asarray(sy, jnp.float32)[:, None, None]
  source_rows = (height - 1) / 2.0 + sy * row_offsets
  source_cols = (width - 1) / 2.0 + sx * col_offsets
  return _resample(images, source_rows, source_cols)


@jax.jit
def rotate(images: jax.Array, angle: jax.Array) -> jax.Array:
  """Rotates about the image centre; positive angles turn the content clockwise as displayed.

  Same as ``grid_sample(x, affine_grid(theta=[[cos, sin, 0], [-sin, cos, 0]], x.shape))``
  (PyTorch's defaults, ``align_corners=False``): the rotation acts on normalised coordinates,
  so for non-square images it is the reference's (anisotropic) rotation. A +90 degree turn of a
  square image is ``np.rot90(x, -1)``. The reference writes theta with the opposite sign of the
  angle; its angles are symmetric about 0, so the distribution of rotations is the same.

  Args:
      images: ``[N, H, W, C]`` float images.
      angle: ``[N]`` angles in radians.

  Returns:
      ``[N, H, W, C]`` rotated images.
  """
  _, height, width, _ = images.shape
  row_offsets, col_offsets = _centre_offsets(height, width)
  angle = jnp.asarray(angle, jnp.float32)[:, None, None]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Normalised x_in = cos*x + sin*y, y_in = -sin*x + cos*y, written in pixel offsets: a
  # normalised coordinate is the offset over half the side (width / 2, height / 2).
  aspect = width / height
  source_cols = (width - 1) / 2.0 + cos * col_offsets + sin * row_offsets * aspect
  source_rows = (height - 1) / 2.0 - sin * col_offsets / aspect + cos * row_offsets
  return _resample(images, source_rows, source_cols)

"""IDC's DiffAug (Kim et al., ICML 2022; snu-mllab/Efficient-Dataset-Condensation
`misc/augment.py`), the condensation augmentation of IDC, DANCE, NCFM, DSDM and M3D.

Unlike DM's DSA (`dd_jax.augment.dsa`: ONE op of the strategy per call), every call applies, in
this order and each only if the strategy lists it:

  1. flip      mirror left-right with probability 0.5
  2. color     brightness x + (u1 - 0.5); saturation (x - m_pix) * 2 u2 + m_pix (m_pix: the
               pixel's mean over channels); contrast (x - m_img) * (u3 + 0.5) + m_img (m_img:
               the image's mean over H, W, C)
  3. ONE geometric op drawn uniformly from those listed (repeats weight the draw):
               crop      out(i, j) = x(i + t_h, j + t_w), 0 outside; t uniform in {-S, ..., S},
                         S = int(0.125 * side + 0.5) (4 for 32 pixels)
               translate crop with t_h = 0
               scale     PyTorch affine_grid / grid_sample with theta [[sx, 0, 0], [0, sy, 0]],
                         sx, sy ~ U[1/1.2, 1.2)
               rotate    theta [[cos a, -sin a, 0], [sin a, cos a, 0]], a ~ U[-15, 15) degrees
  4. cutout    zero (all channels) rows o_h - L // 2 ... o_h - L // 2 + L - 1 and the same
               columns around o_w, clipped; L = int(0.5 * side + 0.5) (16 for 32 pixels), o
               uniform in {0, ..., side} for even L ({0, ..., side - 1} for odd L)

Zero is the dataset's mean colour when the images are normalised (IDC augments after the
normalisation). Drawing and applying are separate: `sample_params(key, ...)` draws one
parameter set (batch mode: one set for the whole batch, IDC's `batch=True`; or one per image,
`batch=False`), and `apply(images, params, strategy)` is deterministic and differentiable in the
images, so one draw can transform a class's real and synthetic images identically (siamese):

    params = sample_params(key, 'color_crop_cutout', height, width)
    real, syn = apply(real, params, strategy), apply(syn, params, strategy)

Every op acts on each image alone, so applying to [real; syn] at once (as IDC does) gives the
same images as applying to each. Each parameter has its own stream of the key (a fixed number),
so adding an op to the strategy never changes the other ops' draws.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dd_jax import settings as settings_lib
from dd_jax.augment import ops

# The names a strategy may list; always-applied ones and the geometric ones (one drawn per call).
ALWAYS_OPS: tuple[str, ...] = ('flip', 'color', 'cutout')
GEOMETRIC_OPS: tuple[str, ...] = ('crop', 'translate', 'scale', 'rotate')
VALID_OPS: tuple[str, ...] = ALWAYS_OPS + GEOMETRIC_OPS
DEFAULT_STRATEGY = 'color_crop_cutout'  # every IDC-family method's condensation default

FLIP_PROBABILITY = 0.5
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0

# The key stream of each parameter: fixed numbers, append, never renumber.
_STREAMS = {
  'flip': 0,
  'brightness': 1,
  'saturation': 2,
  'contrast': 3,
  'geometric': 4,
  'shift_rows': 5,
  'shift_cols': 6,
  'scale_rows': 7,
  'scale_cols': 8,
  'angle': 9,
  'cutout_rows': 10,
  'cutout_cols': 11,
}


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A parsed strategy string.

  Attributes:
    flip: whether images are flipped (step 1).
    color: whether the colour ops run (step 2).
    geometric: the geometric ops, one of which is drawn per call (step 3), in the string's
      order with repeats; () for none.
    cutout: whether cutout runs (step 4).
  """

  flip: bool = False
  color: bool = False
  geometric: tuple[str, ...] = ()
  cutout: bool = False

  @property
  def empty(self) -> bool:
    return not (self.flip or self.color or self.geometric or self.cutout)


def parse_strategy(strategy: str | None, field: str = 'augment_strategy') -> Strategy:
  """Parses a strategy string such as ``'color_crop_cutout'``.

  Args:
    strategy: op names of `VALID_OPS` joined by ``'_'`` in any order (the application order is
      fixed); ``''``, ``'none'`` (any case) or None: no augmentation.
    field: the setting named in the error.

  Returns:
    The parsed `Strategy`.

  Raises:
    settings.SettingError (a ValueError) on `field`: a name is not in `VALID_OPS` (DSA's
      individual 'brightness', 'saturation', 'contrast' included: IDC has only 'color').
  """
  if strategy is None or strategy.strip().lower() in ('', 'none'):
    return Strategy()
  names = strategy.strip().split('_')
  for name in names:
    if name not in VALID_OPS:
      raise settings_lib.SettingError(
        field,
        strategy,
        f'names unknown IDC DiffAug op {name!r}; allowed ops are {", ".join(VALID_OPS)} '
        '(joined by "_", or "none")',
      )
  return Strategy(
    flip='flip' in names,
    color='color' in names,
    geometric=tuple(name for name in names if name in GEOMETRIC_OPS),
    cutout='cutout' in names,
  )


class Params(NamedTuple):
  """One draw of every parameter; per-image fields are [D] (D = 1: shared by the whole batch).

  Attributes:
    flip: [D] bool, mirror left-right.
    brightness: [D] u1 in [0, 1).
    saturation: [D] u2 in [0, 1).
    contrast: [D] u3 in [0, 1).
    geometric: [] int32, index into the strategy's geometric ops (0 when it lists at most one).
    shift_rows: [D] int32 t_h in {-S_h, ..., S_h}.
    shift_cols: [D] int32 t_w in {-S_w, ..., S_w}.
    scale_rows: [D] sy in [1/1.2, 1.2).
    scale_cols: [D] sx in [1/1.2, 1.2).
    angle: [D] a in radians, in [-15, 15) degrees.
    cutout_rows: [D] int32 o_h.
    cutout_cols: [D] int32 o_w.
  """

  flip: jax.Array
  brightness: jax.Array
  saturation: jax.Array
  contrast: jax.Array
  geometric: jax.Array
  shift_rows: jax.Array
  shift_cols: jax.Array
  scale_rows: jax.Array
  scale_cols: jax.Array
  angle: jax.Array
  cutout_rows: jax.Array
  cutout_cols: jax.Array


@functools.partial(jax.jit, static_argnames=('strategy', 'height', 'width', 'num_draws'))
def sample_params(
  key: jax.Array, strategy: str, height: int, width: int, num_draws: int = 1
) -> Params:
  """Draws the parameters of one call.

  Args:
    key: PRNG key; it alone decides the draw.
    strategy: as `parse_strategy` takes (only the number of geometric ops matters).
    height: image height H (sets S_h, L_h and the range of o_h).
    width: image width W.
    num_draws: 1 (batch mode: one set for the whole batch, IDC's `batch=True`) or the batch
      size (a set per image, `batch=False`; the geometric op is still one per call).

  Returns:
    `Params`; every field is drawn whatever the strategy lists.
  """
  stream = lambda name: jax.random.fold_in(key, _STREAMS[name])
  uniform = lambda name, low=0.0, high=1.0: jax.random.uniform(
    stream(name), (num_draws,), minval=low, maxval=high
  )
  integers = lambda name, low, high: jax.random.randint(stream(name), (num_draws,), low, high)
  num_geometric = max(len(parse_strategy(strategy).geometric), 1)
  shift_h, shift_w = ops.max_shift(height), ops.max_shift(width)
  # Centres: {0, ..., side} for an even square, {0, ..., side - 1} for an odd one (IDC's range).
  centre_h = height + 1 - ops.cutout_side(height) % 2
  centre_w = width + 1 - ops.cutout_side(width) % 2
  return Params(
    flip=jax.random.bernoulli(stream('flip'), FLIP_PROBABILITY, (num_draws,)),
    brightness=uniform('brightness'),
    saturation=uniform('saturation'),
    contrast=uniform('contrast'),
    geometric=jax.random.randint(stream('geometric'), (), 0, num_geometric),
    shift_rows=integers('shift_rows', -shift_h, shift_h + 1),
    shift_cols=integers('shift_cols', -shift_w, shift_w + 1),
    scale_rows=uniform('scale_rows', 1.0 / SCALE_RATIO, SCALE_RATIO),
    scale_cols=uniform('scale_cols', 1.0 / SCALE_RATIO, SCALE_RATIO),
    angle=uniform('angle', -ROTATE_DEGREES, ROTATE_DEGREES) * (math.pi / 180.0),
    cutout_rows=integers('cutout_rows', 0, centre_h),
    cutout_cols=integers('cutout_cols', 0, centre_w),
  )


def _geometric(op: str, images: jax.Array, params: Params) -> jax.Array:
  if op == 'crop':  # out(i, j) = x(i + t_h, j + t_w): ops.translate moves by -t
    return ops.translate(images, -params.shift_rows, -params.shift_cols)
  if op == 'translate':  # IDC's translate: a horizontal crop
    return ops.translate(images, jnp.zeros_like(params.shift_cols), -params.shift_cols)
  if op == 'scale':
    return ops.scale(images, params.scale_cols, params.scale_rows)
  # IDC's theta [[cos a, -sin a], [sin a, cos a]] is ops.rotate's at angle -a.
  return ops.rotate(images, -params.angle)


@functools.partial(jax.jit, static_argnames='strategy')
def apply(images: jax.Array, params: Params, strategy: str) -> jax.Array:
  """Applies the strategy's ops with given parameters (deterministic, differentiable).

  Args:
    images: [N, H, W, C] float images (normalised: zero fill is the mean colour).
    params: from `sample_params` with this H, W and strategy; fields [1] (shared) or [N].
    strategy: as `parse_strategy` takes.

  Returns:
    [N, H, W, C] augmented images; `images` itself for an empty strategy.
  """
  parsed = parse_strategy(strategy)
  num_images = images.shape[0]
  params = params._replace(
    **{
      name: jnp.broadcast_to(value, (num_images,))
      for name, value in params._asdict().items()
      if name != 'geometric'
    }
  )
  if parsed.flip:
    images = ops.flip(images, params.flip)
  if parsed.color:
    images = ops.color(images, params.brightness, params.saturation, params.contrast)
  if len(parsed.geometric) == 1:
    images = _geometric(parsed.geometric[0], images, params)
  elif parsed.geometric:
    branches = [functools.partial(_geometric, op) for op in parsed.geometric]
    images = jax.lax.switch(params.geometric, branches, images, params)
  if parsed.cutout:
    images = ops.cutout(images, params.cutout_rows, params.cutout_cols)
  return images


@functools.partial(jax.jit, static_argnames=('strategy', 'batch'))
def augment(key: jax.Array, images: jax.Array, strategy: str, *, batch: bool = True) -> jax.Array:
  """`apply` with parameters drawn from `key`.

  Args:
    key: PRNG key.
    images: [N, H, W, C] float images.
    strategy: as `parse_strategy` takes.
    batch: True: one parameter set for all N images (the condensation mode); False: one per
      image (IDC's evaluation-training mode).

  Returns:
    [N, H, W, C] augmented images.
  """
  num_images, height, width, _ = images.shape
  params = sample_params(key, strategy, height, width, 1 if batch else num_images)
  return apply(images, params, strategy)

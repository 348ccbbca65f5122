"""DSA: differentiable siamese augmentation (Zhao & Bilen, ICML 2021; reference code
VICO-UoE/DatasetCondensation, utils.py DiffAugment / ParamDiffAug).

Each call applies ONE op drawn uniformly from the strategy (``'color'`` is one op made of
brightness, saturation and contrast in sequence), never the whole chain.

* ``siamese=True`` (distillation): one op and ONE parameter set for the whole batch; the
  draw depends only on the key, so two batches (real and synthetic images of a class)
  augmented with the same key get exactly the same transform.
* ``siamese=False`` (evaluation training): one op per batch, parameters drawn per image.

``apply_random_op(op_key, param_key, ...)`` is the one place the op is drawn and applied;
``augment(key, ...)`` splits one key into those two.

Parameter distributions (reference ParamDiffAug):
  brightness / saturation / contrast  u ~ U[0, 1)
  crop    row and column shifts, integers uniform in [-S, S], S = round(0.125 * side)
  cutout  centre row uniform in [0, H - 1 + (1 - s % 2)], s = round(0.5 * H) (same for
          columns): for even s the square may hang over either border by the same amount
  flip    probability 0.5 (per image, or once for the whole batch when siamese)
  scale   sx, sy ~ U[1/1.2, 1.2) independently
  rotate  angle ~ U[-15, 15) degrees
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from dd_jax.augment import ops

# The ops of a full DSA strategy, 'color' counting as one.
OPS: tuple[str, ...] = ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate')
# Everything a strategy string may name: OPS plus the individual colour ops.
VALID_OPS: tuple[str, ...] = OPS + ('brightness', 'saturation', 'contrast')
DEFAULT_STRATEGY = 'color_crop_cutout_flip_scale_rotate'

SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
FLIP_PROBABILITY = 0.5

Params = tuple[jax.Array, ...]


class StrategyError(ValueError):
  """A DSA strategy string names an unknown op.

  Attributes:
    reason: what is wrong, as a predicate of the strategy (e.g. "names unknown DSA op 'blur';
      valid ops are ..."), for messages that name the setting themselves.
  """

  def __init__(self, strategy: str, reason: str):
    super().__init__(f'augment.strategy={strategy!r} {reason}.')
    self.reason = reason


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
  """Splits a strategy string such as ``'color_crop_cutout'`` into op names.

  Args:
    strategy: op names joined by ``'_'``; ``''``, ``'none'`` (any case) or None mean no
      augmentation.

  Returns:
    The op names in order (repeats kept, so they weight the uniform choice); ``()`` for no
    augmentation.

  Raises:
    StrategyError: an op name is not in ``VALID_OPS``.
  """
  if strategy is None or strategy.strip().lower() in ('', 'none'):
    return ()
  names = tuple(strategy.strip().split('_'))
  for name in names:
    if name not in VALID_OPS:
      raise StrategyError(
        strategy,
        f'names unknown DSA op {name!r}; valid ops are '
        f'{", ".join(VALID_OPS)} (joined by "_", or "none")',
      )
  return names


def _uniform(key: jax.Array, num_draws: int, low: float = 0.0, high: float = 1.0) -> jax.Array:
  return jax.random.uniform(key, (num_draws,), minval=low, maxval=high)


def sample_params(key: jax.Array, op: str, num_draws: int, height: int, width: int) -> Params:
  """Draws the parameters of one op.

  Args:
      key: PRNG key.
      op: a name from ``VALID_OPS``.
      num_draws: how many independent parameter sets (1 for siamese, N per image).
      height: image height H (sets the crop and cutout ranges).
      width: image width W.

  Returns:
      The op's parameters, each of shape ``[num_draws]``, in the order the matching
      function of :mod:`dd_jax.augment.ops` takes them (``'crop'`` -> ``ops.translate``).
  """
  if op in ('brightness', 'saturation', 'contrast'):
    return (_uniform(key, num_draws),)
  if op == 'color':
    return tuple(_uniform(k, num_draws) for k in jax.random.split(key, 3))
  row_key, col_key = jax.random.split(key)
  if op == 'crop':
    return tuple(
      jax.random.randint(k, (num_draws,), -ops.max_shift(side), ops.max_shift(side) + 1)
      for k, side in ((row_key, height), (col_key, width))
    )
  if op == 'cutout':
    # Centre range of the reference: [0, side - 1] for odd squares, [0, side] for even
    # ones, so the square overhangs both borders symmetrically.
    return tuple(
      jax.random.randint(k, (num_draws,), 0, side + 1 - ops.cutout_side(side) % 2)
      for k, side in ((row_key, height), (col_key, width))
    )
  if op == 'flip':
    return (jax.random.bernoulli(key, FLIP_PROBABILITY, (num_draws,)),)
  if op == 'scale':
    return (
      _uniform(row_key, num_draws, 1.0 / SCALE_RATIO, SCALE_RATIO),
      _uniform(col_key, num_draws, 1.0 / SCALE_RATIO, SCALE_RATIO),
    )
  if op == 'rotate':
    degrees = _uniform(key, num_draws, -ROTATE_DEGREES, ROTATE_DEGREES)
    return (degrees * (math.pi / 180.0),)
  raise ValueError(f'unknown DSA op {op!r}; valid ops are {", ".join(VALID_OPS)}.')


_APPLY: dict[str, Callable[..., jax.Array]] = {
  'brightness': ops.brightness,
  'saturation': ops.saturation,
  'contrast': ops.contrast,
  'color': ops.color,
  'crop': ops.translate,
  'cutout': ops.cutout,
  'flip': ops.flip,
  'scale': ops.scale,
  'rotate': ops.rotate,
}


def apply_op(op: str, images: jax.Array, params: Params) -> jax.Array:
  """Applies op ``op`` with per-image ``params`` (each ``[N]``, or ``[1]`` to share one set).

  Args:
      op: a name from ``VALID_OPS``.
      images: ``[N, H, W, C]`` float images.
      params: as returned by :func:`sample_params`.

  Returns:
      ``[N, H, W, C]`` augmented images.
  """
  num_images = images.shape[0]
  return _APPLY[op](images, *(jnp.broadcast_to(p, (num_images,)) for p in params))


def apply_random_op(
  op_key: jax.Array, param_key: jax.Array, images: jax.Array, strategy: str, *, siamese: bool
) -> jax.Array:
  """Applies one DSA op, drawn from ``op_key``, with parameters drawn from ``param_key``.

  The op is chosen with ``lax.switch``: one branch runs, unless the op index is batched by a
  ``vmap`` (per-network ops of networks trained together), where every branch is computed.

  Args:
    op_key: PRNG key of the op, uniform over the strategy's op names.
    param_key: PRNG key of the op's parameters.
    images: ``[N, H, W, C]`` float images in normalised space.
    strategy: op names joined by ``'_'`` (see :func:`parse_strategy`).
    siamese: True: one parameter set shared by all N images, independent of N and of the image
      values. False: parameters drawn per image.

  Returns:
    ``[N, H, W, C]`` augmented images (``images`` itself for an empty strategy).
  """
  op_names = parse_strategy(strategy)
  if not op_names:
    return images
  chex.assert_rank(images, 4)
  num_images, height, width, _ = images.shape
  num_draws = 1 if siamese else num_images

  def make_branch(op):
    def branch(param_key, images):
      return apply_op(op, images, sample_params(param_key, op, num_draws, height, width))

    return branch

  branches = [make_branch(op) for op in op_names]
  op_index = jax.random.randint(op_key, (), 0, len(branches))
  return jax.lax.switch(op_index, branches, param_key, images)


@functools.partial(jax.jit, static_argnames=('strategy', 'siamese'))
def augment(key: jax.Array, images: jax.Array, strategy: str, *, siamese: bool) -> jax.Array:
  """Applies one DSA op, chosen uniformly from ``strategy``, to a batch of images.

  Jitted (``strategy`` and ``siamese`` static) so eager calls reuse one compilation per
  shape; composes with outer jit, vmap (over keys and batches) and grad w.r.t. ``images``.

  Args:
    key: PRNG key; it alone decides the op and (siamese) the parameters: it is split into the
      op key and the parameter key of :func:`apply_random_op`.
    images: ``[N, H, W, C]`` float images in normalised space.
    strategy: op names joined by ``'_'`` (see :func:`parse_strategy`).
    siamese: True: one parameter set shared by all N images, independent of N and of the
      image values. False: parameters drawn per image.

  Returns:
    ``[N, H, W, C]`` augmented images (``images`` itself for an empty strategy).
  """
  if not parse_strategy(strategy):
    return images
  op_key, param_key = jax.random.split(key)
  return apply_random_op(op_key, param_key, images, strategy, siamese=siamese)

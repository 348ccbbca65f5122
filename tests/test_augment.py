"""Tests for dd_jax.augment (DSA: differentiable siamese augmentation)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import augment as aug


def _random_images(seed, shape=(3, 8, 8, 3)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _shift_numpy(image, shift_rows, shift_cols):
  """Zero-filled shift of one [H, W, C] image: out[i, j] = image[i - dr, j - dc]."""
  height, width, _ = image.shape
  out = np.zeros_like(image)
  for i in range(height):
    for j in range(width):
      if 0 <= i - shift_rows < height and 0 <= j - shift_cols < width:
        out[i, j] = image[i - shift_rows, j - shift_cols]
  return out


# --------------------------------------------------------------------------- strategy


def test_parse_strategy():
  assert aug.parse_strategy('color_crop_cutout_flip_scale_rotate') == aug.OPS
  assert aug.parse_strategy('brightness_contrast') == ('brightness', 'contrast')
  assert aug.parse_strategy('') == ()
  assert aug.parse_strategy('None') == ()
  with pytest.raises(ValueError, match='augment.strategy') as error:
    aug.parse_strategy('color_blur')
  assert "'blur'" in str(error.value)
  for op in aug.VALID_OPS:
    assert op in str(error.value)
  assert isinstance(error.value, aug.StrategyError)
  assert error.value.reason.startswith("names unknown DSA op 'blur'")
  with pytest.raises(ValueError, match='augment.strategy'):
    aug.augment(jax.random.key(0), _random_images(0), 'crop__flip', siamese=True)


def test_empty_strategy_is_identity():
  images = _random_images(0)
  out = aug.augment(jax.random.key(0), images, 'none', siamese=True)
  np.testing.assert_array_equal(out, images)


# --------------------------------------------------------------------------- colour ops


def test_colour_ops_match_numpy_formulas():
  images = _random_images(1)
  u = np.array([0.1, 0.5, 0.9], np.float32)[:, None, None, None]
  np.testing.assert_allclose(aug.brightness(images, u.ravel()), images + u - 0.5, atol=1e-6)
  pixel_mean = images.mean(axis=3, keepdims=True)
  np.testing.assert_allclose(
    aug.saturation(images, u.ravel()), (images - pixel_mean) * 2 * u + pixel_mean, atol=1e-5
  )
  image_mean = images.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(
    aug.contrast(images, u.ravel()), (images - image_mean) * (u + 0.5) + image_mean, atol=1e-5
  )
  # Neutral draws leave images unchanged; 'color' is the three in sequence.
  half = np.full(3, 0.5, np.float32)
  np.testing.assert_allclose(aug.color(images, half, half, half), images, atol=1e-6)
  uc = np.array([0.2, 0.7, 0.3], np.float32)
  expected = aug.contrast(aug.saturation(aug.brightness(images, uc), uc[::-1]), uc)
  np.testing.assert_allclose(aug.color(images, uc, uc[::-1], uc), expected, atol=1e-6)


# --------------------------------------------------------------------------- integer-grid ops


def test_translate_equals_zero_filled_shift():
  images = _random_images(2, (4, 8, 8, 2))
  shift_rows = np.array([0, 1, -2, 8])
  shift_cols = np.array([0, -1, 3, 0])
  out = np.asarray(aug.translate(images, shift_rows, shift_cols))
  for n in range(4):
    np.testing.assert_array_equal(out[n], _shift_numpy(images[n], shift_rows[n], shift_cols[n]))
  assert not out[3].any()  # shifted by a full side: nothing left
  assert aug.max_shift(32) == 4 and aug.max_shift(28) == 4 and aug.max_shift(8) == 1


def test_cutout_zeroes_expected_square():
  images = np.ones((3, 8, 8, 2), np.float32)
  assert aug.cutout_side(8) == 4 and aug.cutout_side(28) == 14
  # Centre (4, 4): rows/cols 2..5 -> 16 pixels; centre (0, 7): rows 0..1, cols 5..7 -> 6.
  out = np.asarray(aug.cutout(images, np.array([4, 0, 8]), np.array([4, 7, 8])))
  expected = np.ones((3, 8, 8), np.float32)
  expected[0, 2:6, 2:6] = 0
  expected[1, 0:2, 5:8] = 0
  expected[2, 6:8, 6:8] = 0
  np.testing.assert_array_equal(out, np.repeat(expected[..., None], 2, axis=-1))
  assert [int((o == 0).all(-1).sum()) for o in out] == [16, 6, 4]
  # Odd explicit size: side 3 about the centre.
  odd = np.asarray(aug.cutout(images[:1], np.array([1]), np.array([1]), size=3))
  assert (odd[0, :3, :3] == 0).all() and int((odd[0] == 0).all(-1).sum()) == 9


def test_flip():
  images = _random_images(3)
  out = np.asarray(aug.flip(images, np.array([True, False, True])))
  np.testing.assert_array_equal(out[0], images[0, :, ::-1])
  np.testing.assert_array_equal(out[1], images[1])
  np.testing.assert_array_equal(out[2], images[2, :, ::-1])


# --------------------------------------------------------------------------- resampling ops


@pytest.mark.parametrize('size', [(8, 8), (28, 28), (6, 10)])
def test_identity_scale_and_rotate_reproduce_input(size):
  images = _random_images(4, (2, *size, 3))
  ones = np.ones(2, np.float32)
  np.testing.assert_array_equal(aug.scale(images, ones, ones), images)
  np.testing.assert_array_equal(aug.rotate(images, np.zeros(2, np.float32)), images)


def test_scale_by_two_on_known_pixels():
  # 5x5, centre 2: output (i, j) samples input (2 + 2(i - 2), 2 + 2(j - 2)).
  image = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
  out = np.asarray(aug.scale(image, np.array([2.0]), np.array([2.0])))[0, ..., 0]
  assert out[1, 1] == image[0, 0, 0, 0] and out[2, 3] == image[0, 2, 4, 0] and out[2, 2] == 12
  assert out[0, 0] == 0  # source (-2, -2) is outside: zero padding
  # sx scales columns only: (2, 3) samples (2, 4).
  out_x = np.asarray(aug.scale(image, np.array([2.0]), np.array([1.0])))[0, ..., 0]
  np.testing.assert_array_equal(out_x[:, 2], image[0, :, 2, 0])
  np.testing.assert_array_equal(out_x[:, 3], image[0, :, 4, 0])
  # Even side: centre 3.5, output row/col 3 samples 2.5 -> bilinear mean of a 2x2 block.
  image8 = _random_images(5, (1, 8, 8, 2))
  out8 = np.asarray(aug.scale(image8, np.array([2.0]), np.array([2.0])))
  np.testing.assert_allclose(out8[0, 3, 3], image8[0, 2:4, 2:4].mean(axis=(0, 1)), atol=1e-6)


def test_rotate_90_degrees_is_clockwise_rot90():
  images = _random_images(6, (2, 8, 8, 3))
  out = aug.rotate(images, np.full(2, math.pi / 2, np.float32))
  np.testing.assert_allclose(out, np.rot90(images, k=-1, axes=(1, 2)), atol=1e-5)
  back = aug.rotate(images, np.full(2, -math.pi / 2, np.float32))
  np.testing.assert_allclose(back, np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)


def test_small_rotation_keeps_centre_and_zero_pads_corners():
  image = np.ones((1, 9, 9, 1), np.float32)
  out = np.asarray(aug.rotate(image, np.array([math.radians(15.0)], np.float32)))[0, ..., 0]
  assert out[4, 4] == pytest.approx(1.0)
  assert 0.0 <= out[0, 0] < 1.0  # a corner pulls from outside the image


def _torch_affine_grid(theta, height, width, align_corners):
  """numpy `torch.nn.functional.affine_grid(theta, [N, C, H, W], align_corners)`: [N, H, W, 2]."""

  def base(n):
    if align_corners:
      return np.linspace(-1.0, 1.0, n)
    return (2.0 * np.arange(n) + 1.0) / n - 1.0

  x, y = np.meshgrid(base(width), base(height))  # [H, W]: x along columns, y along rows
  points = np.stack([x, y, np.ones_like(x)], axis=-1)  # [H, W, 3]
  return np.einsum('hwk,nik->nhwi', points, np.asarray(theta, np.float64))


def _torch_grid_sample(images, grid, align_corners):
  """numpy `grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners)`, NHWC."""
  num_images, height, width, _ = images.shape
  out = np.zeros(images.shape, np.float64)
  for n in range(num_images):
    for i in range(height):
      for j in range(width):
        gx, gy = grid[n, i, j]
        if align_corners:
          col, row = (gx + 1) / 2 * (width - 1), (gy + 1) / 2 * (height - 1)
        else:
          col, row = ((gx + 1) * width - 1) / 2, ((gy + 1) * height - 1) / 2
        col0, row0 = int(np.floor(col)), int(np.floor(row))
        for r, wr in ((row0, row0 + 1 - row), (row0 + 1, row - row0)):
          for c, wc in ((col0, col0 + 1 - col), (col0 + 1, col - col0)):
            if 0 <= r < height and 0 <= c < width:  # zero padding per neighbour
              out[n, i, j] += wr * wc * images[n, r, c]
  return out


def _torch_resample(images, theta, align_corners=False):
  grid = _torch_affine_grid(theta, *images.shape[1:3], align_corners)
  return _torch_grid_sample(images.astype(np.float64), grid, align_corners)


def _rotation_theta(angles):
  return [[[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0]] for a in angles]


def test_resampling_matches_torch_affine_grid_without_align_corners():
  # Non-square: the reference's default align_corners=False differs from True for rotations.
  images = _random_images(20, (2, 6, 10, 2))
  angles = np.array([0.3, -0.2], np.float32)
  expected = _torch_resample(images, _rotation_theta(angles))
  np.testing.assert_allclose(aug.rotate(images, angles), expected, atol=1e-5)
  aligned = _torch_resample(images, _rotation_theta(angles), align_corners=True)
  assert np.abs(aligned - expected).max() > 0.05  # the test tells the two conventions apart
  sx, sy = np.array([1.15, 0.85], np.float32), np.array([0.9, 1.1], np.float32)
  scale_theta = [[[x, 0, 0], [0, y, 0]] for x, y in zip(sx, sy)]
  np.testing.assert_allclose(
    aug.scale(images, sx, sy), _torch_resample(images, scale_theta), atol=1e-5
  )
  # A pure scaling gives the same pixels with either convention.
  np.testing.assert_allclose(
    _torch_resample(images, scale_theta, align_corners=True),
    _torch_resample(images, scale_theta),
    atol=1e-9,
  )
  # Square images: both conventions agree for rotations too.
  square = _random_images(21, (2, 8, 8, 2))
  for align_corners in (False, True):
    np.testing.assert_allclose(
      aug.rotate(square, angles),
      _torch_resample(square, _rotation_theta(angles), align_corners),
      atol=1e-5,
    )


# --------------------------------------------------------------------------- sampling


def test_sample_params_ranges():
  key = jax.random.key(7)
  rows, cols = aug.sample_params(key, 'crop', 4000, 32, 28)
  assert set(np.unique(rows)) == set(range(-4, 5)) and set(np.unique(cols)) == set(range(-4, 5))
  centre_rows, _ = aug.sample_params(key, 'cutout', 4000, 32, 32)
  assert set(np.unique(centre_rows)) == set(range(0, 33))  # even side 16: [0, H]
  centre_rows, _ = aug.sample_params(key, 'cutout', 4000, 10, 10)
  assert set(np.unique(centre_rows)) == set(range(0, 10))  # odd side 5: [0, H - 1]
  sx, sy = aug.sample_params(key, 'scale', 4000, 8, 8)
  for s in (sx, sy):
    assert s.min() >= 1 / 1.2 and s.max() < 1.2 and s.max() - s.min() > 0.3
  (angle,) = aug.sample_params(key, 'rotate', 4000, 8, 8)
  assert np.abs(angle).max() <= math.radians(15.0) and np.abs(angle).max() > math.radians(14.0)
  (do_flip,) = aug.sample_params(key, 'flip', 4000, 8, 8)
  assert 0.45 < do_flip.mean() < 0.55
  assert len(aug.sample_params(key, 'color', 5, 8, 8)) == 3


def test_ops_are_chosen_uniformly():
  # On a constant image flip is the identity and brightness never is: ~half the keys flip.
  images = jnp.ones((2, 8, 8, 3))
  keys = jax.random.split(jax.random.key(8), 400)
  out = jax.vmap(lambda k: aug.augment(k, images, 'brightness_flip', siamese=True))(keys)
  unchanged = np.asarray(jnp.all(out == images, axis=(1, 2, 3, 4)))
  assert 0.4 < unchanged.mean() < 0.6


# --------------------------------------------------------------------------- augment modes


@pytest.mark.parametrize('op', aug.OPS)  # 'color' covers the individual colour ops
def test_siamese_shares_one_transform(op):
  a, b = _random_images(9, (2, 8, 8, 3)), _random_images(10, (2, 8, 8, 3))
  key = jax.random.key(11)
  together = aug.augment(key, np.concatenate([a, b]), op, siamese=True)
  separate = jnp.concatenate(
    [aug.augment(key, a, op, siamese=True), aug.augment(key, b, op, siamese=True)]
  )
  np.testing.assert_allclose(together, separate, atol=1e-6)
  # Identical images get identical outputs.
  same = aug.augment(key, np.repeat(a[:1], 4, axis=0), op, siamese=True)
  np.testing.assert_array_equal(same, jnp.broadcast_to(same[:1], same.shape))


@pytest.mark.parametrize('op', aug.OPS)  # 'color' covers the individual colour ops
def test_per_image_mode_draws_per_image(op):
  images = np.repeat(_random_images(12, (1, 8, 8, 3)), 16, axis=0)
  out = np.asarray(aug.augment(jax.random.key(13), images, op, siamese=False))
  distinct = {out[n].tobytes() for n in range(16)}
  assert len(distinct) > 1


@pytest.mark.parametrize('op', aug.OPS)  # 'color' covers the individual colour ops
def test_gradients_flow_through_every_op(op):
  images = _random_images(14, (2, 8, 8, 3))
  weights = _random_images(15, (2, 8, 8, 3))

  def loss(x):
    return jnp.sum(aug.augment(jax.random.key(16), x, op, siamese=False) * weights)

  grad = jax.grad(loss)(images)
  chex.assert_tree_all_finite(grad)
  assert float(jnp.abs(grad).sum()) > 0


def test_jit_and_vmap_over_keys_and_batches():
  # vmap over keys alone is exercised by test_ops_are_chosen_uniformly.
  images = _random_images(17, (3, 2, 8, 8, 3))  # [classes, N, H, W, C]
  keys = jax.random.split(jax.random.key(18), 3)
  fn = functools.partial(aug.augment, strategy=aug.DEFAULT_STRATEGY, siamese=True)
  per_class = np.stack([fn(keys[c], images[c]) for c in range(3)])
  batched = jax.jit(jax.vmap(fn))(keys, images)
  chex.assert_shape(batched, images.shape)
  np.testing.assert_allclose(batched, per_class, atol=1e-5)
  assert not np.allclose(per_class[0], images[0])

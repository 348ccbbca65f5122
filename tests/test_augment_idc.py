"""Tests for dd_jax.augment.idc (IDC's DiffAug, batch mode; docs/method.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from dd_jax import settings as settings_lib
from dd_jax.augment import idc, ops


def _images(seed, shape=(2, 8, 8, 3)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _params(**values):
  """Shared (batch-mode) parameters: identity-like defaults, overridden by `values`."""
  fields = dict(
    flip=[False],
    brightness=[0.5],
    saturation=[0.5],
    contrast=[0.5],
    geometric=0,
    shift_rows=[0],
    shift_cols=[0],
    scale_rows=[1.0],
    scale_cols=[1.0],
    angle=[0.0],
    cutout_rows=[-100],  # far outside: cuts nothing
    cutout_cols=[-100],
  )
  fields.update(values)
  dtypes = {'flip': bool, 'geometric': np.int32}
  for name in ('shift_rows', 'shift_cols', 'cutout_rows', 'cutout_cols'):
    dtypes[name] = np.int32
  return idc.Params(**{k: jnp.asarray(v, dtypes.get(k, jnp.float32)) for k, v in fields.items()})


def _numpy_diffaug(x, u1, u2, u3, t_h, t_w, o_h, o_w):
  """IDC's color -> crop -> cutout in float64 NumPy, one shared parameter set."""
  x = np.asarray(x, np.float64) + (u1 - 0.5)
  pixel_mean = x.mean(axis=3, keepdims=True)
  x = (x - pixel_mean) * (2 * u2) + pixel_mean
  image_mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - image_mean) * (u3 + 0.5) + image_mean
  _, height, width, _ = x.shape
  out = np.zeros_like(x)
  for i in range(height):
    for j in range(width):
      if 0 <= i + t_h < height and 0 <= j + t_w < width:
        out[:, i, j] = x[:, i + t_h, j + t_w]
  side = int(height * 0.5 + 0.5)
  rows = slice(max(o_h - side // 2, 0), max(o_h - side // 2 + side, 0))
  cols = slice(max(o_w - side // 2, 0), max(o_w - side // 2 + side, 0))
  out[:, rows, cols] = 0
  return out


# --------------------------------------------------------------------------- strategy


def test_parse_strategy_and_its_subsets():
  assert idc.parse_strategy('color_crop_cutout') == idc.Strategy(
    color=True, geometric=('crop',), cutout=True
  )
  assert idc.parse_strategy('cutout_color') == idc.Strategy(color=True, cutout=True)
  assert idc.parse_strategy('crop') == idc.Strategy(geometric=('crop',))
  assert idc.parse_strategy('color_crop_flip_scale_rotate') == idc.Strategy(
    flip=True, color=True, geometric=('crop', 'scale', 'rotate')
  )
  for empty in ('', 'none', 'None', None):
    assert idc.parse_strategy(empty).empty
  images = _images(0)
  np.testing.assert_array_equal(idc.augment(jax.random.key(0), images, 'none'), images)


@pytest.mark.parametrize(
  'strategy, bad', [('color_blur', 'blur'), ('brightness_crop', 'brightness'), ('crop__cutout', '')]
)
def test_unknown_op_names_are_refused_naming_the_field_and_allowed_ops(strategy, bad):
  with pytest.raises(ValueError, match='augment_strategy') as error:
    idc.parse_strategy(strategy)
  assert isinstance(error.value, settings_lib.SettingError)
  assert error.value.field == 'augment_strategy'
  assert f'unknown IDC DiffAug op {bad!r}' in str(error.value)
  for name in idc.VALID_OPS:
    assert name in str(error.value)
  with pytest.raises(ValueError, match='augment_strategy'):
    idc.augment(jax.random.key(0), _images(0), strategy)


# --------------------------------------------------------------------------- each op by hand


def test_colour_by_hand():
  # One image, 1x1 pixel, 2 channels (1, 3): brightness u1 = 0.75 adds 0.25 -> (1.25, 3.25);
  # saturation u2 = 0.25 halves the deviation from the pixel mean 2.25 -> (1.75, 2.75);
  # contrast u3 = 1.0 scales the deviation from the image mean 2.25 by 1.5 -> (1.5, 3.0).
  x = np.array([[[[1.0, 3.0]]]], np.float32)
  out = idc.apply(x, _params(brightness=[0.75], saturation=[0.25], contrast=[1.0]), 'color')
  np.testing.assert_allclose(out[0, 0, 0], [1.5, 3.0], rtol=1e-6)
  # Contrast's mean is per image over (H, W, C); two images do not mix.
  two = np.array([[[[0.0], [2.0]]], [[[10.0], [10.0]]]], np.float32)  # [2, 1, 2, 1]
  out = idc.apply(two, _params(contrast=[0.0]), 'color')  # factor 0.5 about each image's mean
  np.testing.assert_allclose(out[:, 0, :, 0], [[0.5, 1.5], [10.0, 10.0]], rtol=1e-6)


def test_crop_by_hand():
  # 4x4 (S = int(0.5 + 0.5) = 1): t_h = 1, t_w = -1 gives out(i, j) = x(i + 1, j - 1).
  x = np.arange(1.0, 17.0, dtype=np.float32).reshape(1, 4, 4, 1)
  expected = [[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0]]
  out = idc.apply(x, _params(shift_rows=[1], shift_cols=[-1]), 'crop')
  np.testing.assert_array_equal(out[0, :, :, 0], expected)
  # 'translate' shifts columns only.
  out = idc.apply(x, _params(shift_rows=[1], shift_cols=[1]), 'translate')
  np.testing.assert_array_equal(
    out[0, :, :, 0], [[2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0]]
  )


def test_cutout_by_hand():
  # 8x8, L = 4: centre (0, 8) zeroes rows -2..1 -> 0..1 and columns 6..9 -> 6..7, all channels.
  x = np.ones((1, 8, 8, 2), np.float32)
  out = idc.apply(x, _params(cutout_rows=[0], cutout_cols=[8]), 'cutout')
  expected = np.ones((8, 8))
  expected[0:2, 6:8] = 0
  for c in range(2):
    np.testing.assert_array_equal(out[0, :, :, c], expected)
  # Centre (3, 4): rows 1..4, columns 2..5.
  out = idc.apply(x, _params(cutout_rows=[3], cutout_cols=[4]), 'cutout')
  expected = np.ones((8, 8))
  expected[1:5, 2:6] = 0
  np.testing.assert_array_equal(out[0, :, :, 0], expected)


def test_flip_scale_rotate_are_the_dsa_ops_with_idcs_conventions():
  x = _images(1)
  np.testing.assert_array_equal(idc.apply(x, _params(flip=[True]), 'flip'), x[:, :, ::-1])
  np.testing.assert_array_equal(idc.apply(x, _params(flip=[False]), 'flip'), x)
  scaled = idc.apply(x, _params(scale_rows=[0.9], scale_cols=[1.1]), 'scale')
  np.testing.assert_allclose(
    scaled, ops.scale(x, np.array([1.1]).repeat(2), np.array([0.9]).repeat(2))
  )
  # IDC's theta [[cos a, -sin a], [sin a, cos a]] at a = +90 degrees turns a square image
  # anticlockwise as displayed (np.rot90 with k = 1).
  turned = idc.apply(x, _params(angle=[math.pi / 2]), 'rotate')
  np.testing.assert_allclose(turned, np.rot90(x, 1, axes=(1, 2)), atol=1e-5)


def test_full_chain_matches_numpy_in_order_color_crop_cutout():
  x = _images(2)
  values = dict(u1=0.3, u2=0.8, u3=0.1, t_h=-2, t_w=1, o_h=7, o_w=2)
  params = _params(
    brightness=[values['u1']],
    saturation=[values['u2']],
    contrast=[values['u3']],
    shift_rows=[values['t_h']],
    shift_cols=[values['t_w']],
    cutout_rows=[values['o_h']],
    cutout_cols=[values['o_w']],
  )
  out = idc.apply(x, params, 'color_crop_cutout')
  np.testing.assert_allclose(out, _numpy_diffaug(x, **values), rtol=1e-5, atol=1e-6)
  # The crop's zero fill and the cutout come after the colour ops: exact zeros.
  assert np.all(np.asarray(out)[:, :2] == 0)  # t_h = -2: rows 0, 1 had no source
  assert np.all(np.asarray(out)[:, 5:8, 0:4] == 0)  # cutout rows 5..8, columns -2..1 (clipped)


# --------------------------------------------------------------------------- draws


def test_draw_ranges_for_32x32():
  params = idc.sample_params(jax.random.key(0), 'color_crop_cutout', 32, 32, num_draws=4000)
  for name in ('shift_rows', 'shift_cols'):
    assert set(np.asarray(getattr(params, name)).tolist()) == set(range(-4, 5))
  for name in ('cutout_rows', 'cutout_cols'):
    assert set(np.asarray(getattr(params, name)).tolist()) == set(range(0, 33))
  for name in ('brightness', 'saturation', 'contrast'):
    values = np.asarray(getattr(params, name))
    assert values.min() >= 0 and values.max() < 1 and abs(values.mean() - 0.5) < 0.03
  assert 0.45 < np.asarray(params.flip).mean() < 0.55
  assert np.abs(np.asarray(params.angle)).max() <= math.radians(15)
  assert int(params.geometric) == 0  # one geometric op listed
  # Odd cutout side (30 px: L = 15): centres 0..29; 28 px: S = int(3.5 + 0.5) = 4.
  odd = idc.sample_params(jax.random.key(1), 'cutout', 30, 28, num_draws=4000)
  assert set(np.asarray(odd.cutout_rows).tolist()) == set(range(0, 30))
  assert set(np.asarray(odd.cutout_cols).tolist()) == set(range(0, 29))


def test_one_geometric_op_is_drawn_uniformly_among_those_listed():
  keys = jax.random.split(jax.random.key(0), 3000)
  draws = jax.vmap(lambda k: idc.sample_params(k, 'crop_scale_rotate', 8, 8).geometric)(keys)
  counts = np.bincount(np.asarray(draws), minlength=3)
  assert counts.sum() == 3000 and np.all(np.abs(counts - 1000) < 120)
  # The drawn op is applied: force each index.
  x = _images(3)
  params = _params(shift_rows=[1], scale_rows=[1.1], scale_cols=[1.1], angle=[0.2])
  for index, op in enumerate(('crop', 'scale', 'rotate')):
    out = idc.apply(x, params._replace(geometric=jnp.int32(index)), 'crop_scale_rotate')
    np.testing.assert_array_equal(out, idc.apply(x, params, op))


def test_determinism_and_independent_streams():
  key = jax.random.key(7)
  a = idc.sample_params(key, 'color_crop_cutout', 32, 32)
  b = idc.sample_params(key, 'color_crop_cutout', 32, 32)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = idc.sample_params(jax.random.key(8), 'color_crop_cutout', 32, 32)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))
  # Adding ops to the strategy changes no other draw (one stream per parameter).
  d = idc.sample_params(key, 'color_crop_cutout_flip_scale', 32, 32)
  for name in ('brightness', 'shift_rows', 'cutout_cols', 'flip'):
    np.testing.assert_array_equal(getattr(a, name), getattr(d, name))
  images = _images(4, (3, 32, 32, 3))
  np.testing.assert_array_equal(
    idc.augment(key, images, 'color_crop_cutout'), idc.augment(key, images, 'color_crop_cutout')
  )


def test_one_draw_transforms_real_and_synthetic_identically():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(5, 32, 32, 3)).astype(np.float32)
  syn = np.concatenate([real[2:3], rng.normal(size=(2, 32, 32, 3)).astype(np.float32)])
  params = idc.sample_params(jax.random.key(3), 'color_crop_cutout', 32, 32)
  real_out = idc.apply(real, params, 'color_crop_cutout')
  syn_out = idc.apply(syn, params, 'color_crop_cutout')
  np.testing.assert_array_equal(real_out[2], syn_out[0])  # the same image, the same transform
  # Applying to the concatenation [real; syn] (as IDC does) is the same as to each part.
  joint = idc.apply(np.concatenate([real, syn]), params, 'color_crop_cutout')
  np.testing.assert_allclose(joint, np.concatenate([real_out, syn_out]), rtol=1e-6, atol=1e-6)
  # And it is the numpy chain with the drawn scalars.
  scalars = dict(
    u1=float(params.brightness[0]),
    u2=float(params.saturation[0]),
    u3=float(params.contrast[0]),
    t_h=int(params.shift_rows[0]),
    t_w=int(params.shift_cols[0]),
    o_h=int(params.cutout_rows[0]),
    o_w=int(params.cutout_cols[0]),
  )
  np.testing.assert_allclose(real_out, _numpy_diffaug(real, **scalars), rtol=1e-5, atol=1e-5)


def test_per_image_draws_when_not_in_batch_mode():
  images = _images(6, (4, 8, 8, 3))
  params = idc.sample_params(jax.random.key(2), 'color_crop_cutout', 8, 8, num_draws=4)
  out = idc.apply(images, params, 'color_crop_cutout')
  for i in range(4):
    single = jax.tree_util.tree_map(lambda p: p if p.ndim == 0 else p[i : i + 1], params)
    np.testing.assert_allclose(
      out[i : i + 1],
      idc.apply(images[i : i + 1], single, 'color_crop_cutout'),
      rtol=1e-6,
      atol=1e-6,
    )


# --------------------------------------------------------------------------- gradients, jit


def test_gradients_reach_the_images_and_match_finite_differences_in_float64():
  strategy = 'color_crop_cutout'
  params = _params(
    brightness=[0.3],
    saturation=[0.8],
    contrast=[0.1],
    shift_rows=[1],
    shift_cols=[-1],
    cutout_rows=[1],
    cutout_cols=[3],
  )
  images = _images(7, (2, 32, 32, 3))
  weights = _images(8, (2, 32, 32, 3))
  grad = jax.grad(lambda x: jnp.sum(idc.apply(x, params, strategy) * weights))(images)
  assert np.abs(np.asarray(grad)).sum() > 0
  with float64():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 2)))  # S = 1, L = 2
    w = jnp.asarray(rng.normal(size=(2, 4, 4, 2)))
    p64 = params._replace(
      brightness=jnp.asarray([0.3]), saturation=jnp.asarray([0.8]), contrast=jnp.asarray([0.1])
    )
    loss = lambda x: jnp.sum(idc.apply(x, p64, strategy) ** 2 * w)
    analytic = np.asarray(jax.grad(loss)(x))
    assert analytic.dtype == np.float64 and np.any(analytic != 0)
    numeric = np.zeros(x.size)
    eps = 1e-6
    for index in range(x.size):
      step = np.zeros(x.size)
      step[index] = eps
      step = jnp.asarray(step.reshape(x.shape))
      numeric[index] = (loss(x + step) - loss(x - step)) / (2 * eps)
  np.testing.assert_allclose(analytic.ravel(), numeric, rtol=1e-6, atol=1e-8)


def test_everything_jits_and_vmaps():
  images = _images(10, (3, 16, 16, 3))
  key = jax.random.key(11)

  @jax.jit
  def step(key, images):
    params = idc.sample_params(key, 'color_crop_cutout_flip_scale_rotate', 16, 16)
    return idc.apply(images, params, 'color_crop_cutout_flip_scale_rotate')

  eager = idc.apply(
    images,
    idc.sample_params(key, 'color_crop_cutout_flip_scale_rotate', 16, 16),
    'color_crop_cutout_flip_scale_rotate',
  )
  np.testing.assert_allclose(step(key, images), eager, rtol=1e-6, atol=1e-6)
  # vmap over class keys: one draw per class-step.
  per_class = jax.vmap(lambda k, x: idc.augment(k, x, 'color_crop_cutout'))(
    jax.random.split(key, 2), np.stack([images, images])
  )
  assert per_class.shape == (2, 3, 16, 16, 3)
  assert not np.array_equal(per_class[0], per_class[1])

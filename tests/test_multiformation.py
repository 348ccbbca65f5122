"""Tests for dd_jax.multiformation (IDC-family decode and "mix" init; IDM's partition)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from dd_jax import multiformation as mf
from dd_jax.distill import idm


def _quadrant_image():
  """A hand-made test image: 1-channel 4x4, quadrants constant TL 1, TR 2, BL 3, BR 4."""
  image = np.zeros((1, 4, 4, 1), np.float32)
  image[0, :2, :2], image[0, :2, 2:], image[0, 2:, :2], image[0, 2:, 2:] = 1, 2, 3, 4
  return image


def _torch_upsample(image, factor):
  """PyTorch's bilinear upsampling (align_corners=False) of one [h, w] image by an integer
  factor, in float64: source coordinate (i + 0.5) / f - 0.5 clamped below at 0, neighbours
  floor and floor + 1 (clamped at the last pixel), weights 1 - frac and frac."""

  def axis_weights(size):
    out = np.zeros((factor * size, size))
    for i in range(factor * size):
      source = max((i + 0.5) / factor - 0.5, 0.0)
      low = int(np.floor(source))
      frac = source - low
      high = min(low + 1, size - 1)
      out[i, low] += 1 - frac
      out[i, high] += frac
    return out

  h, w = image.shape
  return axis_weights(h) @ np.asarray(image, np.float64) @ axis_weights(w).T


# --------------------------------------------------------------------------- decode


def test_family_test_vector_decodes_to_constant_images_1_2_3_4():
  decoded = mf.decode(_quadrant_image(), 2)
  assert decoded.shape == (4, 4, 4, 1)
  for k, value in enumerate([1, 2, 3, 4]):
    np.testing.assert_array_equal(decoded[k], np.full((4, 4, 1), value, np.float32))


def test_crop_orders_and_crop_major_output():
  image = _quadrant_image()
  np.testing.assert_array_equal(mf.split(image, 2, 'row')[:, 0, 0, 0, 0], [1, 2, 3, 4])
  np.testing.assert_array_equal(mf.split(image, 2, 'column')[:, 0, 0, 0, 0], [1, 3, 2, 4])
  # Two stored images (the second 10x the first): all top-left crops first, then top-right...
  two = np.concatenate([image, 10 * image])
  np.testing.assert_array_equal(mf.decode(two, 2)[:, 0, 0, 0], [1, 10, 2, 20, 3, 30, 4, 40])
  # f = 3 on a 6x6 image whose 2x2 blocks hold 0..8 in reading order.
  blocks = np.arange(9.0, dtype=np.float32).reshape(3, 3)
  image3 = np.kron(blocks, np.ones((2, 2), np.float32))[None, :, :, None]
  np.testing.assert_array_equal(mf.decode(image3, 3)[:, 0, 0, 0], np.arange(9))
  np.testing.assert_array_equal(mf.decode(image3, 3, 'column')[:, 0, 0, 0], blocks.T.ravel())


@pytest.mark.parametrize('order', mf.ORDERS)
@pytest.mark.parametrize('factor', [1, 2, 4])
def test_assemble_inverts_split(factor, order):
  images = np.random.default_rng(0).normal(size=(3, 8, 12, 2)).astype(np.float32)
  crops = mf.split(images, factor, order)
  assert crops.shape == (factor * factor, 3, 8 // factor, 12 // factor, 2)
  np.testing.assert_array_equal(mf.assemble(crops, order), images)


@pytest.mark.parametrize('factor, size', [(2, 4), (2, 6), (3, 6)])
def test_upsampling_is_pytorchs_half_pixel_bilinear_in_float64(factor, size):
  # Stored [1, factor * size, factor * size, 2]; every crop is compared with the formula.
  rng = np.random.default_rng(factor)
  with float64():
    images = jnp.asarray(rng.normal(size=(1, factor * size, factor * size, 2)))
    decoded = np.asarray(mf.decode(images, factor))
    crops = np.asarray(mf.split(images, factor))
  assert decoded.dtype == np.float64
  for k in range(factor * factor):
    for c in range(2):
      expected = _torch_upsample(crops[k, 0, :, :, c], factor)
      np.testing.assert_allclose(decoded[k, :, :, c], expected, rtol=1e-12, atol=1e-12)


def test_bilinear_x2_by_hand():
  # A 2x2 crop [[a, b], [c, d]] -> 4x4: border rows/columns repeat (clamped source), inner ones
  # mix 3:1 (sources -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1).
  image = np.zeros((1, 4, 4, 1), np.float32)
  image[0, :2, :2, 0] = [[0.0, 4.0], [8.0, 16.0]]
  row_weights = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  expected = row_weights @ np.array([[0.0, 4.0], [8.0, 16.0]]) @ row_weights.T
  np.testing.assert_allclose(mf.decode(image, 2)[0, :, :, 0], expected, rtol=1e-6)
  assert expected[1, 1] == pytest.approx(
    0.75 * (0.75 * 0 + 0.25 * 4) + 0.25 * (0.75 * 8 + 0.25 * 16)
  )


def test_decode_classes_is_class_blocked_with_repeated_labels():
  # 3 classes x ipc 2; stored image i is the constant i.
  images = np.arange(6.0, dtype=np.float32)[:, None, None, None] * np.ones((6, 4, 4, 1), np.float32)
  labels = np.repeat(np.arange(3), 2)
  decoded, decoded_labels = mf.decode_classes(images, labels, 3, 2)
  assert decoded.shape == (24, 4, 4, 1)
  np.testing.assert_array_equal(decoded_labels, np.repeat(np.arange(3), 8))
  np.testing.assert_array_equal(
    decoded[:, 0, 0, 0], np.repeat(np.arange(6.0).reshape(3, 1, 2), 4, 1).ravel()
  )


def test_refuses_sizes_that_are_not_multiples_of_the_factor():
  with pytest.raises(ValueError, match='multiples of 3'):
    mf.decode(np.zeros((1, 8, 8, 1), np.float32), 3)
  with pytest.raises(ValueError, match="order='diagonal'"):
    mf.split(np.zeros((1, 4, 4, 1), np.float32), 2, 'diagonal')


# --------------------------------------------------------------------------- mix init


def test_nearest_downsample_keeps_every_fth_pixel_and_mean_pools():
  image = np.arange(36.0, dtype=np.float32).reshape(1, 6, 6, 1)
  np.testing.assert_array_equal(
    mf.downsample(image, 2)[0, :, :, 0], [[0, 2, 4], [12, 14, 16], [24, 26, 28]]
  )
  np.testing.assert_array_equal(mf.downsample(image, 3)[0, :, :, 0], [[0, 3], [18, 21]])
  np.testing.assert_array_equal(mf.downsample(image, 3, 'mean')[0, :, :, 0], [[7, 10], [25, 28]])


def test_mix_init_tiles_crop_k_with_images_k_ipc_to_k_plus_1_ipc():
  ipc = 2
  # Real image r is the constant r + 1 with a marker at its top-left pixel (kept by 'nearest').
  real = np.ones((4 * ipc, 4, 4, 1), np.float32) * np.arange(1.0, 9.0)[:, None, None, None]
  real[:, 0, 0, 0] = -np.arange(1.0, 9.0)
  stored = mf.mix_init(real, ipc, 2)
  assert stored.shape == (ipc, 4, 4, 1)
  # Stored image i, quadrant k (TL, TR, BL, BR) = real image k * ipc + i, downsampled.
  for i in range(ipc):
    quadrants = mf.split(stored, 2)[:, i]
    np.testing.assert_array_equal(quadrants[:, 0, 0, 0], [-(i + 1), -(i + 3), -(i + 5), -(i + 7)])
    np.testing.assert_array_equal(quadrants[:, 1, 1, 0], [i + 1, i + 3, i + 5, i + 7])
  # Decoding returns the real images in their order (the markers are blurred by upsampling).
  np.testing.assert_array_equal(mf.decode(stored, 2)[:, 3, 3, 0], np.arange(1.0, 9.0))
  with pytest.raises(ValueError, match='takes 8 real images; got 7'):
    mf.mix_init(real[:7], ipc, 2)


def test_everything_jits_and_matches_eager():
  images = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
  labels = np.repeat(np.arange(2), 2)
  np.testing.assert_array_equal(
    jax.jit(mf.decode, static_argnums=(1, 2))(images, 2), mf.decode(images, 2)
  )
  jitted = jax.jit(mf.decode_classes, static_argnums=(2, 3, 4))(images, labels, 2, 2)
  np.testing.assert_array_equal(jitted[0], mf.decode_classes(images, labels, 2, 2)[0])
  np.testing.assert_array_equal(
    jax.jit(mf.mix_init, static_argnums=(1, 2))(images, 1, 2), mf.mix_init(images, 1, 2)
  )
  # Gradients reach every stored pixel (the decode is linear: each pixel feeds f * f outputs).
  grad = jax.grad(lambda x: jnp.sum(mf.decode(x, 2) ** 2))(images)
  assert np.all(np.asarray(grad) != 0)


# --------------------------------------------------------------------------- IDM unchanged
# IDM's partition as it was written before dd_jax.multiformation (kept here verbatim as the
# reference): quadrants by slicing in order TL, BL, TR, BR, 2x2 average pooling, the same resize.


def _old_downscale(images):
  n, height, width, channels = images.shape
  blocks = images.reshape(n, height // 2, 2, width // 2, 2, channels)
  return jnp.mean(blocks, axis=(2, 4))


def _old_assemble_quadrants(quadrants):
  top_left, bottom_left, top_right, bottom_right = quadrants
  left = jnp.concatenate([top_left, bottom_left], axis=1)
  right = jnp.concatenate([top_right, bottom_right], axis=1)
  return jnp.concatenate([left, right], axis=2)


def _old_split_quadrants(images):
  half_h, half_w = images.shape[1] // 2, images.shape[2] // 2
  return jnp.stack(
    [
      images[:, :half_h, :half_w],
      images[:, half_h:, :half_w],
      images[:, :half_h, half_w:],
      images[:, half_h:, half_w:],
    ]
  )


def _old_expand(images):
  quadrants = _old_split_quadrants(images)
  _, n, half_h, half_w, channels = quadrants.shape
  upsampled = jax.image.resize(quadrants, (4, n, 2 * half_h, 2 * half_w, channels), 'bilinear')
  return upsampled.reshape(4 * n, 2 * half_h, 2 * half_w, channels)


def _old_expanded_set(images, labels, num_classes):
  ipc = images.shape[0] // num_classes
  expanded = jax.vmap(_old_expand)(images.reshape(num_classes, ipc, *images.shape[1:]))
  return (
    expanded.reshape(num_classes * 4 * ipc, *images.shape[1:]),
    jnp.repeat(labels.reshape(num_classes, ipc)[:, 0], 4 * ipc),
  )


def _old_partitioned_init(real):
  return _old_assemble_quadrants(jax.vmap(_old_downscale)(real))


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_idm_partition_is_bitwise_unchanged(jit):
  wrap = (lambda f, **kw: jax.jit(f, **kw)) if jit else (lambda f, **kw: f)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
  labels = np.repeat(np.arange(3), 2).astype(np.int32)
  real = rng.normal(size=(3, 4, 2, 32, 32, 3)).astype(np.float32)  # [K, 4, ipc, ...] as IDM's init
  pairs = [
    (wrap(idm.downscale)(images), wrap(_old_downscale)(images)),
    (wrap(idm.split_quadrants)(images), wrap(_old_split_quadrants)(images)),
    (wrap(idm.expand)(images), wrap(_old_expand)(images)),
    (
      wrap(jax.vmap(idm.partitioned_init))(real),
      wrap(jax.vmap(_old_partitioned_init))(real),
    ),
  ]
  quadrants = _old_split_quadrants(images)
  pairs.append((wrap(idm.assemble_quadrants)(quadrants), wrap(_old_assemble_quadrants)(quadrants)))
  new_set = wrap(idm.expanded_set, static_argnums=2)(images, labels, 3)
  old_set = wrap(_old_expanded_set, static_argnums=2)(images, labels, 3)
  pairs += list(zip(new_set, old_set))
  for new, old in pairs:
    assert new.dtype == old.dtype and new.shape == old.shape
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))  # bitwise, not allclose

"""The convolution and instance-norm kernels of the networks, and how a convolution is lowered.

Each kernel computes what XLA's convolution or Flax's norms compute, up to float rounding (tested
in float64), in a form XLA:CPU runs faster: convolutions as patches and one matmul (`im2col`,
whose backward pass is a matmul too, where XLA:CPU's convolution backward is 15-50x slower inside
`lax.scan`, jax-ml/jax#12868), Winograd F(2x2, 3x3), a first layer's instance norm folded into
per-sample convolution weights, and an instance norm with a hand-written backward pass. Which of
them a network uses is a `ConvLowering`, chosen once per run by `dd_jax.lowering`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-5

CONV_IMPLS = ('xla', 'im2col', 'winograd')


@dataclasses.dataclass(frozen=True)
class ConvLowering:
  """How `layers.Conv` computes its convolution; every choice gives the same numbers to float
  rounding.

  Attributes:
    impl: 'xla' (`lax.conv_general_dilated`), 'im2col' (`conv2d_im2col`: patches and one
      matmul, for training loops on CPU) or 'winograd' (`conv2d_winograd` where
      `winograd_applies`, else im2col).
    fold_norm: a following instance norm is folded into the convolution (`conv_instance_norm`)
      in layers with at most FOLD_NORM_MAX_PATCH values per patch (a first layer).
  """

  impl: str = 'xla'
  fold_norm: bool = False

  def __post_init__(self):
    if self.impl not in CONV_IMPLS:
      raise ValueError(f'Unknown convolution impl {self.impl!r}; choose one of {CONV_IMPLS}.')

  def folds_norm(self, kernel_shape: tuple[int, ...]) -> bool:
    """Whether a convolution with this [kh, kw, C_in, C_out] kernel folds a following norm."""
    kh, kw, c_in, _ = kernel_shape
    return self.fold_norm and kh * kw * c_in <= FOLD_NORM_MAX_PATCH


def _im2col_patches(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> jax.Array:
  """[N, H, W, C] -> [N, H_out, W_out, kh * kw * C]: each output position's input patch.

  k*k strided slices concatenated on channels, in the order (i, j, c) of
  kernel.reshape(kh * kw * C, C_out).
  """
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h_out = (x.shape[1] - kh) // stride + 1
  w_out = (x.shape[2] - kw) // stride + 1
  if kh == kw == 1:
    return x[:, : stride * (h_out - 1) + 1 : stride, : stride * (w_out - 1) + 1 : stride, :]
  return jnp.concatenate(
    [
      x[:, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride, :]
      for i in range(kh)
      for j in range(kw)
    ],
    axis=-1,
  )


def conv2d_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """NHWC convolution as k*k strided slices concatenated on channels, then one matmul.

  Args:
    x: [N, H, W, C_in].
    kernel: [kh, kw, C_in, C_out] (HWIO).
    stride: spatial stride.
    padding: symmetric zero padding.

  Returns:
    [N, H_out, W_out, C_out], equal to `lax.conv_general_dilated` up to float rounding.
  """
  kh, kw, c_in, c_out = kernel.shape
  patches = _im2col_patches(x, kh, kw, stride, padding)
  return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out))


# The folded norm (`conv_instance_norm`) adds a per-sample [K, K] patch covariance to the
# convolution's [K, C_out] products per output position: cheap for a first layer (K = 27 on RGB,
# 9 on grey), not for wide ones.
FOLD_NORM_MAX_PATCH = 64


def conv_instance_norm(
  x: jax.Array,
  kernel: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  stride: int,
  padding: int,
  relu: bool,
) -> jax.Array:
  """Instance norm of a convolution's output, folded into per-sample convolution weights.

  The output at a position is w_c . p for its input patch p (the convolution's own bias cancels
  in the norm), so its spatial mean per channel is w_c . mean(p) and its variance w_c^T Cov(p)
  w_c, with the [K, K] covariance of the sample's patches. The normalised output is then one
  matrix product of the patches with per-sample weights w_c * gain_c plus a per-sample offset:
  the [N, H, W, C_out] map is written once, never read for statistics, and its gradient flows
  straight into the per-sample weight gradients (no norm backward pass over the map).

  Args:
    x: [N, H, W, C_in].
    kernel: [kh, kw, C_in, C_out] (HWIO).
    scale: [C_out], the norm's scale.
    bias: [C_out], the norm's bias.
    stride: spatial stride.
    padding: symmetric zero padding.
    relu: apply max(., 0) to the output.

  Returns:
    [N, H_out, W_out, C_out]: `instance_norm` of the convolution (any bias), equal to it up to
    float rounding (tested in float64), then the ReLU if `relu`.
  """
  kh, kw, c_in, c_out = kernel.shape
  patches = _im2col_patches(x, kh, kw, stride, padding)
  n, h_out, w_out, patch_size = patches.shape
  patches = patches.reshape(n, h_out * w_out, patch_size)
  weight = kernel.reshape(patch_size, c_out)
  patch_mean = jnp.mean(patches, axis=1)  # [N, K]
  centered = patches - patch_mean[:, None, :]
  covariance = jnp.einsum('npk,npl->nkl', centered, centered) / (h_out * w_out)
  # w^T C w >= 0 in exact arithmetic; the clamp keeps rounding from taking it below zero.
  variance = jnp.maximum(jnp.einsum('nkl,kc,lc->nc', covariance, weight, weight), 0.0)
  gain = jax.lax.rsqrt(variance + NORM_EPS) * scale  # [N, C_out]
  offset = bias - (patch_mean @ weight) * gain
  y = jnp.einsum('npk,nkc->npc', patches, weight[None] * gain[:, None, :]) + offset[:, None, :]
  if relu:
    y = jnp.maximum(y, 0.0)
  return y.reshape(n, h_out, w_out, c_out)


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# CVPR 2016): each 2x2 output tile of a 3x3 convolution is A^T [(G g G^T) * (B^T d B)] A for the
# 4x4 input tile d around it, so 16 products per tile replace 36. All entries are 0, +-1 or
# +-1/2: the transforms are exact in floating point.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
# With fewer input channels the tile transforms cost more than the saved products (the first
# layer of an RGB network keeps im2col).
WINOGRAD_MIN_CHANNELS = 16


def winograd_applies(
  input_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int, padding: int
) -> bool:
  """Whether `conv2d_winograd` computes this convolution (else impl 'winograd' uses im2col).

  Args:
    input_shape: [N, H, W, C_in].
    kernel_shape: [kh, kw, C_in, C_out].
    stride: spatial stride.
    padding: symmetric zero padding.

  Returns:
    True for 3x3 kernels at stride 1 and padding 1 ('same') on maps with even H and W and at
    least WINOGRAD_MIN_CHANNELS input channels.
  """
  _, height, width, channels = input_shape
  return (
    tuple(kernel_shape[:2]) == (3, 3)
    and stride == 1
    and padding == 1
    and height % 2 == 0
    and width % 2 == 0
    and channels >= WINOGRAD_MIN_CHANNELS
  )


def _linear_combinations(matrix: np.ndarray, parts: list) -> list:
  """[sum_k matrix[r, k] * parts[k] for each row r], skipping zeros (elementwise, fused by XLA)."""
  combinations = []
  for row in matrix:
    total = None
    for coefficient, part in zip(row, parts):
      if coefficient == 0:
        continue
      term = part if coefficient == 1 else -part if coefficient == -1 else coefficient * part
      total = term if total is None else total + term
    combinations.append(total)
  return combinations


def _tile_transform(matrix: np.ndarray, tiles: list[list]) -> list[list]:
  """out[a][b] = sum_ij matrix[a, i] matrix[b, j] tiles[i][j], on nested lists of arrays."""
  columns = [_linear_combinations(matrix, [row[j] for row in tiles]) for j in range(len(tiles[0]))]
  return [
    _linear_combinations(matrix, [column[a] for column in columns]) for a in range(len(matrix))
  ]


def _stack_tiles(tiles: list[list]) -> jax.Array:
  """4x4 nested list of [N, th, tw, C] -> [16, N * th * tw, C] (one matrix per tile position)."""
  stacked = jnp.stack([tile for row in tiles for tile in row])
  return stacked.reshape(16, -1, stacked.shape[-1])


def _unstack_tiles(stacked: jax.Array, shape: tuple[int, ...]) -> list[list]:
  stacked = stacked.reshape(4, 4, *shape)
  return [[stacked[i, j] for j in range(4)] for i in range(4)]


def _winograd_forward(x, kernel):
  n, height, width, c_in = x.shape
  tiles_h, tiles_w = height // 2, width // 2
  # Padded rows 2T + i of tile T (i = 0..3) as (tile T + i // 2, parity i % 2): contiguous slices.
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  padded = padded.reshape(n, tiles_h + 1, 2, tiles_w + 1, 2, c_in)
  input_tiles = [
    [
      padded[:, i // 2 : i // 2 + tiles_h, i % 2, j // 2 : j // 2 + tiles_w, j % 2, :]
      for j in range(4)
    ]
    for i in range(4)
  ]
  transformed_input = _stack_tiles(_tile_transform(_WINOGRAD_BT, input_tiles))  # [16, P, C_in]
  g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
  transformed_kernel = jnp.einsum('ai,bj,ijco->abco', g, g, kernel).reshape(16, c_in, -1)
  products = jnp.einsum('tpc,tco->tpo', transformed_input, transformed_kernel)
  c_out = products.shape[-1]
  output_tiles = _tile_transform(
    _WINOGRAD_AT, _unstack_tiles(products, (n, tiles_h, tiles_w, c_out))
  )  # [r][s]: output pixel (2T + r, 2S + s)
  y = jnp.stack([jnp.stack(row, axis=3) for row in output_tiles], axis=2)
  return y.reshape(n, height, width, c_out), (transformed_input, transformed_kernel, x.shape)


def _winograd_backward(residuals, dy):
  transformed_input, transformed_kernel, (n, height, width, c_in) = residuals
  tiles_h, tiles_w, c_out = height // 2, width // 2, dy.shape[-1]
  dy = dy.reshape(n, tiles_h, 2, tiles_w, 2, c_out)
  dy_tiles = [[dy[:, :, r, :, s, :] for s in range(2)] for r in range(2)]
  d_products = _stack_tiles(_tile_transform(_WINOGRAD_AT.T, dy_tiles))  # [16, P, C_out]
  d_transformed_kernel = jnp.einsum('tpc,tpo->tco', transformed_input, d_products)
  g = jnp.asarray(_WINOGRAD_G, d_transformed_kernel.dtype)
  d_kernel = jnp.einsum('ai,bj,abco->ijco', g, g, d_transformed_kernel.reshape(4, 4, c_in, c_out))
  d_transformed_input = jnp.einsum('tpo,tco->tpc', d_products, transformed_kernel)
  d_tiles = _tile_transform(
    _WINOGRAD_BT.T, _unstack_tiles(d_transformed_input, (n, tiles_h, tiles_w, c_in))
  )
  # Tiles overlap by two pixels: element i = 2p + q of tile T lands on padded row 2(T + p) + q.
  # Per parity (q, q'), add the four tile shifts (p, p'), then interleave the parities.
  parities = []
  for q in range(2):
    row = []
    for q_w in range(2):
      total = None
      for p in range(2):
        for p_w in range(2):
          part = jnp.pad(
            d_tiles[2 * p + q][2 * p_w + q_w], ((0, 0), (p, 1 - p), (p_w, 1 - p_w), (0, 0))
          )
          total = part if total is None else total + part
      row.append(total)  # [N, th + 1, tw + 1, C_in]
    parities.append(jnp.stack(row, axis=3))
  d_padded = jnp.stack(parities, axis=2).reshape(n, height + 2, width + 2, c_in)
  return d_padded[:, 1:-1, 1:-1, :], d_kernel


@jax.custom_vjp
def _conv2d_winograd(x, kernel):
  return _winograd_forward(x, kernel)[0]


_conv2d_winograd.defvjp(_winograd_forward, _winograd_backward)


def conv2d_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'same' NHWC convolution (stride 1, padding 1) by Winograd F(2x2, 3x3).

  The 4x4 input tiles and the kernel are transformed, multiplied as 16 matrix products of
  [N * H * W / 4, C_in] x [C_in, C_out] (2.25x fewer multiplications than im2col's one), and
  transformed back; the hand-written backward pass does the same with the transposed transforms
  (two batches of 16 products, no patch matrices). Reverse mode only (`jax.custom_vjp`).

  Args:
    x: [N, H, W, C_in] with H and W even.
    kernel: [3, 3, C_in, C_out] (HWIO).

  Returns:
    [N, H, W, C_out], equal to `lax.conv_general_dilated` with padding 1 up to float rounding
    (its float32 error against float64 is that of im2col; tested).
  """
  if tuple(kernel.shape[:2]) != (3, 3) or x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(
      f'conv2d_winograd takes a 3x3 kernel and even map sides; got input {x.shape}, kernel '
      f'{kernel.shape}. Use conv2d_im2col for other convolutions.'
    )
  return _conv2d_winograd(jnp.asarray(x), jnp.asarray(kernel))


def _instance_norm_statistics(x):
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  # Two-pass (biased) variance, like PyTorch and Flax's use_fast_variance=False; the centred map
  # is fused into the reduction, not stored.
  centered = x - mean
  variance = jnp.mean(centered * centered, axis=(1, 2), keepdims=True)
  return mean, jax.lax.rsqrt(variance + NORM_EPS)


def _instance_norm_forward(x, scale, bias, relu):
  mean, inverse_std = _instance_norm_statistics(x)
  # One per-sample, per-channel affine map: the output is a single pass over x.
  gain = inverse_std * scale
  y = x * gain + (bias - mean * gain)
  if relu:
    y = jnp.maximum(y, 0.0)
  # The input and [N, 1, 1, C] statistics are the residuals: the backward pass recomputes the
  # normalized map (and the ReLU mask) inside its fused loops instead of storing them.
  return y, (x, mean, inverse_std, scale, bias)


def _instance_norm_backward(relu, residuals, grad_out):
  x, mean, inverse_std, scale, bias = residuals
  gain = inverse_std * scale
  if relu:
    grad_out = jnp.where(x * gain + (bias - mean * gain) > 0, grad_out, 0.0)
  # d/dx of scale * (x - mean) / std per sample and channel: the gradient minus its spatial mean
  # and minus its spatial correlation with the normalized map, times scale / std. Both spatial
  # sums come from one pass over (grad_out, x); grad_x is then one elementwise pass.
  size = x.shape[1] * x.shape[2]
  sum_grad = jnp.sum(grad_out, axis=(1, 2), keepdims=True)
  sum_grad_centered = jnp.sum(grad_out * (x - mean), axis=(1, 2), keepdims=True)
  centered_coefficient = gain * inverse_std * inverse_std * sum_grad_centered / size
  grad_x = gain * grad_out - gain * sum_grad / size - (x - mean) * centered_coefficient
  grad_scale = jnp.sum(inverse_std * sum_grad_centered, axis=(0, 1, 2))
  grad_bias = jnp.sum(sum_grad, axis=(0, 1, 2))
  return grad_x, grad_scale, grad_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _instance_norm(x, scale, bias, relu):
  return _instance_norm_forward(x, scale, bias, relu)[0]


_instance_norm.defvjp(_instance_norm_forward, _instance_norm_backward)


def instance_norm(
  x: jax.Array, scale: jax.Array, bias: jax.Array, *, relu: bool = False
) -> jax.Array:
  """Instance norm of NHWC maps with a per-channel affine, and a hand-written backward pass.

  Args:
    x: [N, H, W, C].
    scale: [C].
    bias: [C].
    relu: apply a ReLU to the output inside the same VJP (its mask is recomputed from x in the
      backward pass rather than stored).

  Returns:
    [N, H, W, C]: (x - mean) / sqrt(var + 1e-5) * scale + bias, with the mean and the biased
    variance over (H, W) of each sample and channel, then max(., 0) if `relu`. Equal to group
    norm with one group per channel up to float rounding. The backward pass keeps only x and
    the [N, 1, 1, C] statistics and reads them in two fused passes; against autodiff of Flax's
    GroupNorm it saves XLA:CPU a sixth of a ConvNet training step, and its float32 image
    gradient is ~1000x closer to float64 (docs/results.md). Reverse mode only
    (`jax.custom_vjp`).
  """
  # As jax arrays: custom_vjp refuses NumPy constants (a pool member's host-side weights).
  return _instance_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), relu)

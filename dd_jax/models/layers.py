"""Layers with PyTorch-default initialisation and PyTorch norm semantics.

DM never trains its backbone, so the initial weight distribution *is* the embedding: conv and
dense weights and biases are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in PyTorch
(the DC benchmark code), and every norm uses eps 1e-5 (Flax defaults to 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_EPS = 1e-5
# PyTorch BatchNorm momentum 0.1 updates running = 0.9 * running + 0.1 * batch.
BATCH_NORM_MOMENTUM = 0.9

NORMS = ('none', 'instancenorm', 'batchnorm', 'layernorm', 'groupnorm')
ACTIVATIONS = ('relu', 'sigmoid', 'leakyrelu', 'swish')
POOLINGS = ('avgpooling', 'maxpooling', 'none')


def torch_uniform_init(fan_in: int) -> Callable[..., jax.Array]:
  """Initializer drawing from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default.

  PyTorch's kaiming_uniform_(a=sqrt(5)) for weights and its bias rule both reduce to this bound.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


CONV_IMPLS = ('auto', 'xla', 'im2col')


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' -> 'im2col' on CPU, 'xla' elsewhere.

  XLA:CPU runs the backward pass of a convolution 15-50x slower inside a loop (`lax.scan`, as in
  the evaluation program) than outside it (jax-ml/jax#12868; measured here on a 3-layer ConvNet:
  12.8 s vs 0.25 s per step at 32x32). As patches + one matmul, the backward is a matmul too, and
  the loop penalty disappears.
  """
  if conv_impl == 'auto':
    return 'im2col' if jax.default_backend() == 'cpu' else 'xla'
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; choose one of {CONV_IMPLS}.')
  return conv_impl


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
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h_out = (x.shape[1] - kh) // stride + 1
  w_out = (x.shape[2] - kw) // stride + 1
  if kh == kw == 1:
    patches = x[:, : stride * (h_out - 1) + 1 : stride, : stride * (w_out - 1) + 1 : stride, :]
  else:
    # Channel order (i, j, c) matches kernel.reshape(kh * kw * c_in, c_out).
    patches = jnp.concatenate(
      [
        x[
          :, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride, :
        ]
        for i in range(kh)
        for j in range(kw)
      ],
      axis=-1,
    )
  return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out))


class Conv(nn.Module):
  """2D convolution (NHWC, HWIO kernel) with PyTorch-default init and symmetric padding.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    stride: spatial stride.
    padding: symmetric zero padding.
    use_bias: add a bias (initialised like the weights).
    conv_impl: 'auto', 'xla' (lax.conv_general_dilated) or 'im2col'; see resolve_conv_impl.
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in = x.shape[-1]
    init = torch_uniform_init(c_in * self.kernel_size * self.kernel_size)
    kernel = self.param('kernel', init, (self.kernel_size, self.kernel_size, c_in, self.features))
    if resolve_conv_impl(self.conv_impl) == 'im2col':
      y = conv2d_im2col(x, kernel, self.stride, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (self.stride, self.stride),
        ((self.padding, self.padding),) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
    if self.use_bias:
      y = y + self.param('bias', init, (self.features,))
    return y


def dense(features: int, in_features: int, *, name: str | None = None) -> nn.Dense:
  """A dense layer with PyTorch-default init."""
  if in_features == 0:
    raise ValueError(
      'The input image is too small for this network: its feature map shrinks to '
      'nothing before the classifier (e.g. ResNet18, VGG11, LeNet on 8x8 digits). '
      'Use a network whose pooling fits the image size, such as ConvNet.'
    )
  init = torch_uniform_init(in_features)
  return nn.Dense(features, kernel_init=init, bias_init=init, name=name)


def _instance_norm_forward(x, scale, bias):
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  centered = x - mean
  # Two-pass (biased) variance, like PyTorch and Flax's use_fast_variance=False.
  variance = jnp.mean(centered * centered, axis=(1, 2), keepdims=True)
  inverse_std = jax.lax.rsqrt(variance + NORM_EPS)
  normalized = centered * inverse_std
  return normalized * scale + bias, (normalized, inverse_std, scale)


def _instance_norm_backward(residuals, grad_out):
  normalized, inverse_std, scale = residuals
  grad_normalized = grad_out * scale
  # d/dx of (x - mean) / std per sample and channel: the gradient minus its spatial mean and
  # minus its spatial correlation with the normalized map, over std.
  mean_grad = jnp.mean(grad_normalized, axis=(1, 2), keepdims=True)
  mean_grad_dot = jnp.mean(grad_normalized * normalized, axis=(1, 2), keepdims=True)
  grad_x = inverse_std * (grad_normalized - mean_grad - normalized * mean_grad_dot)
  grad_scale = jnp.sum(grad_out * normalized, axis=(0, 1, 2))
  grad_bias = jnp.sum(grad_out, axis=(0, 1, 2))
  return grad_x, grad_scale, grad_bias


@jax.custom_vjp
def _instance_norm(x, scale, bias):
  return _instance_norm_forward(x, scale, bias)[0]


_instance_norm.defvjp(_instance_norm_forward, _instance_norm_backward)


def instance_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """Instance norm of NHWC maps with a per-channel affine, and a hand-written backward pass.

  Args:
    x: [N, H, W, C].
    scale: [C].
    bias: [C].

  Returns:
    [N, H, W, C]: (x - mean) / sqrt(var + 1e-5) * scale + bias, with the mean and the biased
    variance over (H, W) of each sample and channel. Equal to group norm with one group per
    channel up to float rounding. Against autodiff of Flax's GroupNorm, the analytic backward
    saves XLA:CPU a tenth of a ConvNet training step and a fifth of a DM image gradient, and
    its float32 image gradient is ~1000x closer to float64 (`experiments/bench_norm.py`).
    Reverse mode only (`jax.custom_vjp`).
  """
  # As jax arrays: custom_vjp refuses NumPy constants (a pool member's host-side weights).
  return _instance_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))


class InstanceNorm(nn.Module):
  """`instance_norm` with learnt scale (ones) and bias (zeros) of shape [C], as in PyTorch's
  GroupNorm(C, C); the parameter names are Flax GroupNorm's, so stored networks load unchanged.
  """

  epsilon = NORM_EPS  # fixed, as in every norm here

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    return instance_norm(x, scale, bias)


def norm_layer(kind: str, channels: int, *, train: bool, name: str | None = None):
  """Returns a callable norm layer for NHWC maps, or the identity for 'none'.

  Args:
    kind: one of NORMS. 'instancenorm' is `InstanceNorm`, group norm with one group per channel
      (affine, no running statistics, so train and eval are identical); 'groupnorm' uses 4
      groups; 'layernorm' normalises over (H, W, C) with an element-wise affine of shape
      (H, W, C) like PyTorch's LayerNorm(shape_feat); 'batchnorm' keeps running statistics in
      `batch_stats`.
    channels: number of channels C.
    train: batch norm uses batch statistics (and updates running ones) when True.
    name: optional submodule name.
  """
  if kind == 'none':
    return lambda x: x
  if kind == 'instancenorm':
    return InstanceNorm(name=name)
  if kind == 'groupnorm':
    return nn.GroupNorm(num_groups=4, epsilon=NORM_EPS, use_fast_variance=False, name=name)
  if kind == 'layernorm':
    return nn.LayerNorm(
      epsilon=NORM_EPS,
      reduction_axes=(-3, -2, -1),
      feature_axes=(-3, -2, -1),
      use_fast_variance=False,
      name=name,
    )
  if kind == 'batchnorm':
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=BATCH_NORM_MOMENTUM,
      epsilon=NORM_EPS,
      use_fast_variance=False,
      name=name,
    )
  raise ValueError(f'Unknown norm {kind!r}; choose one of {NORMS}.')


def activation(kind: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function named `kind` (one of ACTIVATIONS)."""
  if kind == 'relu':
    return nn.relu
  if kind == 'sigmoid':
    return nn.sigmoid
  if kind == 'leakyrelu':
    return lambda x: nn.leaky_relu(x, negative_slope=0.01)
  if kind == 'swish':
    return nn.swish
  raise ValueError(f'Unknown activation {kind!r}; choose one of {ACTIVATIONS}.')


def pool(kind: str, x: jax.Array) -> jax.Array:
  """2x2 stride-2 pooling (floor, like PyTorch), or the identity for 'none'."""
  if kind == 'avgpooling':
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  if kind == 'maxpooling':
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  if kind == 'none':
    return x
  raise ValueError(f'Unknown pooling {kind!r}; choose one of {POOLINGS}.')

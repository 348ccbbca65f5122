"""Layers with PyTorch-default initialisation and PyTorch norm semantics.

DM never trains its backbone, so the initial weight distribution *is* the embedding: conv and
dense weights and biases are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in PyTorch
(the DC benchmark code), and every norm uses eps 1e-5 (Flax defaults to 1e-6). Parameters are
float32 whatever `jax_enable_x64` says (the kernels' float64 tests cast them explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dd_jax.models import kernels
from dd_jax.models.kernels import NORM_EPS

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


class Conv(nn.Module):
  """2D convolution (NHWC, HWIO kernel) with PyTorch-default init and symmetric padding.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    stride: spatial stride.
    padding: symmetric zero padding.
    use_bias: add a bias (initialised like the weights).
    lowering: how the convolution is computed (`kernels.ConvLowering`; same numbers to float
      rounding).
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  lowering: kernels.ConvLowering = kernels.ConvLowering()

  @nn.compact
  def __call__(self, x: jax.Array, *, norm: InstanceNorm | None = None) -> jax.Array:
    """The convolution of [N, H, W, C_in] `x`, then `norm` (an `InstanceNorm`) if given.

    With `norm`, the norm is folded into the convolution (`kernels.conv_instance_norm`) where
    the lowering `folds_norm`, else applied to its output: the same result up to float rounding.
    """
    c_in = x.shape[-1]
    init = torch_uniform_init(c_in * self.kernel_size * self.kernel_size)
    kernel = self.param('kernel', init, (self.kernel_size, self.kernel_size, c_in, self.features))
    conv_bias = self.param('bias', init, (self.features,)) if self.use_bias else None
    # float32 parameters on float64 inputs (jax_enable_x64) compute in float64, as jnp would.
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if norm is not None and self.lowering.folds_norm(kernel.shape):
      return kernels.conv_instance_norm(
        x,
        kernel,
        norm.scale,
        norm.bias,
        stride=self.stride,
        padding=self.padding,
        relu=norm.relu,
      )
    impl = self.lowering.impl
    if impl == 'winograd' and kernels.winograd_applies(
      x.shape, kernel.shape, self.stride, self.padding
    ):
      y = kernels.conv2d_winograd(x, kernel)
    elif impl in ('im2col', 'winograd'):
      y = kernels.conv2d_im2col(x, kernel, self.stride, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (self.stride, self.stride),
        ((self.padding, self.padding),) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
    if conv_bias is not None:
      y = y + conv_bias
    return y if norm is None else norm(y)


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


class InstanceNorm(nn.Module):
  """`kernels.instance_norm` with learnt scale (ones) and bias (zeros) of shape [features], as in
  PyTorch's GroupNorm(C, C); the parameter names are Flax GroupNorm's, so stored networks load
  unchanged. The parameters are declared in `setup`, so a `Conv` given the module as `norm` can
  fold them into its weights.
  """

  features: int
  epsilon = NORM_EPS  # fixed, as in every norm here
  relu: bool = False  # a ReLU after the norm, inside its VJP (`instance_norm(relu=True)`)

  def setup(self):
    # float32 like every other parameter (Flax's ones / zeros follow jax_enable_x64).
    self.scale = self.param('scale', nn.initializers.ones, (self.features,), jnp.float32)
    self.bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    return kernels.instance_norm(x, self.scale, self.bias, relu=self.relu)


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
    return InstanceNorm(channels, name=name)
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

"""Network definitions (Flax Linen, NHWC) matching the PyTorch reference networks (DC code).

Every module's `__call__(x, train=False, embed_only=False)` returns logits, or with
`embed_only=True` the triple `(features, feature_map, logits)`: the flattened embedding the losses
use, the final NHWC map it was flattened from, and the classifier's output on `features` (XLA
drops the classifier when a caller ignores it). Flatten sizes follow the actual input size. Use the
functional wrapper in `dd_jax.models.registry` rather than these modules directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from dd_jax.models import kernels, layers


def _flatten(feature_map: jax.Array) -> jax.Array:
  return feature_map.reshape(feature_map.shape[0], -1)


def _first_padding(x: jax.Array, default: int, one_channel: int) -> int:
  """The reference pads one-channel inputs more, so 28x28 MNIST maps match the 32x32 networks.

  The reference code keys the rule on the channel count alone, so it also applies to other
  one-channel sizes (8x8 digits: a 12x12 first map).
  """
  return one_channel if x.shape[-1] == 1 else default


class ConvNet(nn.Module):
  """The DC/DM/IID ConvNet: depth x [conv3x3 -> norm -> act -> pool], then a dense classifier.

  Attributes:
    num_classes: K.
    width: channels of every conv (128 in the reference).
    depth: number of conv blocks.
    act: one of layers.ACTIVATIONS.
    norm: one of layers.NORMS ('instancenorm' by default).
    pooling: one of layers.POOLINGS.
    conv: how the convolutions are computed (every network has this field; see
      `kernels.ConvLowering`).
  """

  num_classes: int
  conv: kernels.ConvLowering = kernels.ConvLowering()
  width: int = 128
  depth: int = 3
  act: str = 'relu'
  norm: str = 'instancenorm'
  pooling: str = 'avgpooling'

  @nn.compact
  def __call__(self, x, train: bool = False, embed_only: bool = False):
    activation = layers.activation(self.act)
    for d in range(self.depth):
      padding = _first_padding(x, 1, 3) if d == 0 else 1
      conv = layers.Conv(self.width, 3, padding=padding, name=f'conv{d}', lowering=self.conv)
      if self.norm == 'instancenorm' and self.act == 'relu':
        # The ReLU inside the norm's VJP (its mask recomputed there, not stored); the first
        # layer folds the norm into its weights where the lowering says so
        # (`kernels.conv_instance_norm`).
        x = conv(x, norm=layers.InstanceNorm(self.width, relu=True, name=f'norm{d}'))
      else:
        norm = layers.norm_layer(self.norm, self.width, train=train, name=f'norm{d}')
        x = activation(norm(conv(x)))
      x = layers.pool(self.pooling, x)
    features = _flatten(x)
    logits = layers.dense(self.num_classes, features.shape[-1], name='classifier')(features)
    return (features, x, logits) if embed_only else logits


class AlexNet(nn.Module):
  """AlexNet as in the DC benchmark: 5 convs (128,192,256,192,192), max pools, one dense layer."""

  num_classes: int
  conv: kernels.ConvLowering = kernels.ConvLowering()
  norm: str = 'none'

  @nn.compact
  def __call__(self, x, train: bool = False, embed_only: bool = False):
    # (features, kernel, padding, pool afterwards)
    specs = (
      (128, 5, _first_padding(x, 2, 4), True),
      (192, 5, 2, True),
      (256, 3, 1, False),
      (192, 3, 1, False),
      (192, 3, 1, True),
    )
    for i, (features, kernel, padding, pool_after) in enumerate(specs):
      x = layers.Conv(features, kernel, padding=padding, name=f'conv{i}', lowering=self.conv)(x)
      x = layers.norm_layer(self.norm, features, train=train, name=f'norm{i}')(x)
      x = nn.relu(x)
      if pool_after:
        x = layers.pool('maxpooling', x)
    features = _flatten(x)
    logits = layers.dense(self.num_classes, features.shape[-1], name='classifier')(features)
    return (features, x, logits) if embed_only else logits


VGG11_LAYOUT = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')


class VGG(nn.Module):
  """VGG with conv3x3 -> norm -> ReLU blocks and 2x2 max pools; dense classifier on the flat map."""

  num_classes: int
  conv: kernels.ConvLowering = kernels.ConvLowering()
  layout: Sequence[int | str] = VGG11_LAYOUT
  norm: str = 'instancenorm'

  @nn.compact
  def __call__(self, x, train: bool = False, embed_only: bool = False):
    conv_index = 0
    for item in self.layout:
      if item == 'M':
        x = layers.pool('maxpooling', x)
        continue
      padding = _first_padding(x, 1, 3) if conv_index == 0 else 1
      x = layers.Conv(item, 3, padding=padding, name=f'conv{conv_index}', lowering=self.conv)(x)
      x = layers.norm_layer(self.norm, item, train=train, name=f'norm{conv_index}')(x)
      x = nn.relu(x)
      conv_index += 1
    features = _flatten(x)
    logits = layers.dense(self.num_classes, features.shape[-1], name='classifier')(features)
    return (features, x, logits) if embed_only else logits


class BasicBlock(nn.Module):
  """ResNet basic block: two bias-free conv3x3 with norms; a 1x1 conv + norm shortcut when the
  shape changes."""

  features: int
  stride: int
  norm: str
  conv: kernels.ConvLowering = kernels.ConvLowering()

  @nn.compact
  def __call__(self, x, train: bool):
    in_channels = x.shape[-1]
    out = layers.Conv(
      self.features,
      3,
      padding=1,
      stride=self.stride,
      use_bias=False,
      name='conv0',
      lowering=self.conv,
    )(x)
    out = nn.relu(layers.norm_layer(self.norm, self.features, train=train, name='norm0')(out))
    out = layers.Conv(
      self.features, 3, padding=1, use_bias=False, name='conv1', lowering=self.conv
    )(out)
    out = layers.norm_layer(self.norm, self.features, train=train, name='norm1')(out)
    shortcut = x
    if self.stride != 1 or in_channels != self.features:
      shortcut = layers.Conv(
        self.features,
        1,
        stride=self.stride,
        use_bias=False,
        name='shortcut_conv',
        lowering=self.conv,
      )(x)
      shortcut = layers.norm_layer(self.norm, self.features, train=train, name='shortcut_norm')(
        shortcut
      )
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """CIFAR-style ResNet: conv3x3 stem, 4 stages, 4x4 average pool, dense classifier."""

  num_classes: int
  conv: kernels.ConvLowering = kernels.ConvLowering()
  blocks_per_stage: Sequence[int] = (2, 2, 2, 2)
  norm: str = 'instancenorm'

  @nn.compact
  def __call__(self, x, train: bool = False, embed_only: bool = False):
    x = layers.Conv(64, 3, padding=1, use_bias=False, name='stem_conv', lowering=self.conv)(x)
    x = nn.relu(layers.norm_layer(self.norm, 64, train=train, name='stem_norm')(x))
    for stage, (features, num_blocks) in enumerate(zip((64, 128, 256, 512), self.blocks_per_stage)):
      for block in range(num_blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        x = BasicBlock(features, stride, self.norm, self.conv, name=f'stage{stage}_block{block}')(
          x, train
        )
    x = nn.avg_pool(x, (4, 4), strides=(4, 4))
    features = _flatten(x)
    logits = layers.dense(self.num_classes, features.shape[-1], name='classifier')(features)
    return (features, x, logits) if embed_only else logits


class MLP(nn.Module):
  """flatten -> 128 -> ReLU -> 128 -> ReLU -> K. The 'feature map' is the input itself."""

  num_classes: int
  conv: kernels.ConvLowering = kernels.ConvLowering()

  @nn.compact
  def __call__(self, x, train: bool = False, embed_only: bool = False):
    del train
    feature_map = x
    h = _flatten(x)
    h = nn.relu(layers.dense(128, h.shape[-1], name='fc0')(h))
    h = nn.relu(layers.dense(128, 128, name='fc1')(h))
    logits = layers.dense(self.num_classes, 128, name='classifier')(h)
    return (h, feature_map, logits) if embed_only else logits


class LeNet(nn.Module):
  """LeNet-5: conv5x5 6 -> ReLU -> max pool -> conv5x5 16 -> ReLU -> max pool -> 120 -> 84 -> K."""

  num_classes: int
  conv: kernels.ConvLowering = kernels.ConvLowering()

  @nn.compact
  def __call__(self, x, train: bool = False, embed_only: bool = False):
    del train
    # The reference pads one-channel inputs by 2 so 28x28 MNIST gives the 5x5x16 map of 32x32.
    padding = 2 if x.shape[-1] == 1 else 0
    x = nn.relu(layers.Conv(6, 5, padding=padding, name='conv0', lowering=self.conv)(x))
    x = layers.pool('maxpooling', x)
    x = nn.relu(layers.Conv(16, 5, name='conv1', lowering=self.conv)(x))
    feature_map = layers.pool('maxpooling', x)
    h = _flatten(feature_map)
    h = nn.relu(layers.dense(120, h.shape[-1], name='fc0')(h))
    h = nn.relu(layers.dense(84, 120, name='fc1')(h))
    logits = layers.dense(self.num_classes, 84, name='classifier')(h)
    return (h, feature_map, logits) if embed_only else logits

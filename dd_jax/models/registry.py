"""Network registry and the functional boundary every caller uses.

A `Network` is a bundle of pure functions over a variables pytree:

    variables = net.init(key, input_shape)              # {'params': ..., ['batch_stats': ...]}
    logits = net.apply(variables, x)                    # [N, K]
    features, feature_map = net.embed(variables, x)     # [N, D], [N, h, w, C] (NHWC)
    features, feature_map, logits = net.embed_with_logits(variables, x)
    logits, variables = net.apply_train(variables, x)   # batch-norm statistics updated

All of them are jit-able and vmap-able over keys / variables, e.g. several random networks:
`jax.vmap(lambda k: net.init(k, shape))(keys)`. Nothing outside this package needs to know that
the modules are Flax Linen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dd_jax.models import kernels, networks

Variables = Any  # a pytree: {'params': ..., optionally 'batch_stats': ...}


@dataclasses.dataclass(frozen=True)
class Network:
  """A network as pure functions. Hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    name: registry name (e.g. 'ConvNet', 'ResNet18BN').
    module: the underlying Flax module.
  """

  name: str
  module: nn.Module

  @property
  def has_batch_stats(self) -> bool:
    """Whether the network carries batch-norm running statistics (mutable state)."""
    return getattr(self.module, 'norm', 'none') == 'batchnorm'

  def init(self, key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
    """Initial variables from a PRNG key for inputs of shape [N, H, W, C] (or [H, W, C])."""
    if len(input_shape) == 3:
      input_shape = (1, *input_shape)
    return self.module.init(key, jnp.zeros(input_shape, jnp.float32))

  def check_input_shape(self, image_shape: tuple[int, int, int], field: str) -> None:
    """Raises ValueError (naming the config `field`) unless the network takes these images.

    Traces `init` abstractly (no FLOPs, no memory), so a network whose pooling shrinks the image
    to nothing is refused before any work rather than after distillation.
    """
    try:
      jax.eval_shape(lambda: self.init(jax.random.key(0), (1, *image_shape)))
    except ValueError as error:
      height, width, channels = image_shape
      raise ValueError(
        f'{field}={self.name!r} cannot take the {height}x{width}x{channels} images of this '
        f'dataset: {error}'
      ) from None

  @property
  def conv(self) -> kernels.ConvLowering:
    """How the network's convolutions are computed."""
    return self.module.conv

  def with_conv(self, conv: kernels.ConvLowering) -> Network:
    """The same network (same variables) with its convolutions computed as `conv`."""
    return dataclasses.replace(self, module=self.module.clone(conv=conv))

  def apply(self, variables: Variables, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Logits [N, K]. With `train=True` batch norm uses batch statistics (updates discarded)."""
    if train and self.has_batch_stats:
      return self.apply_train(variables, x)[0]
    return self.module.apply(variables, x, train=False)

  def apply_train(self, variables: Variables, x: jax.Array) -> tuple[jax.Array, Variables]:
    """Training-mode logits and the variables with updated batch-norm running statistics."""
    if not self.has_batch_stats:
      return self.module.apply(variables, x, train=True), variables
    logits, updates = self.module.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits, {**variables, **updates}

  def embed(
    self, variables: Variables, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """The embedding the losses use.

    Args:
      variables: from `init`.
      x: images [N, H, W, C], normalised.
      train: batch norm uses batch statistics (DM matches with networks in train mode).

    Returns:
      features: [N, D], the flattened final feature map (penultimate layer for MLP / LeNet).
      feature_map: [N, h, w, C], the final map before flattening (NHWC).
    """
    return self.embed_with_logits(variables, x, train=train)[:2]

  def embed_with_logits(
    self, variables: Variables, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`embed` plus the logits [N, K] computed from the same forward pass."""
    if train and self.has_batch_stats:
      outputs, _ = self.module.apply(
        variables, x, train=True, embed_only=True, mutable=['batch_stats']
      )
      return outputs
    return self.module.apply(variables, x, train=train, embed_only=True)


def _convnet(num_classes: int, **overrides) -> nn.Module:
  return networks.ConvNet(num_classes=num_classes, **overrides)


# name -> builder(num_classes) -> module. Names follow the DC/DM benchmark code.
_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
  'ConvNet': _convnet,
  'ConvNetD1': functools.partial(_convnet, depth=1),
  'ConvNetD2': functools.partial(_convnet, depth=2),
  'ConvNetD3': functools.partial(_convnet, depth=3),
  'ConvNetD4': functools.partial(_convnet, depth=4),
  'ConvNetW32': functools.partial(_convnet, width=32),
  'ConvNetW64': functools.partial(_convnet, width=64),
  'ConvNetW128': functools.partial(_convnet, width=128),
  'ConvNetW256': functools.partial(_convnet, width=256),
  'ConvNetAS': functools.partial(_convnet, act='sigmoid'),
  'ConvNetAR': functools.partial(_convnet, act='relu'),
  'ConvNetAL': functools.partial(_convnet, act='leakyrelu'),
  'ConvNetASwish': functools.partial(_convnet, act='swish'),
  'ConvNetNN': functools.partial(_convnet, norm='none'),
  'ConvNetBN': functools.partial(_convnet, norm='batchnorm'),
  'ConvNetLN': functools.partial(_convnet, norm='layernorm'),
  'ConvNetIN': functools.partial(_convnet, norm='instancenorm'),
  'ConvNetGN': functools.partial(_convnet, norm='groupnorm'),
  'ConvNetNP': functools.partial(_convnet, pooling='none'),
  'ConvNetMP': functools.partial(_convnet, pooling='maxpooling'),
  'ConvNetAP': functools.partial(_convnet, pooling='avgpooling'),
  'AlexNet': lambda k: networks.AlexNet(num_classes=k),
  'AlexNetBN': lambda k: networks.AlexNet(num_classes=k, norm='batchnorm'),
  'VGG11': lambda k: networks.VGG(num_classes=k, norm='instancenorm'),
  'VGG11BN': lambda k: networks.VGG(num_classes=k, norm='batchnorm'),
  'ResNet18': lambda k: networks.ResNet(num_classes=k, norm='instancenorm'),
  'ResNet18BN': lambda k: networks.ResNet(num_classes=k, norm='batchnorm'),
  'MLP': lambda k: networks.MLP(num_classes=k),
  'LeNet': lambda k: networks.LeNet(num_classes=k),
}


def network_names() -> tuple[str, ...]:
  """All registered network names."""
  return tuple(_BUILDERS)


def get_network(
  name: str,
  num_classes: int,
  *,
  conv: kernels.ConvLowering = kernels.ConvLowering(),
  **convnet_overrides,
) -> Network:
  """Builds a registered network.

  Args:
    name: a registry name, see `network_names()`.
    num_classes: K, the classifier width.
    conv: how the convolutions are computed (default: XLA's; a run takes its
      `dd_jax.lowering.Lowering`'s). Results agree to float rounding.
    **convnet_overrides: for ConvNet names only, fields overriding the preset (width, depth, act,
      norm, pooling), e.g. `get_network('ConvNet', 200, depth=4)`.

  Returns:
    A `Network`.

  Raises:
    ValueError: unknown name (the message lists the valid ones), or overrides on a non-ConvNet.
  """
  if name not in _BUILDERS:
    raise ValueError(
      f'Unknown network {name!r} (field model.name / eval.model); '
      f'choose one of: {", ".join(_BUILDERS)}.'
    )
  if num_classes <= 0:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  if convnet_overrides and not name.startswith('ConvNet'):
    raise ValueError(
      f'Overrides {sorted(convnet_overrides)} only apply to ConvNet networks, not {name!r}.'
    )
  module = _BUILDERS[name](num_classes).clone(**convnet_overrides)
  return Network(name=name, module=module).with_conv(conv)


def param_count(variables: Variables) -> int:
  """Number of trainable parameters (batch-norm running statistics excluded); `variables` may
  be abstract (`jax.eval_shape` of `init`)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables['params']))

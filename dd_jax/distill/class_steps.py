"""Image updates of the per-class distillation loops (IDM and the IDC family): one optimizer
step per class on the whole synthetic tensor, as their reference codes take them, or one summed
step per iteration (DM's form, offered to the IDC family as a faster, non-faithful option).

    images, opt_state, aux = per_class_updates(images, opt_state, optimizer, K, ipc, class_grad)
    images, opt_state, aux = joint_update(images, opt_state, optimizer, K, ipc, class_grad)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

MODES = ('per_class', 'joint')

ClassGrad = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


def per_class_updates(
  images: jax.Array,
  opt_state: optax.OptState,
  optimizer: optax.GradientTransformation,
  num_classes: int,
  ipc: int,
  class_grad: ClassGrad,
) -> tuple[jax.Array, optax.OptState, Any]:
  """One optimizer step per class, in class order (a scan), as the reference codes of IDM and
  the IDC family take them.

  The gradient of class c only touches class c's rows, but the optimizer state is that of the
  whole tensor: with momentum, rows of earlier classes keep moving at every later class step
  (lr 1, momentum 0.5, unit gradients: three classes move by 1.75, 1.5 and 1.0).

  Args:
    images: [K * ipc, ...] class-blocked synthetic images.
    opt_state: the optimizer state of `images`.
    optimizer: the image optimizer.
    num_classes: K.
    ipc: rows per class.
    class_grad: `(class_images [ipc, ...], class_id) -> (gradient [ipc, ...], aux)`, evaluated
      at the current (already partly updated) images.

  Returns:
    (new images, new optimizer state, aux stacked over classes).
  """

  def step(carry, class_id):
    images, opt_state = carry
    start = class_id * ipc
    class_images = jax.lax.dynamic_slice_in_dim(images, start, ipc)
    grad, aux = class_grad(class_images, class_id)
    full_grad = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(images), grad, start, 0)
    updates, opt_state = optimizer.update(full_grad, opt_state, images)
    return (optax.apply_updates(images, updates), opt_state), aux

  (images, opt_state), aux = jax.lax.scan(step, (images, opt_state), jnp.arange(num_classes))
  return images, opt_state, aux


def joint_update(
  images: jax.Array,
  opt_state: optax.OptState,
  optimizer: optax.GradientTransformation,
  num_classes: int,
  ipc: int,
  class_grad: ClassGrad,
) -> tuple[jax.Array, optax.OptState, Any]:
  """One optimizer step on the classes' gradients, all taken at the same images (DM's form).

  Args and Returns: as `per_class_updates`.
  """
  by_class = images.reshape(num_classes, ipc, *images.shape[1:])
  grads, aux = jax.lax.map(lambda pair: class_grad(*pair), (by_class, jnp.arange(num_classes)))
  updates, opt_state = optimizer.update(grads.reshape(images.shape), opt_state, images)
  return optax.apply_updates(images, updates), opt_state, aux


def class_updates(mode: str) -> Callable[..., tuple[jax.Array, optax.OptState, Any]]:
  """`per_class_updates` ('per_class') or `joint_update` ('joint')."""
  return {'per_class': per_class_updates, 'joint': joint_update}[mode]

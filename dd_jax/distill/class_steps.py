"""Image updates of the per-class distillation loops (IDM and the IDC family): one optimizer
step per class on the whole synthetic tensor, as their reference codes take them, or one summed
step per iteration (DM's form, offered to the IDC family as a faster, non-faithful option).

    images, opt_state, aux = per_class_updates(images, opt_state, optimizer, K, ipc, class_grad)
    images, opt_state, aux = joint_update(images, opt_state, optimizer, K, ipc, class_grad)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

MODES = ('per_class', 'joint')
# How 'per_class' computes its class gradients (`per_class_updates`' gradients_together).
GRADIENTS = ('together', 'one_by_one')

ClassGrad = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


def per_class_updates(
  images: jax.Array,
  opt_state: optax.OptState,
  optimizer: optax.GradientTransformation,
  num_classes: int,
  ipc: int,
  class_grad: ClassGrad,
  gradients_together: bool = False,
) -> tuple[jax.Array, optax.OptState, Any]:
  """One optimizer step per class, in class order, as the reference codes of IDM and the IDC
  family take them.

  The gradient of class c only touches class c's rows, but the optimizer state is that of the
  whole tensor: with momentum, rows of earlier classes keep moving at every later class step
  (lr 1, momentum 0.5, unit gradients: three classes move by 1.75, 1.5 and 1.0).

  `gradients_together` computes the same steps with every class's gradient in one batched call
  (`vmap` of `class_grad`) instead of one call per step. It relies on what makes the steps
  separable: class c's gradient depends on class c's rows only, and before its own step those
  rows move only by the optimizer's zero-gradient updates (momentum, weight decay), which an
  elementwise optimizer (SGD, Adam) applies to each row from its own state. So: (1) the
  zero-gradient steps give every class's rows as its step sees them; (2) all gradients at once;
  (3) the K steps replayed with them. The images and state equal the one-call-per-step form's
  to float rounding (the network's batched arithmetic); steps (1) and (3) are elementwise.

  Args:
    images: [K * ipc, ...] class-blocked synthetic images.
    opt_state: the optimizer state of `images`.
    optimizer: the image optimizer; elementwise for `gradients_together`.
    num_classes: K.
    ipc: rows per class.
    class_grad: `(class_images [ipc, ...], class_id) -> (gradient [ipc, ...], aux)`, evaluated
      at the current (already partly updated) images; of class c's rows only (and vmappable)
      for `gradients_together`.
    gradients_together: see above.

  Returns:
    (new images, new optimizer state, aux stacked over classes).
  """

  def apply(images, opt_state, class_id, grad):
    full_grad = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(images), grad, class_id * ipc, 0)
    updates, opt_state = optimizer.update(full_grad, opt_state, images)
    return optax.apply_updates(images, updates), opt_state

  class_rows = lambda images, class_id: jax.lax.dynamic_slice_in_dim(images, class_id * ipc, ipc)
  if gradients_together:

    def zero_gradient_step(carry, class_id):
      images, opt_state = carry
      zero = jnp.zeros((ipc, *images.shape[1:]), images.dtype)
      return apply(images, opt_state, class_id, zero), class_rows(images, class_id)

    _, seen = jax.lax.scan(zero_gradient_step, (images, opt_state), jnp.arange(num_classes))
    grads, aux = jax.vmap(class_grad)(seen, jnp.arange(num_classes))

    def replay(carry, inputs):
      return apply(*carry, *inputs), None

    (images, opt_state), _ = jax.lax.scan(
      replay, (images, opt_state), (jnp.arange(num_classes), grads)
    )
    return images, opt_state, aux

  def step(carry, class_id):
    images, opt_state = carry
    grad, aux = class_grad(class_rows(images, class_id), class_id)
    return apply(images, opt_state, class_id, grad), aux

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


def class_updates(
  mode: str, gradients: str = 'one_by_one'
) -> Callable[..., tuple[jax.Array, optax.OptState, Any]]:
  """`per_class_updates` ('per_class', its gradients as `gradients` says) or `joint_update`
  ('joint')."""
  if mode == 'joint':
    return joint_update
  return functools.partial(per_class_updates, gradients_together=gradients == 'together')

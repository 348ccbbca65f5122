"""Image updates of the per-class distillation loops (IDM and the IDC family): one optimizer
step per class on the whole synthetic tensor, as their reference codes take them, or one summed
step per iteration (DM's form, offered to the IDC family as a faster, non-faithful option).

    images, opt_state, aux = per_class_updates(images, opt_state, optimizer, K, ipc, class_grad)
    images, opt_state, aux = joint_update(images, opt_state, optimizer, K, ipc, class_grad)

A class step may also carry a value of its own from class to class (`carry=`: e.g. NCFM's
sampling network, which takes an ascent step after every class step); its `class_grad` then
takes and returns it. `on_plateau` wraps an optimizer in PyTorch's ReduceLROnPlateau, stepped
once per iteration by `end_iteration`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MODES = ('per_class', 'joint')
# How 'per_class' computes its class gradients (`per_class_updates`' gradients_together).
GRADIENTS = ('together', 'one_by_one')

ClassGrad = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]
# (class_images, class_id, carry) -> (gradient, aux, carry): a class step with a carry.
CarryingClassGrad = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any, Any]]


def _with_carry(class_grad: ClassGrad) -> CarryingClassGrad:
  def carrying(class_images, class_id, carry):
    grad, aux = class_grad(class_images, class_id)
    return grad, aux, carry

  return carrying


def per_class_updates(
  images: jax.Array,
  opt_state: optax.OptState,
  optimizer: optax.GradientTransformation,
  num_classes: int,
  ipc: int,
  class_grad: ClassGrad | CarryingClassGrad,
  gradients_together: bool = False,
  carry: Any = None,
) -> tuple[jax.Array, optax.OptState, Any] | tuple[jax.Array, optax.OptState, Any, Any]:
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
    carry: None, or a value class steps pass on in class order: `class_grad` is then
      `(class_images, class_id, carry) -> (gradient, aux, carry)`. Not with
      `gradients_together` (its gradients are taken at once).

  Returns:
    (new images, new optimizer state, aux stacked over classes), and the last carry when one
    was given.
  """
  if carry is not None and gradients_together:
    raise ValueError(
      'per_class_updates: a carry passes from class step to class step, which gradients taken '
      'together cannot follow; compute them one by one.'
    )

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

  carrying = class_grad if carry is not None else _with_carry(class_grad)

  def step(state, class_id):
    images, opt_state, carried = state
    grad, aux, carried = carrying(class_rows(images, class_id), class_id, carried)
    return (*apply(images, opt_state, class_id, grad), carried), aux

  (images, opt_state, last), aux = jax.lax.scan(
    step, (images, opt_state, () if carry is None else carry), jnp.arange(num_classes)
  )
  return (images, opt_state, aux) if carry is None else (images, opt_state, aux, last)


def joint_update(
  images: jax.Array,
  opt_state: optax.OptState,
  optimizer: optax.GradientTransformation,
  num_classes: int,
  ipc: int,
  class_grad: ClassGrad | CarryingClassGrad,
  carry: Any = None,
) -> tuple[jax.Array, optax.OptState, Any] | tuple[jax.Array, optax.OptState, Any, Any]:
  """One optimizer step on the classes' gradients, all taken at the same images (DM's form).

  Args and Returns: as `per_class_updates` (a carry passes through the classes in order).
  """
  by_class = images.reshape(num_classes, ipc, *images.shape[1:])
  carrying = class_grad if carry is not None else _with_carry(class_grad)

  def gradient(carried, pair):
    grad, aux, carried = carrying(*pair, carried)
    return carried, (grad, aux)

  last, (grads, aux) = jax.lax.scan(
    gradient, () if carry is None else carry, (by_class, jnp.arange(num_classes))
  )
  updates, opt_state = optimizer.update(grads.reshape(images.shape), opt_state, images)
  images = optax.apply_updates(images, updates)
  return (images, opt_state, aux) if carry is None else (images, opt_state, aux, last)


def class_updates(
  mode: str, gradients: str = 'one_by_one'
) -> Callable[..., tuple[jax.Array, optax.OptState, Any]]:
  """`per_class_updates` ('per_class', its gradients as `gradients` says) or `joint_update`
  ('joint')."""
  if mode == 'joint':
    return joint_update
  return functools.partial(per_class_updates, gradients_together=gradients == 'together')


class PlateauState(NamedTuple):
  """The state of `on_plateau`: the inner optimizer's and the plateau schedule's."""

  inner: optax.OptState
  plateau: optax.OptState


def plateau_schedule(factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
  """PyTorch's ReduceLROnPlateau(mode='min', factor, patience) as optax's: the scale drops by
  `factor` when the loss has not beaten its best by a relative 1e-4 for `patience + 1`
  consecutive calls (PyTorch counts `patience` bad calls and drops at the next; optax drops when
  its count reaches its `patience`)."""
  return optax.contrib.reduce_on_plateau(factor=factor, patience=patience + 1, rtol=1e-4)


def on_plateau(
  inner: optax.GradientTransformation, schedule: optax.GradientTransformationExtraArgs
) -> optax.GradientTransformation:
  """`inner` with its updates times the plateau schedule's scale.

  Scaling the whole update scales the learning rate, weight decay included (PyTorch's SGD and
  AdamW multiply both by it). The scale moves only in `end_iteration`, once per iteration, as
  the codes call `scheduler.step(loss)` after all the class steps of an iteration.
  """

  def init(params):
    return PlateauState(inner.init(params), schedule.init(params))

  def update(updates, state, params=None):
    updates, inner_state = inner.update(updates, state.inner, params)
    updates = jax.tree.map(lambda u: state.plateau.scale * u, updates)
    return updates, PlateauState(inner_state, state.plateau)

  return optax.GradientTransformation(init, update)


def end_iteration(
  opt_state: optax.OptState, loss: jax.Array, schedule: optax.GradientTransformationExtraArgs
) -> optax.OptState:
  """`opt_state` of `on_plateau(_, schedule)` after the iteration whose loss is `loss`."""
  _, plateau = schedule.update(jnp.zeros(()), opt_state.plateau, value=loss)
  return opt_state._replace(plateau=plateau)

"""Per-class image updates (IDM, the IDC family) against a Python loop of optax steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dd_jax.distill import class_steps


def test_three_per_class_unit_gradients_move_rows_by_175_150_100():
  images = jnp.zeros((3, 1))
  optimizer = optax.sgd(1.0, momentum=0.5)
  unit = lambda class_images, class_id: (jnp.ones_like(class_images), class_id)
  moved, _, aux = class_steps.per_class_updates(
    images, optimizer.init(images), optimizer, 3, 1, unit
  )
  np.testing.assert_allclose(-moved[:, 0], [1.75, 1.5, 1.0])
  np.testing.assert_array_equal(aux, [0, 1, 2])


def _quadratic_class_grad(targets):
  """Class c's loss: ||images_c - targets_c||^2 (its gradient depends on the current images)."""

  def class_grad(class_images, class_id):
    loss = lambda x: jnp.sum(jnp.square(x - targets[class_id]))
    return jax.grad(loss)(class_images), loss(class_images)

  return class_grad


def _python_loop(images, state, optimizer, num_classes, ipc, class_grad):
  """The reference loop (optimizer.step() inside the class loop): images, state, each class's
  loss at its own step."""
  losses = []
  for c in range(num_classes):
    grad, loss = class_grad(images[c * ipc : (c + 1) * ipc], c)
    losses.append(loss)
    full = jnp.zeros_like(images).at[c * ipc : (c + 1) * ipc].set(grad)
    updates, state = optimizer.update(full, state, images)
    images = optax.apply_updates(images, updates)
  return images, state, losses


@pytest.mark.parametrize('gradients_together', [False, True], ids=['one_by_one', 'together'])
@pytest.mark.parametrize(
  'optimizer',
  [optax.sgd(0.1, momentum=0.5), optax.adamw(0.05, weight_decay=0.01)],
  ids=['sgd_momentum', 'adamw'],
)
def test_per_class_updates_equal_a_python_loop_of_optax_steps(optimizer, gradients_together):
  num_classes, ipc = 3, 2
  start = jax.random.normal(jax.random.key(0), (num_classes * ipc, 4, 4, 1))
  targets = jax.random.normal(jax.random.key(1), (num_classes, ipc, 4, 4, 1))
  class_grad = _quadratic_class_grad(targets)
  # From a state with momentum (one iteration in): earlier steps move later classes' rows.
  images, opt_state, _ = _python_loop(
    start, optimizer.init(start), optimizer, num_classes, ipc, class_grad
  )
  scanned, scanned_state, losses = jax.jit(
    lambda x, s: class_steps.per_class_updates(
      x, s, optimizer, num_classes, ipc, class_grad, gradients_together
    )
  )(images, opt_state)
  looped, state, looped_losses = _python_loop(
    images, opt_state, optimizer, num_classes, ipc, class_grad
  )
  np.testing.assert_allclose(scanned, looped, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(scanned_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Each class's loss at its own step (after the earlier classes' steps moved its rows).
  np.testing.assert_allclose(losses, looped_losses, rtol=1e-5)
  # The joint form (one summed step) is a different update: the test fails if the per-class
  # step were silently joint.
  joint, _, _ = class_steps.joint_update(images, opt_state, optimizer, num_classes, ipc, class_grad)
  assert np.max(np.abs(np.asarray(joint) - np.asarray(looped))) > 1e-3
  # ... and equals one optax step on the concatenated class gradients.
  grads = jnp.concatenate(
    [class_grad(images[c * ipc : (c + 1) * ipc], c)[0] for c in range(num_classes)]
  )
  updates, _ = optimizer.update(grads, opt_state, images)
  np.testing.assert_allclose(joint, optax.apply_updates(images, updates), rtol=1e-6, atol=1e-6)


def test_a_carry_passes_from_class_step_to_class_step_in_order():
  """Class c's gradient is the carry it receives (1, 2, 3): each step sees the previous one's."""
  images = jnp.zeros((3, 1))
  optimizer = optax.sgd(1.0)

  def class_grad(class_images, class_id, carry):
    return jnp.full_like(class_images, carry), class_id, carry + 1.0

  for update in (class_steps.per_class_updates, class_steps.joint_update):
    moved, _, aux, last = update(
      images, optimizer.init(images), optimizer, 3, 1, class_grad, carry=jnp.float32(1.0)
    )
    np.testing.assert_allclose(-moved[:, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(aux, [0, 1, 2])
    assert float(last) == 4.0
  with pytest.raises(ValueError, match='one by one'):
    class_steps.per_class_updates(
      images, optimizer.init(images), optimizer, 3, 1, class_grad, True, carry=jnp.float32(1.0)
    )

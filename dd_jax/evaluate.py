"""The evaluation protocol (SPEC section 7): train fresh networks on a small set, test on real data.

`num_eval` networks are trained together in one jitted program: `vmap` over networks, `scan` over
epochs and minibatches. Each network has its own initialisation, data order and augmentation
parameters; the DSA op of a minibatch step is shared by the networks so that `lax.switch` stays a
real branch under `vmap` (a per-network op would turn into computing every op).

Protocol: SGD (momentum 0.9, coupled weight decay 5e-4 applied to every parameter, as PyTorch's
SGD), batch 256 reshuffled every epoch without dropping the last partial batch, mean
cross-entropy, DSA on every minibatch (one op per batch, parameters per image). The learning
rate drops x0.1 after half the epochs and the momentum buffer is reset then (the reference code
builds a new optimizer). Test accuracy once, at the end, on the full test set.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dd_jax import augment as augment_lib
from dd_jax import models


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Evaluation hyper-parameters (config section `eval`)."""
  model: str = 'ConvNet'
  num_eval: int = 5
  epochs: int = 1000
  batch_size: int = 256
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment_strategy: str = 'color_crop_cutout_flip_scale_rotate'
  test_batch_size: int = 1000

  @classmethod
  def from_config(cls, eval_config) -> 'EvalSettings':
    return cls(**{field.name: eval_config[field.name] for field in dataclasses.fields(cls)
                  if field.name in eval_config})


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _train_networks(keys: jax.Array, op_key: jax.Array, images: jax.Array, labels: jax.Array,
                    net: models.Network, settings: EvalSettings) -> Any:
  """Trains len(keys) networks on (images, labels); returns their stacked variables."""
  num_images = images.shape[0]
  batch_size = min(settings.batch_size, num_images)
  num_full_batches, remainder = divmod(num_images, batch_size)
  strategy = settings.augment_strategy
  op_names = augment_lib.parse_strategy(strategy)
  height, width = images.shape[1:3]

  def augment(step_op_key, param_key, batch):
    if not op_names:
      return batch
    # Op index from a key shared by all networks (a true branch under vmap); params per image.
    op_index = jax.random.randint(step_op_key, (), 0, len(op_names))
    branches = [
        functools.partial(
            lambda op, k, x: augment_lib.apply_op(
                op, x, augment_lib.sample_params(k, op, x.shape[0], height, width)), op)
        for op in op_names]
    return jax.lax.switch(op_index, branches, param_key, batch)

  # SGD as PyTorch: g <- g + wd * p; buf <- momentum * buf + g; p <- p - lr * buf. The lr is
  # applied after the momentum buffer, so scaling the update per epoch is the same as changing
  # the lr, and zeroing the buffer at the drop is the reference's fresh optimizer.
  momentum_sgd = optax.chain(optax.add_decayed_weights(settings.weight_decay),
                             optax.trace(decay=settings.momentum))
  lr_drop_epoch = settings.epochs // 2

  def train_one(key):
    init_key, loop_key = jax.random.split(key)
    variables = net.init(init_key, (1, *images.shape[1:]))

    def sgd_step(carry, batch_indices, lr, step_op_key, step_key):
      variables, opt_state = carry
      batch = augment(step_op_key, step_key, images[batch_indices])

      def loss_fn(params):
        logits, new_variables = net.apply_train({**variables, 'params': params}, batch)
        return _cross_entropy(logits, labels[batch_indices]), new_variables

      grads, new_variables = jax.grad(loss_fn, has_aux=True)(variables['params'])
      buffers, opt_state = momentum_sgd.update(grads, opt_state, variables['params'])
      params = jax.tree_util.tree_map(lambda p, b: p - lr * b, variables['params'], buffers)
      return {**new_variables, 'params': params}, opt_state

    def epoch(carry, epoch_index):
      variables, opt_state = carry
      opt_state = jax.tree_util.tree_map(
          lambda x: jnp.where(epoch_index == lr_drop_epoch, jnp.zeros_like(x), x), opt_state)
      lr = jnp.where(epoch_index < lr_drop_epoch, settings.lr, settings.lr * 0.1)
      epoch_key = jax.random.fold_in(loop_key, epoch_index)
      order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), num_images)
      step_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), num_full_batches + 1)
      op_keys = jax.random.split(jax.random.fold_in(op_key, epoch_index), num_full_batches + 1)
      full = order[:num_full_batches * batch_size].reshape(num_full_batches, batch_size)

      def step(carry, inputs):
        batch_indices, step_op_key, step_key = inputs
        return sgd_step(carry, batch_indices, lr, step_op_key, step_key), None

      carry, _ = jax.lax.scan(step, (variables, opt_state), (full, op_keys[:-1], step_keys[:-1]))
      if remainder:  # the last, partial batch (no drop-last)
        carry = sgd_step(carry, order[num_full_batches * batch_size:], lr, op_keys[-1],
                         step_keys[-1])
      return carry, None

    carry = (variables, momentum_sgd.init(variables['params']))
    (variables, _), _ = jax.lax.scan(epoch, carry, jnp.arange(settings.epochs))
    return variables

  return jax.vmap(train_one)(keys)


def _accuracies(variables: Any, net: models.Network, test_images: jax.Array,
                test_labels: jax.Array, batch_size: int) -> jax.Array:
  """Test accuracy of each of the stacked networks, in [0, 1]."""
  num_test = test_images.shape[0]
  num_batches = -(-num_test // batch_size)
  padded = num_batches * batch_size
  pad = padded - num_test
  images = jnp.pad(test_images, ((0, pad), (0, 0), (0, 0), (0, 0)))
  labels = jnp.pad(test_labels, (0, pad), constant_values=-1)  # -1 never matches a prediction
  images = images.reshape(num_batches, batch_size, *test_images.shape[1:])
  labels = labels.reshape(num_batches, batch_size)

  def correct_in_batch(count, batch):
    batch_images, batch_labels = batch
    predictions = jax.vmap(lambda v: jnp.argmax(net.apply(v, batch_images), -1))(variables)
    return count + jnp.sum(predictions == batch_labels, axis=-1), None

  num_nets = jax.tree_util.tree_leaves(variables)[0].shape[0]
  correct, _ = jax.lax.scan(correct_in_batch, jnp.zeros((num_nets,), jnp.int32),
                            (images, labels))
  return correct / num_test


@functools.partial(jax.jit, static_argnames=('net', 'settings'))
def _train_and_test(key, images, labels, test_images, test_labels, net, settings):
  net_keys = jax.random.split(jax.random.fold_in(key, 0), settings.num_eval)
  op_key = jax.random.fold_in(key, 1)
  variables = _train_networks(net_keys, op_key, images, labels, net, settings)
  return _accuracies(variables, net, test_images, test_labels,
                     min(settings.test_batch_size, test_images.shape[0]))


def evaluate_set(key: jax.Array, images: jax.Array, labels: jax.Array, test_images: jax.Array,
                 test_labels: jax.Array, num_classes: int,
                 settings: EvalSettings = EvalSettings()) -> np.ndarray:
  """Trains `settings.num_eval` fresh networks on (images, labels) and tests them.

  Args:
    key: PRNG key (initialisations, data order, augmentation).
    images: [N, H, W, C] normalised training images (a synthetic set or a real subset).
    labels: [N] int labels.
    test_images: [M, H, W, C] normalised real test images.
    test_labels: [M] int labels.
    num_classes: K.
    settings: the protocol's hyper-parameters.

  Returns:
    [num_eval] test accuracies in percent, one per network.
  """
  net = models.get_network(settings.model, num_classes)
  accuracies = _train_and_test(key, jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32),
                               jnp.asarray(test_images, jnp.float32),
                               jnp.asarray(test_labels, jnp.int32), net, settings)
  return np.asarray(accuracies) * 100.0


def random_real_subset(key: jax.Array, labels: np.ndarray, ipc: int) -> np.ndarray:
  """Indices of `ipc` random training images per class, class-blocked (the baseline's set).

  Args:
    key: PRNG key.
    labels: [N] training labels.
    ipc: images per class.

  Returns:
    [K * ipc] indices, class 0's first.
  """
  labels = np.asarray(labels)
  indices = []
  for class_id in range(int(labels.max()) + 1):
    members = np.flatnonzero(labels == class_id)
    chosen = jax.random.choice(jax.random.fold_in(key, class_id), len(members), (ipc,),
                               replace=False)
    indices.append(members[np.asarray(chosen)])
  return np.concatenate(indices)

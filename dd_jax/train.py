"""Supervised training of stacked networks with PyTorch SGD semantics (evaluation, pool, IDM).

One implementation serves the three places dd_jax trains networks:
- the evaluation protocol (SPEC 7): a small set, DSA per minibatch, lr x0.1 after half the epochs;
- the pretrained pool for class centralization (SPEC 4.3): the real set, no augmentation,
  constant lr;
- the IDM model queue (SPEC 6): a few SGD steps on uniform real batches inside the jitted step.

    optimizer = torch_sgd(momentum=0.9, weight_decay=5e-4)
    variables, opt_state, logits = sgd_step(net, optimizer, variables, opt_state, x, y, lr)
    epoch = make_epoch_fn(net, images, labels, settings)     # (carry, epoch_index, op_key)
    variables = train_networks(keys, op_key, images, labels, net, settings)

Every network has its own initialisation, data order and augmentation parameters; the DSA op of a
minibatch step is shared by networks trained together, so that `lax.switch` stays a real branch
under `vmap` (a per-network op would turn into computing every op).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dd_jax import augment as augment_lib
from dd_jax import models

# (variables, opt_state, loop_key) of one network.
TrainCarry = tuple[Any, optax.OptState, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Hyper-parameters of minibatch SGD training.

  Attributes:
    epochs: passes over the training set.
    batch_size: minibatch size; the last partial batch is kept (no drop-last).
    lr: learning rate.
    momentum: SGD momentum (PyTorch semantics: buffer = momentum * buffer + grad).
    weight_decay: coupled L2 added to the gradient of every parameter, as PyTorch's SGD.
    augment_strategy: DSA strategy applied to every minibatch ('' or 'none': no augmentation).
    lr_drop: multiply the lr by 0.1 after half the epochs and reset the momentum buffer (the
      evaluation protocol; the reference builds a new optimizer there).
  """
  epochs: int
  batch_size: int = 256
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment_strategy: str = ''
  lr_drop: bool = False


def torch_sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """SGD without the lr, as PyTorch: g <- g + wd * p; buf <- momentum * buf + g.

  The caller applies p <- p - lr * buf, so an lr schedule is a per-step scalar and zeroing the
  buffer is a fresh optimizer.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of [N, K] logits against [N] int labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def sgd_step(net: models.Network, optimizer: optax.GradientTransformation, variables: Any,
             opt_state: optax.OptState, images: jax.Array, labels: jax.Array,
             lr: jax.Array | float) -> tuple[Any, optax.OptState, jax.Array]:
  """One cross-entropy SGD step of one network.

  Args:
    net: the network.
    optimizer: from `torch_sgd`.
    variables: the network's variables (batch-norm statistics are updated in train mode).
    opt_state: the optimizer state of variables['params'].
    images: [N, H, W, C] normalised minibatch.
    labels: [N] int labels.
    lr: learning rate (may be traced).

  Returns:
    (new variables, new optimizer state, the [N, K] training-mode logits before the update).
  """
  def loss_fn(params):
    logits, new_variables = net.apply_train({**variables, 'params': params}, images)
    return cross_entropy(logits, labels), (new_variables, logits)

  grads, (new_variables, logits) = jax.grad(loss_fn, has_aux=True)(variables['params'])
  buffers, opt_state = optimizer.update(grads, opt_state, variables['params'])
  params = jax.tree_util.tree_map(lambda p, b: p - lr * b, variables['params'], buffers)
  return {**new_variables, 'params': params}, opt_state, logits


def _augment_fn(strategy: str, height: int, width: int
                ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """(op_key, param_key, batch) -> augmented batch; the op from op_key, parameters per image."""
  op_names = augment_lib.parse_strategy(strategy)

  def augment(op_key, param_key, batch):
    if not op_names:
      return batch
    op_index = jax.random.randint(op_key, (), 0, len(op_names))
    branches = [
        functools.partial(
            lambda op, k, x: augment_lib.apply_op(
                op, x, augment_lib.sample_params(k, op, x.shape[0], height, width)), op)
        for op in op_names]
    return jax.lax.switch(op_index, branches, param_key, batch)

  return augment


def init_networks(keys: jax.Array, net: models.Network, input_shape: tuple[int, ...],
                  optimizer: optax.GradientTransformation) -> TrainCarry:
  """Stacked fresh networks and their training carry, one per key in [P] `keys`."""
  def init_one(key):
    init_key, loop_key = jax.random.split(key)
    variables = net.init(init_key, (1, *input_shape))
    return variables, optimizer.init(variables['params']), loop_key

  return jax.vmap(init_one)(keys)


def make_epoch_fn(net: models.Network, images: jax.Array, labels: jax.Array,
                  settings: TrainSettings
                  ) -> Callable[[TrainCarry, jax.Array, jax.Array], TrainCarry]:
  """One epoch of one network: `(carry, epoch_index, op_key) -> carry`; vmap it over networks.

  Args:
    net: the network.
    images: [N, H, W, C] normalised training images (closed over: the same for every network).
    labels: [N] int labels.
    settings: the hyper-parameters.

  Returns:
    The epoch function. `op_key` (the DSA op draws) is meant to be shared by vmapped networks.
  """
  num_images = images.shape[0]
  batch_size = min(settings.batch_size, num_images)
  num_full_batches, remainder = divmod(num_images, batch_size)
  augment = _augment_fn(settings.augment_strategy, *images.shape[1:3])
  optimizer = torch_sgd(settings.momentum, settings.weight_decay)
  lr_drop_epoch = settings.epochs // 2 if settings.lr_drop else settings.epochs

  def minibatch_step(variables, opt_state, batch_indices, lr, op_key, param_key):
    batch = augment(op_key, param_key, images[batch_indices])
    variables, opt_state, _ = sgd_step(net, optimizer, variables, opt_state, batch,
                                       labels[batch_indices], lr)
    return variables, opt_state

  def epoch(carry, epoch_index, op_key):
    variables, opt_state, loop_key = carry
    opt_state = jax.tree_util.tree_map(
        lambda x: jnp.where(epoch_index == lr_drop_epoch, jnp.zeros_like(x), x), opt_state)
    lr = jnp.where(epoch_index < lr_drop_epoch, settings.lr, settings.lr * 0.1)
    epoch_key = jax.random.fold_in(loop_key, epoch_index)
    order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), num_images)
    param_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), num_full_batches + 1)
    op_keys = jax.random.split(jax.random.fold_in(op_key, epoch_index), num_full_batches + 1)
    full = order[:num_full_batches * batch_size].reshape(num_full_batches, batch_size)

    def step(state, inputs):
      return minibatch_step(*state, *inputs[:1], lr, *inputs[1:]), None

    (variables, opt_state), _ = jax.lax.scan(step, (variables, opt_state),
                                             (full, op_keys[:-1], param_keys[:-1]))
    if remainder:  # the last, partial batch (no drop-last)
      variables, opt_state = minibatch_step(variables, opt_state,
                                            order[num_full_batches * batch_size:], lr,
                                            op_keys[-1], param_keys[-1])
    return variables, opt_state, loop_key

  return epoch


def over_networks(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn(carry, *shared)` applied to a stack of networks' carries (leading axis), shared args
  unbatched: a vmap on accelerators; on CPU a loop (lax.map), which XLA:CPU runs faster than the
  batched program (5 ConvNets, 500 CIFAR-sized images: 18.2 s looped, 25.1 s batched, 19.2 s one
  network at a time; same results to 1e-6).
  """
  if jax.default_backend() != 'cpu':
    return lambda carry, *shared: jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(carry,
                                                                                     *shared)

  def looped(carry, *shared):
    return jax.lax.map(lambda one: fn(one, *shared), carry)
  return looped


def train_networks(keys: jax.Array, op_key: jax.Array, images: jax.Array, labels: jax.Array,
                   net: models.Network, settings: TrainSettings) -> Any:
  """Trains len(keys) fresh networks together (`over_networks`) for all epochs; jit-able.

  Args:
    keys: [P] PRNG keys, one per network (initialisation, data order, augmentation parameters).
    op_key: PRNG key of the DSA op draws, shared by the networks.
    images: [N, H, W, C] normalised training images.
    labels: [N] int labels.
    net: the architecture.
    settings: the hyper-parameters.

  Returns:
    The stacked trained variables (leading axis P).
  """
  optimizer = torch_sgd(settings.momentum, settings.weight_decay)
  carry = init_networks(keys, net, images.shape[1:], optimizer)
  epoch = make_epoch_fn(net, images, labels, settings)

  def all_epochs(one_carry, op_key):
    one_carry, _ = jax.lax.scan(lambda c, e: (epoch(c, e, op_key), None), one_carry,
                                jnp.arange(settings.epochs))
    return one_carry
  return over_networks(all_epochs)(carry, op_key)[0]


def accuracies(variables: Any, net: models.Network, test_images: jax.Array,
               test_labels: jax.Array, batch_size: int = 1000) -> jax.Array:
  """Test accuracy in [0, 1] of each of the stacked networks (leading axis P); jit-able."""
  num_test = test_images.shape[0]
  batch_size = min(batch_size, num_test)
  num_batches = -(-num_test // batch_size)
  pad = num_batches * batch_size - num_test
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

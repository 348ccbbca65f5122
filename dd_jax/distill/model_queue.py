"""IDM's model queue (Zhao et al., CVPR 2023): a fixed-capacity ring buffer of stacked network
variables with a validity mask, so a jitted step never retraces as the queue grows.

    queue = init_queue(key, net, image_shape, capacity, initial, optimizer)
    queue = push(queue, key, net, image_shape, optimizer)   # the oldest leaves when full
    slot = sample_member(queue, key); variables = member(queue, slot)
    queue = train_members(queue, slots, mask, key, sampler, net, recipe, lowering, ...)
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dd_jax import data as data_lib
from dd_jax import models
from dd_jax import train as train_lib
from dd_jax.lowering import Lowering


@flax.struct.dataclass
class ModelQueue:
  """A fixed-capacity FIFO of networks as stacked pytrees (leading axis = capacity).

  Attributes:
    variables: stacked network variables; invalid slots hold zeros.
    opt_state: stacked optimizer states (momentum buffers) of the networks' params.
    valid: bool [capacity], which slots hold a network.
    next_slot: int32 scalar, where the next push goes (once full: the oldest network).
    correct: float32 [capacity], correct training predictions since the last accuracy restart.
    seen: float32 [capacity], training predictions since the last accuracy restart.
  """

  variables: Any
  opt_state: Any
  valid: jax.Array
  next_slot: jax.Array
  correct: jax.Array
  seen: jax.Array

  @property
  def capacity(self) -> int:
    return self.valid.shape[0]

  def size(self) -> jax.Array:
    return jnp.sum(self.valid.astype(jnp.int32))


def _fresh_network(key, net, input_shape, optimizer):
  variables = net.init(key, (1, *input_shape))
  return variables, optimizer.init(variables['params'])


def init_queue(
  key: jax.Array,
  net: models.Network,
  input_shape: tuple[int, ...],
  capacity: int,
  initial: int,
  optimizer: optax.GradientTransformation,
) -> ModelQueue:
  """A queue of `initial` fresh random networks (slots 0..initial-1) and room for `capacity`."""
  variables, opt_state = jax.vmap(lambda k: _fresh_network(k, net, input_shape, optimizer))(
    jax.random.split(key, initial)
  )
  pad = lambda x: jnp.concatenate([x, jnp.zeros((capacity - initial, *x.shape[1:]), x.dtype)])
  return ModelQueue(
    variables=jax.tree_util.tree_map(pad, variables),
    opt_state=jax.tree_util.tree_map(pad, opt_state),
    valid=jnp.arange(capacity) < initial,
    next_slot=jnp.asarray(initial % capacity, jnp.int32),
    correct=jnp.zeros((capacity,), jnp.float32),
    seen=jnp.zeros((capacity,), jnp.float32),
  )


def push(
  queue: ModelQueue,
  key: jax.Array,
  net: models.Network,
  input_shape: tuple[int, ...],
  optimizer: optax.GradientTransformation,
) -> ModelQueue:
  """Adds a fresh random network at `next_slot`, replacing the oldest one when full."""
  variables, opt_state = _fresh_network(key, net, input_shape, optimizer)
  slot = queue.next_slot
  put = lambda stacked, new: stacked.at[slot].set(new)
  return queue.replace(
    variables=jax.tree_util.tree_map(put, queue.variables, variables),
    opt_state=jax.tree_util.tree_map(put, queue.opt_state, opt_state),
    valid=queue.valid.at[slot].set(True),
    next_slot=(slot + 1) % queue.capacity,
    correct=queue.correct.at[slot].set(0.0),
    seen=queue.seen.at[slot].set(0.0),
  )


def restart_accuracies(queue: ModelQueue) -> ModelQueue:
  """Forgets the training-accuracy counts (the reference resets them at evaluation points)."""
  return queue.replace(correct=jnp.zeros_like(queue.correct), seen=jnp.zeros_like(queue.seen))


def sample_member(queue: ModelQueue, key: jax.Array) -> jax.Array:
  """A uniformly random valid slot (int32 scalar)."""
  return jax.random.categorical(key, jnp.where(queue.valid, 0.0, -jnp.inf)).astype(jnp.int32)


def member(queue: ModelQueue, slot: jax.Array) -> Any:
  """The variables in `slot`."""
  return jax.tree_util.tree_map(lambda x: x[slot], queue.variables)


def training_accuracy(queue: ModelQueue, slot: jax.Array) -> jax.Array:
  """Running training accuracy of `slot` in percent (0 for a network never trained)."""
  seen = queue.seen[slot]
  return jnp.where(seen > 0, 100.0 * queue.correct[slot] / jnp.maximum(seen, 1.0), 0.0)


def pick_for_training(queue: ModelQueue, key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """`count` distinct slots, uniformly among the valid ones.

  Returns:
    (int32 [count] slots, bool [count] mask): when fewer than `count` networks are valid the
    surplus slots are invalid and masked out.
  """
  scores = jnp.where(queue.valid, jax.random.uniform(key, (queue.capacity,)), -1.0)
  _, slots = jax.lax.top_k(scores, count)
  return slots, queue.valid[slots]


def train_members(
  queue: ModelQueue,
  slots: jax.Array,
  mask: jax.Array,
  key: jax.Array,
  sampler: data_lib.ClassSampler,
  net: models.Network,
  recipe: train_lib.OptimizerRecipe,
  lowering: Lowering,
  *,
  steps: int,
  mean: tuple[float, ...],
  std: tuple[float, ...],
) -> ModelQueue:
  """`steps` SGD steps (`recipe`) for each network in `slots` (where `mask`), on uniform real
  batches of `recipe.batch_size`.

  No augmentation; training accuracy (from the logits before each update) is added to the
  networks' running counts. The networks are trained in a loop or under vmap as the lowering
  says (`train.over_networks`); the same networks either way, up to float rounding.
  """
  if steps == 0:
    return queue
  optimizer, batch_size = recipe.optimizer(), recipe.batch_size
  image_shape = sampler.images.shape[1:]
  microbatch = lowering.microbatch((batch_size, *image_shape), net.has_batch_stats)

  def train_one(variables, opt_state, key):
    def sgd(carry, step_key):
      variables, opt_state, correct = carry
      images, labels = data_lib.sample_uniform(sampler, step_key, batch_size)
      variables, opt_state, logits = train_lib.sgd_step(
        net,
        optimizer,
        variables,
        opt_state,
        data_lib.normalize(images, mean, std),
        labels,
        microbatch=microbatch,
      )
      correct = correct + jnp.sum(jnp.argmax(logits, -1) == labels)
      return (variables, opt_state, correct), None

    (variables, opt_state, correct), _ = jax.lax.scan(
      sgd, (variables, opt_state, jnp.zeros((), jnp.int32)), jax.random.split(key, steps)
    )
    return variables, opt_state, correct

  take = lambda x: x[slots]
  variables, opt_state, correct = train_lib.over_networks(
    lambda c: train_one(*c), lowering.loop_networks
  )(
    (
      jax.tree_util.tree_map(take, queue.variables),
      jax.tree_util.tree_map(take, queue.opt_state),
      jax.random.split(key, slots.shape[0]),
    )
  )

  def put(stacked, new):
    keep = mask.reshape(-1, *([1] * (new.ndim - 1)))
    return stacked.at[slots].set(jnp.where(keep, new, stacked[slots]))

  return queue.replace(
    variables=jax.tree_util.tree_map(put, queue.variables, variables),
    opt_state=jax.tree_util.tree_map(put, queue.opt_state, opt_state),
    correct=queue.correct.at[slots].add(jnp.where(mask, correct, 0).astype(jnp.float32)),
    seen=queue.seen.at[slots].add(jnp.where(mask, steps * batch_size, 0).astype(jnp.float32)),
  )

"""IDM (SPEC 6) with optional IID constraints: partition and expansion, the model queue, and the
per-class jitted step.

    state = init_idm_state(images, labels, optimizer, net, settings, key)
    step = make_idm_step(net, settings, optimizer, cc_extractor)
    state, metrics = step(state, sampler)          # jitted; traces once

Partition and expansion: each stored image holds four half-resolution images in its 2x2
quadrants (order top-left, bottom-left, top-right, bottom-right); `expand` splits them and
upsamples each x2 bilinearly, and both matching and evaluation use the 4 * ipc expanded images.

The model queue is a fixed-capacity ring buffer of stacked network variables with a validity
mask, so the jitted step never retraces as the queue grows. One step, in the reference order:
restart the running accuracies every `accuracy_window` steps; push a fresh random network every
`push_every` steps (the oldest leaves when the queue is full); draw one valid network to match
with; one optimizer step per class (a scan; the momentum buffer is shared by the whole image
tensor, so earlier classes' rows keep moving); then train `train_nets` queue networks for
`train_steps` SGD steps on uniform real batches, counting their training accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from dd_jax import augment as augment_lib
from dd_jax import data as data_lib
from dd_jax import losses
from dd_jax import models
from dd_jax import train as train_lib
from dd_jax.distill import dm

# ---------------------------------------------------------------------------------------------
# Partition and expansion.


def downscale(images: jax.Array) -> jax.Array:
  """2x2 average pooling: [N, H, W, C] -> [N, H / 2, W / 2, C] (H and W even)."""
  n, height, width, channels = images.shape
  blocks = images.reshape(n, height // 2, 2, width // 2, 2, channels)
  return jnp.mean(blocks, axis=(2, 4))


def assemble_quadrants(quadrants: jax.Array) -> jax.Array:
  """[4, N, h, w, C] in order (top-left, bottom-left, top-right, bottom-right) -> [N, 2h, 2w, C]."""
  top_left, bottom_left, top_right, bottom_right = quadrants
  left = jnp.concatenate([top_left, bottom_left], axis=1)
  right = jnp.concatenate([top_right, bottom_right], axis=1)
  return jnp.concatenate([left, right], axis=2)


def split_quadrants(images: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [4, N, H / 2, W / 2, C] in order (top-left, bottom-left, top-right,
  bottom-right); the inverse of `assemble_quadrants`."""
  half_h, half_w = images.shape[1] // 2, images.shape[2] // 2
  return jnp.stack([images[:, :half_h, :half_w], images[:, half_h:, :half_w],
                    images[:, :half_h, half_w:], images[:, half_h:, half_w:]])


def expand(images: jax.Array) -> jax.Array:
  """The 4N images a partitioned set stands for: [N, H, W, C] -> [4N, H, W, C].

  Quadrant-major (all top-left quadrants first, as the reference), each quadrant upsampled x2
  bilinearly with half-pixel centres (PyTorch's align_corners=False; at the border the nearest
  pixel is repeated, the same as PyTorch's clamping).
  """
  quadrants = split_quadrants(images)
  _, n, half_h, half_w, channels = quadrants.shape
  upsampled = jax.image.resize(quadrants, (4, n, 2 * half_h, 2 * half_w, channels), 'bilinear')
  return upsampled.reshape(4 * n, 2 * half_h, 2 * half_w, channels)


def expand_labels(labels: jax.Array) -> jax.Array:
  """Labels of `expand(images)`: [N] -> [4N] (the labels repeated four times)."""
  return jnp.tile(labels, 4)


def expanded_set(images: jax.Array, labels: jax.Array,
                 num_classes: int) -> tuple[jax.Array, jax.Array]:
  """(images, labels) of a class-blocked partitioned set, expanded class by class.

  Args:
    images: [K * ipc, H, W, C] stored images, class-blocked.
    labels: [K * ipc] their labels (ipc equal labels per class).
    num_classes: K.

  Returns:
    ([K * 4 * ipc, H, W, C], [K * 4 * ipc]), still class-blocked.
  """
  ipc = images.shape[0] // num_classes
  expanded = jax.vmap(expand)(images.reshape(num_classes, ipc, *images.shape[1:]))
  return (expanded.reshape(num_classes * 4 * ipc, *images.shape[1:]),
          jnp.repeat(labels.reshape(num_classes, ipc)[:, 0], 4 * ipc))


def partitioned_init(real: jax.Array) -> jax.Array:
  """Stored images from four real images each: [4, N, H, W, C] -> [N, H, W, C].

  real[q] fills quadrant q (top-left, bottom-left, top-right, bottom-right), downscaled by 2x2
  average pooling (not an antialiased resize).
  """
  return assemble_quadrants(jax.vmap(downscale)(real))


# ---------------------------------------------------------------------------------------------
# The model queue.


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


def init_queue(key: jax.Array, net: models.Network, input_shape: tuple[int, ...], capacity: int,
               initial: int, optimizer: optax.GradientTransformation) -> ModelQueue:
  """A queue of `initial` fresh random networks (slots 0..initial-1) and room for `capacity`."""
  variables, opt_state = jax.vmap(lambda k: _fresh_network(k, net, input_shape, optimizer))(
      jax.random.split(key, initial))
  pad = lambda x: jnp.concatenate([x, jnp.zeros((capacity - initial, *x.shape[1:]), x.dtype)])
  return ModelQueue(variables=jax.tree_util.tree_map(pad, variables),
                    opt_state=jax.tree_util.tree_map(pad, opt_state),
                    valid=jnp.arange(capacity) < initial,
                    next_slot=jnp.asarray(initial % capacity, jnp.int32),
                    correct=jnp.zeros((capacity,), jnp.float32),
                    seen=jnp.zeros((capacity,), jnp.float32))


def push(queue: ModelQueue, key: jax.Array, net: models.Network, input_shape: tuple[int, ...],
         optimizer: optax.GradientTransformation) -> ModelQueue:
  """Adds a fresh random network at `next_slot`, replacing the oldest one when full."""
  variables, opt_state = _fresh_network(key, net, input_shape, optimizer)
  slot = queue.next_slot
  put = lambda stacked, new: stacked.at[slot].set(new)
  return queue.replace(
      variables=jax.tree_util.tree_map(put, queue.variables, variables),
      opt_state=jax.tree_util.tree_map(put, queue.opt_state, opt_state),
      valid=queue.valid.at[slot].set(True),
      next_slot=(slot + 1) % queue.capacity,
      correct=queue.correct.at[slot].set(0.0), seen=queue.seen.at[slot].set(0.0))


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


def pick_for_training(queue: ModelQueue, key: jax.Array,
                      count: int) -> tuple[jax.Array, jax.Array]:
  """`count` distinct slots, uniformly among the valid ones.

  Returns:
    (int32 [count] slots, bool [count] mask): when fewer than `count` networks are valid the
    surplus slots are invalid and masked out.
  """
  scores = jnp.where(queue.valid, jax.random.uniform(key, (queue.capacity,)), -1.0)
  _, slots = jax.lax.top_k(scores, count)
  return slots, queue.valid[slots]


def train_members(queue: ModelQueue, slots: jax.Array, mask: jax.Array, key: jax.Array,
                  sampler: data_lib.ClassSampler, net: models.Network,
                  optimizer: optax.GradientTransformation, *, steps: int, batch_size: int,
                  lr: float, mean: tuple[float, ...], std: tuple[float, ...]) -> ModelQueue:
  """`steps` SGD steps for each network in `slots` (where `mask`), on uniform real batches.

  No augmentation; training accuracy (from the logits before each update) is added to the
  networks' running counts.
  """
  if steps == 0:
    return queue

  def train_one(variables, opt_state, key):
    def sgd(carry, step_key):
      variables, opt_state, correct = carry
      images, labels = data_lib.sample_uniform(sampler, step_key, batch_size)
      variables, opt_state, logits = train_lib.sgd_step(
          net, optimizer, variables, opt_state, data_lib.normalize(images, mean, std), labels,
          lr)
      correct = correct + jnp.sum(jnp.argmax(logits, -1) == labels)
      return (variables, opt_state, correct), None

    (variables, opt_state, correct), _ = jax.lax.scan(
        sgd, (variables, opt_state, jnp.zeros((), jnp.int32)), jax.random.split(key, steps))
    return variables, opt_state, correct

  take = lambda x: x[slots]
  variables, opt_state, correct = jax.vmap(train_one)(
      jax.tree_util.tree_map(take, queue.variables), jax.tree_util.tree_map(take, queue.opt_state),
      jax.random.split(key, slots.shape[0]))

  def put(stacked, new):
    keep = mask.reshape(-1, *([1] * (new.ndim - 1)))
    return stacked.at[slots].set(jnp.where(keep, new, stacked[slots]))

  return queue.replace(
      variables=jax.tree_util.tree_map(put, queue.variables, variables),
      opt_state=jax.tree_util.tree_map(put, queue.opt_state, opt_state),
      correct=queue.correct.at[slots].add(jnp.where(mask, correct, 0).astype(jnp.float32)),
      seen=queue.seen.at[slots].add(jnp.where(mask, steps * batch_size, 0).astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------
# Per-class optimizer steps.


def per_class_updates(images: jax.Array, opt_state: optax.OptState,
                      optimizer: optax.GradientTransformation, num_classes: int, ipc: int,
                      class_grad: Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]
                      ) -> tuple[jax.Array, optax.OptState, Any]:
  """One optimizer step per class, in class order (a scan), as the reference IDM.

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


# ---------------------------------------------------------------------------------------------
# State, settings and the step.


@flax.struct.dataclass
class IDMState:
  """A DM state plus the model queue. `images` are the stored (partitioned) images."""
  step: jax.Array
  images: jax.Array
  labels: jax.Array
  opt_state: optax.OptState
  key: jax.Array
  queue: ModelQueue


@dataclasses.dataclass(frozen=True)
class IDMSettings:
  """Static settings of the IDM step (config sections distill, idm, constraints).

  Attributes:
    num_classes: K.
    ipc: stored images per class (each expands to 4).
    batch_real: real images per class and step.
    strategy: DSA strategy string.
    weights: DM / CC / CM weights and options (on the expanded images).
    mean: per-channel normalisation mean.
    std: per-channel normalisation std.
    ce_weight: weight of the class-aware cross-entropy (times the accuracy in percent).
    accuracy_window: steps between restarts of the running training accuracies.
    queue_init: networks in the queue at the start.
    queue_capacity: most networks held.
    push_every: steps between pushes of a fresh network.
    train_nets: queue networks trained after each step.
    train_steps: SGD steps per trained network.
    train_batch: real images per SGD step.
    train_lr: their learning rate.
    train_momentum: their momentum.
    train_weight_decay: their (coupled) weight decay.
  """
  num_classes: int
  ipc: int
  batch_real: int
  strategy: str
  weights: losses.ObjectiveWeights
  mean: tuple[float, ...]
  std: tuple[float, ...]
  ce_weight: float = 0.5
  accuracy_window: int = 100
  queue_init: int = 3
  queue_capacity: int = 100
  push_every: int = 30
  train_nets: int = 2
  train_steps: int = 10
  train_batch: int = 256
  train_lr: float = 0.01
  train_momentum: float = 0.9
  train_weight_decay: float = 5e-4

  def network_optimizer(self) -> optax.GradientTransformation:
    return train_lib.torch_sgd(self.train_momentum, self.train_weight_decay)


def init_idm_state(images: jax.Array, labels: jax.Array, optimizer: optax.GradientTransformation,
                   net: models.Network, settings: IDMSettings, key: jax.Array,
                   queue_key: jax.Array) -> IDMState:
  """The state before the first step.

  Args:
    images: [K * ipc, H, W, C] initial stored images (normalised).
    labels: [K * ipc] class-blocked labels.
    optimizer: the image optimizer.
    net: the queue's architecture.
    settings: the step settings.
    key: typed PRNG key of the steps (step t uses fold_in(key, t)).
    queue_key: typed PRNG key of the initial queue networks.
  """
  images = jnp.asarray(images, jnp.float32)
  queue = init_queue(queue_key, net, images.shape[1:], settings.queue_capacity,
                     settings.queue_init, settings.network_optimizer())
  return IDMState(step=jnp.zeros((), jnp.int32), images=images,
                  labels=jnp.asarray(labels, jnp.int32), opt_state=optimizer.init(images),
                  key=jax.random.key_data(key), queue=queue)


def cc_keys(step_key: jax.Array) -> jax.Array:
  """The class-centralization keys [1] of an IDM step with key `step_key` (one matching
  network per step; every class's CC uses it)."""
  return jax.random.split(step_key, 7)[4][None]


def make_idm_step(net: models.Network, settings: IDMSettings,
                  optimizer: optax.GradientTransformation,
                  cc_extractor: dm.CentralizationExtractor = dm.matching_net_extractor
                  ) -> Callable[[IDMState, data_lib.ClassSampler], tuple[IDMState, dict]]:
  """Builds the step `(state, sampler) -> (state, metrics)`; its jitted core traces once.

  Metrics: 'loss' (weighted total summed over classes), the unweighted sums 'dm', 'cc', 'cm',
  'ce', the matching network's running training accuracy 'net_accuracy' (percent),
  'queue_size' and 'grad_norm' (norm of the stacked per-class gradients).
  """
  num_classes, ipc = settings.num_classes, settings.ipc
  network_optimizer = settings.network_optimizer()
  augment = lambda k, x: augment_lib.augment(k, x, settings.strategy, siamese=True)

  @jax.jit
  def jitted_step(state: IDMState, sampler: data_lib.ClassSampler, extractor_params: Any):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    (push_key, match_key, real_key, augment_key, _, pick_key,
     train_key) = jax.random.split(key, 7)
    cc_key = cc_keys(key)[0]  # the host derives it the same way to select a pool member
    image_shape = state.images.shape[1:]
    queue = state.queue
    queue = jax.lax.cond((state.step > 0) & (state.step % settings.accuracy_window == 0),
                         restart_accuracies, lambda q: q, queue)
    queue = jax.lax.cond(state.step % settings.push_every == 0,
                         lambda q: push(q, push_key, net, image_shape, network_optimizer),
                         lambda q: q, queue)
    slot = sample_member(queue, match_key)
    variables = member(queue, slot)
    accuracy = training_accuracy(queue, slot)
    real_keys = jax.random.split(real_key, num_classes)
    class_keys = jax.random.split(augment_key, num_classes)
    if cc_extractor.select is not None:  # the host selected for the one CC key of the step
      extractor_params = jax.tree_util.tree_map(lambda x: x[0], extractor_params)

    def class_loss(class_images, class_id):
      real = data_lib.sample_class(sampler, real_keys[class_id], class_id, settings.batch_real)
      real = data_lib.normalize(real, settings.mean, settings.std)
      real = jax.lax.stop_gradient(augment(class_keys[class_id], real))
      syn = augment(class_keys[class_id], expand(class_images))
      real_features, real_map = net.embed(variables, real)
      syn_features, syn_map, logits = net.embed_with_logits(variables, syn)
      cc_features = cc_extractor.features(extractor_params, cc_key, syn, syn_features)
      terms = losses.class_objective(real_features, real_map, syn_features, syn_map,
                                     cc_features, settings.weights)
      ce = train_lib.cross_entropy(logits, jnp.full((syn.shape[0],), class_id))
      total = terms.total + settings.ce_weight * accuracy * ce
      return total, {'loss': total, 'dm': terms.dm, 'cc': terms.cc, 'cm': terms.cm, 'ce': ce}

    def class_grad(class_images, class_id):
      grad, aux = jax.grad(class_loss, has_aux=True)(class_images, class_id)
      return grad, (aux, jnp.sum(jnp.square(grad)))

    images, opt_state, (per_class, squared_norms) = per_class_updates(
        state.images, state.opt_state, optimizer, num_classes, ipc, class_grad)
    slots, mask = pick_for_training(queue, pick_key, settings.train_nets)
    queue = train_members(queue, slots, mask, train_key, sampler, net, network_optimizer,
                          steps=settings.train_steps, batch_size=settings.train_batch,
                          lr=settings.train_lr, mean=settings.mean, std=settings.std)
    metrics = {name: jnp.sum(value) for name, value in per_class.items()}
    metrics.update(net_accuracy=accuracy, queue_size=queue.size().astype(jnp.float32),
                   grad_norm=jnp.sqrt(jnp.sum(squared_norms)))
    return state.replace(step=state.step + 1, images=images, opt_state=opt_state,
                         queue=queue), metrics

  host_cc_keys = jax.jit(lambda key_data, step: cc_keys(
      jax.random.fold_in(jax.random.wrap_key_data(key_data), step)))

  def arguments(state: IDMState, sampler: data_lib.ClassSampler):
    params = cc_extractor.params
    if cc_extractor.select is not None:  # e.g. a pool's drawn member, chosen on the host
      params = cc_extractor.select(params, host_cc_keys(state.key, state.step))
    return state, sampler, params

  def step(state: IDMState, sampler: data_lib.ClassSampler):
    return jitted_step(*arguments(state, sampler))

  # The compiled core and its arguments, to lower it (FLOPs, memory) or count its traces.
  step.jitted, step.arguments = jitted_step, arguments
  return step

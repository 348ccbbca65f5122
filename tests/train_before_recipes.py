# dd_jax/train.py at commit c3b0145, verbatim below this comment: the trainer before the
# training recipes (multistep schedule, CutMix, IDC augmentation at training time). Kept as the
# reference that tests/test_train.py lowers beside dd_jax.train, to prove that the default
# TrainSettings still build the same program (identical StableHLO text) and train bitwise the
# same networks. Do not edit; delete it with that test if the trainer's program is ever meant
# to change.

"""Supervised training of stacked networks with PyTorch SGD semantics (evaluation, pool, IDM).

One implementation serves the three places dd_jax trains networks:
- the evaluation protocol (DatasetCondensation utils.evaluate_synset): a small set, DSA per
  minibatch, the lr x0.1 (and a fresh optimizer) part-way through;
- the pretrained pool for class centralization: the real set, no augmentation, constant lr;
- the IDM model queue (Zhao et al., CVPR 2023): a few SGD steps on uniform real batches inside
  the jitted distillation step.

    recipe = SGDRecipe(batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4)
    optimizer = recipe.optimizer()
    variables, opt_state, logits = sgd_step(net, optimizer, variables, opt_state, x, y)
    settings = TrainSettings(epochs=1000, recipe=recipe, augment_strategy=..., schedule=...)
    epoch = make_epoch_fn(net, images, labels, settings, lowering)  # (carry, epoch[, op key])
    variables = train_networks(keys, images, labels, net, settings, lowering)

How the networks are trained together (a loop or `vmap`) and how many images a gradient pass
takes come from the run's `dd_jax.lowering.Lowering`; the trained networks do not depend on it
beyond float rounding.

Every network has its own initialisation, data order and augmentation parameters, and by default
its own DSA op per minibatch (as independent runs would draw them). `share_augment_op=True` makes
the networks trained together share each minibatch's op instead: under `vmap` (accelerators) a
per-network op turns `lax.switch` into computing every op, a shared one keeps it one branch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dd_jax import augment as augment_lib
from dd_jax import models, progress
from dd_jax import settings as settings_lib
from dd_jax.lowering import Lowering

# (variables, opt_state, loop_key) of one network.
TrainCarry = tuple[Any, optax.OptState, jax.Array]

# Learning-rate schedules of `TrainSettings.schedule` (see `epoch_plan`).
SCHEDULES = ('constant', 'reference', 'halves')
# The lr factor from the schedule's drop epoch on.
LR_DROP_FACTOR = 0.1


@dataclasses.dataclass(frozen=True)
class SGDRecipe(settings_lib.Settings):
  """Minibatch SGD with PyTorch's semantics (`torch.optim.SGD(lr, momentum, weight_decay)`).

  Per step, for every parameter p with gradient g: g <- g + weight_decay * p (coupled L2);
  buf <- momentum * buf + g; p <- p - lr * buf.

  Attributes:
    batch_size: minibatch size; the last partial batch of an epoch is kept (no drop-last).
    lr: learning rate.
    momentum: momentum of the buffer (0: plain SGD).
    weight_decay: coupled L2 added to the gradient of every parameter.
  """

  batch_size: int = settings_lib.field(256, check=settings_lib.POSITIVE)
  lr: float = settings_lib.field(0.01, check=settings_lib.POSITIVE)
  momentum: float = settings_lib.field(0.9, check=settings_lib.NON_NEGATIVE)
  weight_decay: float = settings_lib.field(5e-4, check=settings_lib.NON_NEGATIVE)

  def optimizer(self, lr: jax.Array | float | None = None) -> optax.GradientTransformation:
    """The optax transformation of this recipe: decayed weights, momentum trace, scale by -lr.

    Args:
      lr: the learning rate, default `self.lr`; may be a traced scalar (an lr schedule builds
        the optimizer of each epoch with its lr: the state does not depend on the lr).

    Returns:
      `optax.chain(add_decayed_weights(weight_decay), sgd(lr, momentum))`; `init` gives the
      zero momentum buffer (the reference's fresh optimizer at the lr drop).
    """
    return optax.chain(
      optax.add_decayed_weights(self.weight_decay),
      optax.sgd(self.lr if lr is None else lr, momentum=self.momentum),
    )


def check_augment_strategy(strategy: str, field: str = 'augment_strategy') -> None:
  """Raises `settings.SettingError` on `field` for an invalid DSA strategy."""
  try:
    augment_lib.parse_strategy(strategy)
  except augment_lib.StrategyError as error:
    raise settings_lib.SettingError(field, strategy, error.reason) from None


@dataclasses.dataclass(frozen=True)
class TrainSettings(settings_lib.Settings):
  """How networks are trained: the SGD recipe, epochs, lr schedule and augmentation.

  Attributes:
    epochs: the schedule's epoch count (`epoch_plan`: 'reference' trains epochs + 1).
    recipe: the SGD hyper-parameters.
    augment_strategy: DSA strategy applied to every minibatch ('' or 'none': no augmentation).
    schedule: 'constant' (the lr throughout), 'reference' (the evaluation loop of
      DatasetCondensation: epochs + 1 epochs, lr x0.1 and a fresh optimizer from epoch
      epochs // 2 + 2 on) or 'halves' (epochs // 2 at the lr, the rest at 0.1 lr after a fresh
      optimizer; dd_jax's evaluation before the reference schedule).
    share_augment_op: False: every network draws its own DSA op per minibatch. True: networks
      trained together share each minibatch's op, from a shared key (see module docstring).
  """

  epochs: int = settings_lib.field(check=settings_lib.POSITIVE)
  recipe: SGDRecipe = SGDRecipe()
  augment_strategy: str = ''
  schedule: str = settings_lib.field('constant', choices=SCHEDULES)
  share_augment_op: bool = settings_lib.field(False, choices=(False, True))

  def check(self) -> None:
    check_augment_strategy(self.augment_strategy)


def epoch_plan(epochs: int, schedule: str) -> tuple[int, int]:
  """How many epochs a schedule trains and the first epoch at the dropped lr.

  'reference' is DatasetCondensation's `evaluate_synset`: `for ep in range(Epoch + 1)`, with the
  lr x0.1 and a new optimizer after epoch `Epoch // 2 + 1`; Epoch = 1000 trains 502 epochs at the
  lr and 499 at 0.1 lr.

  Args:
    epochs: the configured epoch count.
    schedule: one of `SCHEDULES`.

  Returns:
    (epochs_trained, first_low_lr_epoch); first_low_lr_epoch >= epochs_trained means the lr
    never drops. 'reference': (epochs + 1, epochs // 2 + 2); 'halves': (epochs, epochs // 2);
    'constant': (epochs, epochs).
  """
  if schedule == 'reference':
    return epochs + 1, epochs // 2 + 2
  if schedule == 'halves':
    return epochs, epochs // 2
  if schedule == 'constant':
    return epochs, epochs
  raise ValueError(f'schedule={schedule!r} is not valid; choose one of {list(SCHEDULES)}.')


def epoch_lr(settings: TrainSettings, epoch_index: jax.Array | int) -> jax.Array:
  """The learning rate of epoch `epoch_index` (0-based; may be traced) under `settings`."""
  _, first_low_lr_epoch = epoch_plan(settings.epochs, settings.schedule)
  lr = settings.recipe.lr
  return jnp.where(epoch_index < first_low_lr_epoch, lr, lr * LR_DROP_FACTOR)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of [N, K] logits against [N] int labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _microbatched_gradient(
  net: models.Network, variables: Any, images: jax.Array, labels: jax.Array, microbatch: int
) -> tuple[Any, jax.Array]:
  """(gradient of the mean cross-entropy, [N, K] logits), summed over passes of `microbatch` images.

  Full passes run in a `lax.scan`, a last partial one after it. Only for networks whose every
  layer acts per sample (no batch norm): the gradient is then the whole batch's to float rounding.
  """
  num_images = images.shape[0]
  params = variables['params']

  def summed_loss(params, images, labels):
    logits, _ = net.apply_train({**variables, 'params': params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses) / num_images, logits

  gradient = jax.grad(summed_loss, has_aux=True)
  num_full, remainder = divmod(num_images, microbatch)
  in_full = num_full * microbatch

  def add_pass(total, batch):
    grads, logits = gradient(params, *batch)
    return jax.tree_util.tree_map(jnp.add, total, grads), logits

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  grads, logits = jax.lax.scan(
    add_pass,
    zeros,
    (
      images[:in_full].reshape(num_full, microbatch, *images.shape[1:]),
      labels[:in_full].reshape(num_full, microbatch),
    ),
  )
  logits = logits.reshape(in_full, -1)
  if remainder:
    grads, last_logits = add_pass(grads, (images[in_full:], labels[in_full:]))
    logits = jnp.concatenate([logits, last_logits])
  return grads, logits


def sgd_step(
  net: models.Network,
  optimizer: optax.GradientTransformation,
  variables: Any,
  opt_state: optax.OptState,
  images: jax.Array,
  labels: jax.Array,
  *,
  microbatch: int = 0,
) -> tuple[Any, optax.OptState, jax.Array]:
  """One cross-entropy SGD step of one network.

  Args:
    net: the network.
    optimizer: `SGDRecipe.optimizer(lr)` (its lr is the step's).
    variables: the network's variables (batch-norm statistics are updated in train mode).
    opt_state: the optimizer state of variables['params'].
    images: [N, H, W, C] normalised minibatch.
    labels: [N] int labels.
    microbatch: images per forward-backward pass, their gradients summed (a run takes
      `Lowering.microbatch`: 16 CIFAR-10 images on CPU, where it is faster); 0: the whole batch
      in one pass. The step is the same to float rounding; it is not micro-batching of the
      *update*: one update per call.

  Returns:
    (new variables, new optimizer state, the [N, K] training-mode logits before the update).

  Raises:
    ValueError: a negative `microbatch`, or one that splits the batch of a batch-norm network
      (its statistics are over the whole batch).
  """
  if microbatch < 0:
    raise ValueError(f'microbatch must be >= 0 (0: the whole batch), got {microbatch}.')
  if 0 < microbatch < images.shape[0] and net.has_batch_stats:
    raise ValueError(
      f'microbatch={microbatch} splits a batch of {images.shape[0]}, but the network has '
      'batch-norm statistics over the whole batch: use microbatch=0.'
    )
  if 0 < microbatch < images.shape[0]:
    grads, logits = _microbatched_gradient(net, variables, images, labels, microbatch)
    new_variables = variables
  else:

    def loss_fn(params):
      logits, new_variables = net.apply_train({**variables, 'params': params}, images)
      return cross_entropy(logits, labels), (new_variables, logits)

    grads, (new_variables, logits) = jax.grad(loss_fn, has_aux=True)(variables['params'])
  updates, opt_state = optimizer.update(grads, opt_state, variables['params'])
  params = optax.apply_updates(variables['params'], updates)
  return {**new_variables, 'params': params}, opt_state, logits


def init_networks(
  keys: jax.Array,
  net: models.Network,
  input_shape: tuple[int, ...],
  optimizer: optax.GradientTransformation,
) -> TrainCarry:
  """Stacked fresh networks and their training carry, one per key in [P] `keys`."""

  def init_one(key):
    init_key, loop_key = jax.random.split(key)
    variables = net.init(init_key, (1, *input_shape))
    return variables, optimizer.init(variables['params']), loop_key

  return jax.vmap(init_one)(keys)


def full_batches(num_images: int, settings: TrainSettings) -> int:
  """Full minibatches per epoch (the steps `progress` counts; a partial last one is not)."""
  return num_images // min(settings.recipe.batch_size, num_images)


def make_epoch_fn(
  net: models.Network,
  images: jax.Array,
  labels: jax.Array,
  settings: TrainSettings,
  lowering: Lowering,
  progress_every: int = 0,
) -> Callable[..., TrainCarry]:
  """One epoch of one network: `(carry, epoch_index, shared_op_key=None) -> carry`.

  Apply it to stacked networks with `over_networks`. The epoch's lr and the momentum reset at
  the lr drop follow `settings.schedule` (`epoch_plan`, `epoch_lr`); minibatches are a fresh
  permutation of the images, the last partial one kept.

  Args:
    net: the network.
    images: [N, H, W, C] normalised training images (closed over: the same for every network).
    labels: [N] int labels.
    settings: the hyper-parameters.
    lowering: the images per gradient pass of each minibatch step (`Lowering.microbatch`).
    progress_every: if > 0, a `progress.tick` after every this many full minibatches, counted
      from the first epoch (`epoch_index * full_batches + i`).

  Returns:
    The epoch function. `epoch_index` is 0-based (may be traced). `shared_op_key`, a PRNG key
    shared by the networks trained together, draws the DSA ops when
    `settings.share_augment_op` (required then, if there is augmentation); otherwise every
    network draws its ops from its own loop key and `shared_op_key` is ignored.
  """
  num_images = images.shape[0]
  batch_size = min(settings.recipe.batch_size, num_images)
  num_full_batches, remainder = divmod(num_images, batch_size)
  num_keys = num_full_batches + 1  # one per full batch, and one for the partial batch
  augments = bool(augment_lib.parse_strategy(settings.augment_strategy))
  epochs_trained, first_low_lr_epoch = epoch_plan(settings.epochs, settings.schedule)
  lr_drops = first_low_lr_epoch < epochs_trained
  microbatch = lowering.microbatch((batch_size, *images.shape[1:]), net.has_batch_stats)

  def minibatch_step(variables, opt_state, optimizer, batch_indices, op_key, param_key):
    batch = augment_lib.apply_random_op(
      op_key, param_key, images[batch_indices], settings.augment_strategy, siamese=False
    )
    variables, opt_state, _ = sgd_step(
      net, optimizer, variables, opt_state, batch, labels[batch_indices], microbatch=microbatch
    )
    return variables, opt_state

  def epoch(carry, epoch_index, shared_op_key=None):
    variables, opt_state, loop_key = carry
    if lr_drops:
      # The reference builds a new optimizer at the drop: a zero momentum buffer.
      fresh = settings.recipe.optimizer().init(variables['params'])
      opt_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(epoch_index == first_low_lr_epoch, new, old), fresh, opt_state
      )
      optimizer = settings.recipe.optimizer(epoch_lr(settings, epoch_index))
    else:
      optimizer = settings.recipe.optimizer()
    epoch_key = jax.random.fold_in(loop_key, epoch_index)
    order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), num_images)
    param_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), num_keys)
    if not settings.share_augment_op:
      op_keys = jax.random.split(jax.random.fold_in(epoch_key, 2), num_keys)
    elif shared_op_key is not None:
      op_keys = jax.random.split(jax.random.fold_in(shared_op_key, epoch_index), num_keys)
    elif augments:
      raise ValueError(
        'share_augment_op=True needs the shared_op_key of the networks trained together.'
      )
    else:
      op_keys = param_keys  # no augmentation: never drawn from
    full = order[: num_full_batches * batch_size].reshape(num_full_batches, batch_size)

    def step(state, inputs):
      *inputs, index = inputs
      if progress_every:
        progress.tick(epoch_index * num_full_batches + index, progress_every)
      return minibatch_step(*state, optimizer, *inputs), None

    (variables, opt_state), _ = jax.lax.scan(
      step,
      (variables, opt_state),
      (full, op_keys[:-1], param_keys[:-1], jnp.arange(num_full_batches)),
    )
    if remainder:  # the last, partial batch (no drop-last)
      variables, opt_state = minibatch_step(
        variables,
        opt_state,
        optimizer,
        order[num_full_batches * batch_size :],
        op_keys[-1],
        param_keys[-1],
      )
    return variables, opt_state, loop_key

  return epoch


def over_networks(fn: Callable[..., Any], loop: bool) -> Callable[..., Any]:
  """`fn(carry, *shared)` applied to a stack of networks' carries (leading axis), shared args
  unbatched.

  Args:
    fn: the function of one network's carry.
    loop: a loop over the networks (`lax.map`; `Lowering.loop_networks`, faster on XLA:CPU),
      else `vmap`. The same results to float rounding.

  Returns:
    `(stacked carry, *shared) -> stacked result`.
  """
  if not loop:
    return lambda carry, *shared: jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(carry, *shared)

  def looped(carry, *shared):
    return jax.lax.map(lambda one: fn(one, *shared), carry)

  return looped


def train_networks(
  keys: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  net: models.Network,
  settings: TrainSettings,
  lowering: Lowering,
  shared_op_key: jax.Array | None = None,
  progress_every: int = 0,
) -> Any:
  """Trains len(keys) fresh networks together (`over_networks`) for all epochs; jit-able.

  Network i depends on keys[i] alone (and on `shared_op_key` when `settings.share_augment_op`),
  so networks trained together equal the same networks trained one at a time, up to float
  rounding.

  Args:
    keys: [P] PRNG keys, one per network (initialisation, data order, augmentation).
    images: [N, H, W, C] normalised training images.
    labels: [N] int labels.
    net: the architecture.
    settings: the hyper-parameters; `epoch_plan` gives the number of epochs.
    lowering: a loop or vmap over the networks, images per gradient pass.
    shared_op_key: PRNG key of the DSA op draws shared by the networks; required when
      `settings.share_augment_op` and there is augmentation, ignored otherwise.
    progress_every: as `make_epoch_fn` (see `progress_ticks`).

  Returns:
    The stacked trained variables (leading axis P).
  """
  carry = init_networks(keys, net, images.shape[1:], settings.recipe.optimizer())
  epoch = make_epoch_fn(net, images, labels, settings, lowering, progress_every)
  epochs_trained, _ = epoch_plan(settings.epochs, settings.schedule)

  def all_epochs(one_carry, shared_op_key):
    one_carry, _ = jax.lax.scan(
      lambda c, e: (epoch(c, e, shared_op_key), None), one_carry, jnp.arange(epochs_trained)
    )
    return one_carry

  return over_networks(all_epochs, lowering.loop_networks)(carry, shared_op_key)[0]


def progress_ticks(
  num_networks: int, num_images: int, settings: TrainSettings, lowering: Lowering
) -> tuple[int, int]:
  """(progress_every, ticks) of `train_networks`: about 50 ticks per network, made once by
  networks trained together under vmap and once per network by a loop."""
  steps = epoch_plan(settings.epochs, settings.schedule)[0] * full_batches(num_images, settings)
  every = progress.every_for(steps)
  return every, progress.ticks_of(steps, every, num_networks if lowering.loop_networks else 1)


def accuracies(
  variables: Any,
  net: models.Network,
  test_images: jax.Array,
  test_labels: jax.Array,
  batch_size: int = 1000,
) -> jax.Array:
  """Test accuracy in [0, 1] of each of the stacked networks (leading axis P); jit-able."""
  # Host (NumPy) weights, e.g. a stored pool's, as jax arrays: vmapped NumPy leaves would reach
  # the instance norm's custom VJP as constants it refuses.
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
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
  correct, _ = jax.lax.scan(correct_in_batch, jnp.zeros((num_nets,), jnp.int32), (images, labels))
  return correct / num_test

"""Supervised training of stacked networks with PyTorch optimizer semantics (evaluation, pool, IDM).

One implementation serves the three places dd_jax trains networks:
- the evaluation protocol (DatasetCondensation utils.evaluate_synset): a small set, DSA per
  minibatch, the lr x0.1 (and a fresh optimizer) part-way through;
- the pretrained pool for class centralization: the real set, no augmentation, constant lr;
- the IDM model queue (Zhao et al., CVPR 2023): a few SGD steps on uniform real batches inside
  the jitted distillation step.

The IDC family's recipes (IDC's evaluation, the DANCE/NCFM/DSDM extractor pools) are options of
`TrainSettings`, all off by default: the 'multistep' schedule (PyTorch's MultiStepLR, momentum
kept), IDC's DiffAug with per-image parameters (`augment_mode='idc'`, `augment_minibatch`) and
CutMix after the augmentation (`cutmix_probability`; `sample_cutmix`, `cutmix`, `cutmix_loss`).

    recipe = OptimizerRecipe(batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4)
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

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dd_jax import augment as augment_lib
from dd_jax import models, progress
from dd_jax import settings as settings_lib
from dd_jax.augment import idc
from dd_jax.lowering import Lowering

# (variables, opt_state, loop_key) of one network.
TrainCarry = tuple[Any, optax.OptState, jax.Array]

# Learning-rate schedules of `TrainSettings.schedule` (see `epoch_plan`).
SCHEDULES = ('constant', 'reference', 'halves', 'multistep')
# The schedules that re-create the optimizer (a zero momentum buffer) at their lr drop.
RESTARTING_SCHEDULES = ('reference', 'halves')
# The lr factor from the drop epoch on of 'reference' and 'halves'.
LR_DROP_FACTOR = 0.1
# The default lr factor per milestone of 'multistep' (PyTorch MultiStepLR's).
MULTISTEP_GAMMA = 0.1
# A milestone epoch is floor(fraction * epochs + this): 0.29 of 100 epochs is epoch 29, although
# 0.29 * 100 is 28.999999999999996 in binary floating point.
MILESTONE_TOLERANCE = 1e-6
# `TrainSettings.augment_mode`: DM's DSA (one op of the strategy per minibatch) or IDC's DiffAug.
AUGMENT_MODES = ('dsa', 'idc')
# The key streams of an epoch (`jax.random.fold_in(epoch_key, stream)`): fixed numbers, append,
# never renumber.
_EPOCH_STREAMS = {'order': 0, 'augment_params': 1, 'augment_ops': 2, 'cutmix': 3}
# The key streams of one minibatch's CutMix draw (`sample_cutmix`).
_CUTMIX_STREAMS = {'apply': 0, 'lambda': 1, 'partner': 2, 'centre_row': 3, 'centre_col': 4}


# `OptimizerRecipe.algorithm`: PyTorch's SGD (coupled L2) or AdamW (decoupled decay).
OPTIMIZERS = ('sgd', 'adamw')
# PyTorch's AdamW defaults, which NCFM's evaluation keeps (betas, eps).
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe(settings_lib.Settings):
  """A minibatch optimizer with PyTorch's semantics.

  'sgd' (`torch.optim.SGD(lr, momentum, weight_decay)`), per step, for every parameter p with
  gradient g: g <- g + weight_decay * p (coupled L2); buf <- momentum * buf + g;
  p <- p - lr * buf.
  'adamw' (`torch.optim.AdamW(lr, weight_decay=weight_decay)`, betas `ADAMW_BETAS`, eps
  `ADAMW_EPS`): p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p); `momentum` is
  unused.

  Attributes:
    batch_size: minibatch size; the last partial batch of an epoch is kept (no drop-last).
    lr: learning rate.
    momentum: 'sgd': momentum of the buffer (0: plain SGD).
    weight_decay: 'sgd': coupled L2 added to the gradient of every parameter; 'adamw': the
      decoupled decay rate.
    algorithm: one of `OPTIMIZERS` (config field `optimizer`).
  """

  batch_size: int = settings_lib.field(256, check=settings_lib.POSITIVE)
  lr: float = settings_lib.field(0.01, check=settings_lib.POSITIVE)
  momentum: float = settings_lib.field(0.9, check=settings_lib.NON_NEGATIVE)
  weight_decay: float = settings_lib.field(5e-4, check=settings_lib.NON_NEGATIVE)
  algorithm: str = settings_lib.field('sgd', choices=OPTIMIZERS, config_name='optimizer')

  def optimizer(self, lr: jax.Array | float | None = None) -> optax.GradientTransformation:
    """The optax transformation of this recipe.

    Args:
      lr: the learning rate, default `self.lr`; may be a traced scalar (an lr schedule builds
        the optimizer of each epoch with its lr: the state does not depend on the lr).

    Returns:
      'sgd': `optax.chain(add_decayed_weights(weight_decay), sgd(lr, momentum))`; 'adamw':
      `optax.adamw(lr, *ADAMW_BETAS, ADAMW_EPS, weight_decay)`. `init` gives the fresh state
      (the reference's new optimizer at an lr drop).
    """
    lr = self.lr if lr is None else lr
    if self.algorithm == 'adamw':
      b1, b2 = ADAMW_BETAS
      return optax.adamw(lr, b1=b1, b2=b2, eps=ADAMW_EPS, weight_decay=self.weight_decay)
    return optax.chain(
      optax.add_decayed_weights(self.weight_decay), optax.sgd(lr, momentum=self.momentum)
    )


def check_augment_strategy(strategy: str, field: str = 'augment_strategy') -> None:
  """Raises `settings.SettingError` on `field` for an invalid DSA strategy."""
  try:
    augment_lib.parse_strategy(strategy)
  except augment_lib.StrategyError as error:
    raise settings_lib.SettingError(field, strategy, error.reason) from None


def milestone_epochs(epochs: int, milestones: tuple[float, ...]) -> tuple[int, ...]:
  """The epochs of 'multistep' milestones given as fractions of the epochs.

  Args:
    epochs: the configured epoch count E.
    milestones: fractions of E (`TrainSettings.milestones`).

  Returns:
    floor(fraction * E) of each fraction, in order (`MILESTONE_TOLERANCE` absorbs binary
    rounding): (2/3, 5/6) of 60 -> (40, 50), of 1000 -> (666, 833) as IDC's 2E // 3, 5E // 6.
  """
  return tuple(math.floor(fraction * epochs + MILESTONE_TOLERANCE) for fraction in milestones)


@dataclasses.dataclass(frozen=True)
class TrainSettings(settings_lib.Settings):
  """How networks are trained: the SGD recipe, epochs, lr schedule and augmentation.

  Attributes:
    epochs: the schedule's epoch count (`epoch_plan`: 'reference' trains epochs + 1).
    recipe: the optimizer's hyper-parameters.
    augment_strategy: DSA strategy applied to every minibatch ('' or 'none': no augmentation).
    schedule: 'constant' (the lr throughout), 'reference' (the evaluation loop of
      DatasetCondensation: epochs + 1 epochs, lr x0.1 and a fresh optimizer from epoch
      epochs // 2 + 2 on) or 'halves' (epochs // 2 at the lr, the rest at 0.1 lr after a fresh
      optimizer; dd_jax's evaluation before the reference schedule).
    share_augment_op: False: every network draws its own DSA op (IDC: geometric op) per
      minibatch. True: networks trained together share each minibatch's op, from a shared key
      (see module docstring).
    milestones: 'multistep' only (() otherwise): fractions of `epochs`, each in (0, 1),
      increasing. Milestone m = floor(fraction * epochs) (`milestone_epochs`); as PyTorch's
      MultiStepLR stepped once per epoch, the lr is multiplied by `gamma` once m epochs have
      run, i.e. 0-based epoch e trains at lr * gamma ** (number of milestones <= e) (two
      fractions on one epoch multiply by gamma ** 2 there). The momentum buffer is kept. ():
      a constant lr (PyTorch's MultiStepLR with no milestone; the same program as 'constant').
      IDC's protocol: (2/3, 5/6) with gamma 0.2; NCFM's: (1/5, 2/5, 3/5, 4/5) with gamma 0.5;
      DANCE's pool: epochs 40 and 50 of 60 = (2/3, 5/6), gamma 0.2.
    gamma: the 'multistep' lr factor per milestone; other schedules require the default.
    augment_mode: 'dsa' (DM's DSA: one op of the strategy per minibatch, parameters per image)
      or 'idc' (IDC's DiffAug, `augment_minibatch`: flip, colour and cutout if listed, one
      geometric op per minibatch, parameters per image; strategies as `augment.idc`).
    cutmix_probability: the probability in [0, 1] that a minibatch is CutMixed after its
      augmentation (`cutmix`: Yun et al., ICCV 2019, as IDC's code applies it); 0: never (no
      CutMix in the program).
    cutmix_beta: lambda ~ Beta(cutmix_beta, cutmix_beta) of CutMix.
    hard_label_epochs: with soft labels (`make_epoch_fn`'s `soft_labels`), the last this many
      epochs train on the hard labels (NCFM: 100).
  """

  epochs: int = settings_lib.field(check=settings_lib.POSITIVE)
  recipe: OptimizerRecipe = OptimizerRecipe()
  augment_strategy: str = ''
  schedule: str = settings_lib.field('constant', choices=SCHEDULES)
  share_augment_op: bool = settings_lib.field(False, choices=(False, True))
  milestones: tuple[float, ...] = ()
  gamma: float = settings_lib.field(MULTISTEP_GAMMA, check=settings_lib.POSITIVE)
  augment_mode: str = settings_lib.field('dsa', choices=AUGMENT_MODES)
  cutmix_probability: float = settings_lib.field(0.0, check=settings_lib.NON_NEGATIVE)
  cutmix_beta: float = settings_lib.field(1.0, check=settings_lib.POSITIVE)
  hard_label_epochs: int = settings_lib.field(100, check=settings_lib.NON_NEGATIVE)

  def check(self) -> None:
    if self.augment_mode == 'idc':
      idc.parse_strategy(self.augment_strategy)
    else:
      check_augment_strategy(self.augment_strategy)
    # A list from a config would make the settings unhashable (they are static jit arguments).
    object.__setattr__(self, 'milestones', tuple(self.milestones))
    fractions = self.milestones
    if self.schedule != 'multistep':
      if fractions:
        raise settings_lib.SettingError(
          'milestones', fractions, "is only for schedule='multistep'; use ()"
        )
      if self.gamma != MULTISTEP_GAMMA:
        raise settings_lib.SettingError(
          'gamma', self.gamma, f"is only for schedule='multistep'; use {MULTISTEP_GAMMA}"
        )
    elif not all(0 < f < 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
      raise settings_lib.SettingError(
        'milestones', fractions, 'must be increasing fractions of the epochs, each in (0, 1)'
      )
    if self.cutmix_probability > 1:
      raise settings_lib.SettingError('cutmix_probability', self.cutmix_probability, 'must be <= 1')


def epoch_plan(epochs: int, schedule: str, milestones: tuple[float, ...] = ()) -> tuple[int, int]:
  """How many epochs a schedule trains and the first epoch at a lower lr.

  'reference' is DatasetCondensation's `evaluate_synset`: `for ep in range(Epoch + 1)`, with the
  lr x0.1 and a new optimizer after epoch `Epoch // 2 + 1`; Epoch = 1000 trains 502 epochs at the
  lr and 499 at 0.1 lr.

  Args:
    epochs: the configured epoch count.
    schedule: one of `SCHEDULES`.
    milestones: 'multistep' only: `TrainSettings.milestones`.

  Returns:
    (epochs_trained, first_low_lr_epoch); first_low_lr_epoch >= epochs_trained means the lr
    never drops. 'reference': (epochs + 1, epochs // 2 + 2); 'halves': (epochs, epochs // 2);
    'constant': (epochs, epochs); 'multistep': (epochs, the first milestone epoch).
  """
  if schedule == 'reference':
    return epochs + 1, epochs // 2 + 2
  if schedule == 'halves':
    return epochs, epochs // 2
  if schedule == 'constant':
    return epochs, epochs
  if schedule == 'multistep':
    return epochs, min(milestone_epochs(epochs, milestones), default=epochs)
  raise ValueError(f'schedule={schedule!r} is not valid; choose one of {list(SCHEDULES)}.')


def epoch_lr(settings: TrainSettings, epoch_index: jax.Array | int) -> jax.Array:
  """The learning rate of epoch `epoch_index` (0-based; may be traced) under `settings`.

  'multistep': lr * gamma ** (milestones passed), the products in float64 as PyTorch's
  (`TrainSettings.milestones`); the other schedules: lr before `epoch_plan`'s first low-lr
  epoch, lr * `LR_DROP_FACTOR` from it on.
  """
  lr = settings.recipe.lr
  if settings.schedule == 'multistep':
    counts = sorted(
      collections.Counter(milestone_epochs(settings.epochs, settings.milestones)).items()
    )
    rates = [lr]
    for _, count in counts:
      rates.append(rates[-1] * settings.gamma**count)
    passed = jnp.sum(jnp.asarray(epoch_index) >= jnp.asarray([epoch for epoch, _ in counts]))
    return jnp.asarray(rates)[passed]
  _, first_low_lr_epoch = epoch_plan(settings.epochs, settings.schedule)
  return jnp.where(epoch_index < first_low_lr_epoch, lr, lr * LR_DROP_FACTOR)


def example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[N] softmax cross-entropy of [N, K] logits against [N] int labels or [N, K] soft targets
  (-sum_k target_k * log softmax(logits)_k)."""
  if labels.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of [N, K] logits against [N] int labels or [N, K] soft targets."""
  return jnp.mean(example_cross_entropy(logits, labels))


def soft_targets(
  teacher_logits: jax.Array, labels: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """A teacher's soft labels, as NCFM's evaluation makes them (its utils/train_val.py).

  A row the teacher misclassifies is replaced by the one-hot vector of its label, in logit space,
  before the softmax; so it becomes e / (e + K - 1) on its class (0.232 for K = 10) at
  temperature 1.

  Args:
    teacher_logits: [N, K] the teacher's logits of the (un-augmented) training images.
    labels: [N] int labels.
    temperature: tau: softmax(logits / tau).

  Returns:
    [N, K] targets, rows summing to 1.
  """
  one_hot = jax.nn.one_hot(labels, teacher_logits.shape[-1], dtype=teacher_logits.dtype)
  correct = jnp.argmax(teacher_logits, axis=-1) == labels
  logits = jnp.where(correct[:, None], teacher_logits, one_hot)
  return jax.nn.softmax(logits / temperature, axis=-1)


def cutmix_loss(
  logits: jax.Array, labels: jax.Array, partner_labels: jax.Array, ratio: jax.Array | float
) -> jax.Array:
  """The loss of a CutMixed minibatch: ratio * CE(labels) + (1 - ratio) * CE(partner_labels).

  Args:
    logits: [N, K] logits of the mixed images.
    labels: [N] int labels (or [N, K] soft targets) of the images.
    partner_labels: those of the partners whose boxes were pasted (`cutmix`).
    ratio: [] the fraction of each image left its own, 1 - box area / (H * W).

  Returns:
    [] the mixed mean cross-entropy; `cross_entropy(logits, labels)` exactly at ratio 1.
  """
  return ratio * cross_entropy(logits, labels) + (1 - ratio) * cross_entropy(logits, partner_labels)


class CutMixDraw(NamedTuple):
  """The random draws of one minibatch's CutMix (one box and one lambda for the whole batch).

  Attributes:
    apply: [] bool, whether the minibatch is mixed (probability `cutmix_probability`).
    lam: [] lambda ~ Beta(beta, beta); the box side is int(side * sqrt(1 - lambda)).
    partner: [N] int32, a permutation of the batch: image i receives image partner[i]'s box.
    centre_row: [] int32, the box centre's row, uniform in {0, ..., H - 1}.
    centre_col: [] int32, the box centre's column, uniform in {0, ..., W - 1}.
  """

  apply: jax.Array
  lam: jax.Array
  partner: jax.Array
  centre_row: jax.Array
  centre_col: jax.Array


def sample_cutmix(
  key: jax.Array, batch_size: int, height: int, width: int, probability: float, beta: float = 1.0
) -> CutMixDraw:
  """Draws one minibatch's CutMix, each draw from its own named `fold_in` stream of `key`.

  Args:
    key: the minibatch's CutMix key; it alone decides the draw.
    batch_size: N.
    height: H.
    width: W.
    probability: the probability of mixing this minibatch (IDC's `mix_p`).
    beta: lambda ~ Beta(beta, beta).

  Returns:
    The `CutMixDraw`.
  """
  stream = lambda name: jax.random.fold_in(key, _CUTMIX_STREAMS[name])
  return CutMixDraw(
    apply=jax.random.uniform(stream('apply')) < probability,
    lam=jax.random.beta(stream('lambda'), beta, beta),
    partner=jax.random.permutation(stream('partner'), batch_size),
    centre_row=jax.random.randint(stream('centre_row'), (), 0, height),
    centre_col=jax.random.randint(stream('centre_col'), (), 0, width),
  )


def cutmix_box(
  lam: jax.Array | float,
  centre_row: jax.Array | int,
  centre_col: jax.Array | int,
  height: int,
  width: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """CutMix's box (Yun et al., ICCV 2019, `rand_bbox`, as IDC and NCFM copy it).

  Cut sides h = int(H * sqrt(1 - lam)), w = int(W * sqrt(1 - lam)); the box spans rows
  centre_row - h // 2 ... centre_row + h // 2 - 1 and the same columns around centre_col, clipped
  to the image (so an odd side loses a pixel: 2 * (h // 2) rows before clipping).

  Args:
    lam: [] lambda in [0, 1].
    centre_row: [] int, in {0, ..., H - 1}.
    centre_col: [] int, in {0, ..., W - 1}.
    height: H.
    width: W.

  Returns:
    [] int32 (row_start, row_stop, col_start, col_stop), stops exclusive, within the image.
  """
  cut = jnp.sqrt(1.0 - jnp.asarray(lam))
  half_rows = (height * cut).astype(jnp.int32) // 2
  half_cols = (width * cut).astype(jnp.int32) // 2
  return (
    jnp.clip(centre_row - half_rows, 0, height),
    jnp.clip(centre_row + half_rows, 0, height),
    jnp.clip(centre_col - half_cols, 0, width),
    jnp.clip(centre_col + half_cols, 0, width),
  )


def cutmix(images: jax.Array, draw: CutMixDraw) -> tuple[jax.Array, jax.Array]:
  """Pastes every image's partner's box (CutMix, as IDC's code), if `draw.apply`; pure.

  Args:
    images: [N, H, W, C] (augmented) minibatch.
    draw: from `sample_cutmix` with this N, H, W.

  Returns:
    (mixed images, ratio): image i with rows and columns of `cutmix_box` replaced by image
    `draw.partner[i]`'s, and [] ratio = 1 - box area / (H * W), the weight of the images' own
    labels in `cutmix_loss`. Without `draw.apply`: (images, 1).
  """
  _, height, width, _ = images.shape
  row_start, row_stop, col_start, col_stop = cutmix_box(
    draw.lam, draw.centre_row, draw.centre_col, height, width
  )
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_rows = (rows >= row_start) & (rows < row_stop)
  in_cols = (cols >= col_start) & (cols < col_stop)
  in_box = draw.apply & in_rows[:, None] & in_cols[None, :]
  mixed = jnp.where(in_box[None, :, :, None], images[draw.partner], images)
  area = (row_stop - row_start) * (col_stop - col_start)
  ratio = jnp.where(draw.apply, 1.0 - area / (height * width), 1.0).astype(images.dtype)
  return mixed, ratio


def augment_minibatch(
  op_key: jax.Array, param_key: jax.Array, images: jax.Array, strategy: str, mode: str = 'dsa'
) -> jax.Array:
  """One training minibatch's augmentation, parameters drawn per image.

  Args:
    op_key: PRNG key of the op drawn per minibatch: DSA's op ('dsa'), or IDC's geometric op
      ('idc', the `geometric` draw of `idc.sample_params(op_key, ...)`).
    param_key: PRNG key of the per-image parameters ('idc': `idc.sample_params(param_key, ...,
      num_draws=N)`, IDC's `batch=False`).
    images: [N, H, W, C] normalised images.
    strategy: the strategy string of `mode`.
    mode: one of `AUGMENT_MODES`.

  Returns:
    [N, H, W, C] augmented images.
  """
  if mode == 'idc':
    num_images, height, width, _ = images.shape
    params = idc.sample_params(param_key, strategy, height, width, num_images)
    geometric = idc.sample_params(op_key, strategy, height, width).geometric
    return idc.apply(images, params._replace(geometric=geometric), strategy)
  return augment_lib.apply_random_op(op_key, param_key, images, strategy, siamese=False)


def _microbatched_gradient(
  net: models.Network,
  variables: Any,
  images: jax.Array,
  labels: jax.Array,
  microbatch: int,
  mix: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[Any, jax.Array]:
  """(gradient of the mean cross-entropy, [N, K] logits), summed over passes of `microbatch` images.

  Full passes run in a `lax.scan`, a last partial one after it. Only for networks whose every
  layer acts per sample (no batch norm): the gradient is then the whole batch's to float rounding.
  `mix` as `sgd_step`'s: the per-image losses are then CutMix's (`cutmix_loss`).
  """
  num_images = images.shape[0]
  params = variables['params']
  if mix is not None:
    partner_labels, ratio = mix
    labels = jnp.stack([labels, partner_labels], axis=1)  # split into passes together

  def summed_loss(params, images, labels):
    logits, _ = net.apply_train({**variables, 'params': params}, images)
    if mix is None:
      losses = example_cross_entropy(logits, labels)
    else:
      own, partner = (example_cross_entropy(logits, labels[:, i]) for i in (0, 1))
      losses = ratio * own + (1 - ratio) * partner
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
      labels[:in_full].reshape(num_full, microbatch, *labels.shape[1:]),
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
  mix: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[Any, optax.OptState, jax.Array]:
  """One cross-entropy SGD step of one network.

  Args:
    net: the network.
    optimizer: `OptimizerRecipe.optimizer(lr)` (its lr is the step's).
    variables: the network's variables (batch-norm statistics are updated in train mode).
    opt_state: the optimizer state of variables['params'].
    images: [N, H, W, C] normalised minibatch.
    labels: [N] int labels, or [N, K] soft targets.
    microbatch: images per forward-backward pass, their gradients summed (a run takes
      `Lowering.microbatch`: 16 CIFAR-10 images on CPU, where it is faster); 0: the whole batch
      in one pass. The step is the same to float rounding; it is not micro-batching of the
      *update*: one update per call.
    mix: (partner_labels [N], ratio []) of a CutMixed minibatch (`cutmix`): the loss is
      `cutmix_loss(logits, labels, partner_labels, ratio)`; None: `cross_entropy`.

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
    grads, logits = _microbatched_gradient(net, variables, images, labels, microbatch, mix)
    new_variables = variables
  else:

    def loss_fn(params):
      logits, new_variables = net.apply_train({**variables, 'params': params}, images)
      loss = cross_entropy(logits, labels) if mix is None else cutmix_loss(logits, labels, *mix)
      return loss, (new_variables, logits)

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
  soft_labels: jax.Array | None = None,
) -> Callable[..., TrainCarry]:
  """One epoch of one network: `(carry, epoch_index, shared_op_key=None) -> carry`.

  Apply it to stacked networks with `over_networks`. The epoch's lr and the momentum reset at
  the lr drop ('reference', 'halves'; 'multistep' keeps the buffer) follow `settings.schedule`
  (`epoch_plan`, `epoch_lr`); minibatches are a fresh permutation of the images, the last
  partial one kept. Each minibatch is augmented (`augment_minibatch`), then CutMixed with
  probability `settings.cutmix_probability` (`sample_cutmix` from the minibatch's CutMix key,
  `cutmix`, `cutmix_loss`).

  Args:
    net: the network.
    images: [N, H, W, C] normalised training images (closed over: the same for every network).
    labels: [N] int labels.
    settings: the hyper-parameters.
    lowering: the images per gradient pass of each minibatch step (`Lowering.microbatch`).
    progress_every: if > 0, a `progress.tick` after every this many full minibatches, counted
      from the first epoch (`epoch_index * full_batches + i`).
    soft_labels: [N, K] soft targets (`soft_targets`) to train on instead of `labels`, except in
      the last `settings.hard_label_epochs` epochs (CutMix mixes them as it mixes labels).

  Returns:
    The epoch function. `epoch_index` is 0-based (may be traced). `shared_op_key`, a PRNG key
    shared by the networks trained together, draws the DSA ops (IDC: geometric ops) when
    `settings.share_augment_op` (required then, if there is augmentation); otherwise every
    network draws its ops from its own loop key and `shared_op_key` is ignored.
  """
  num_images = images.shape[0]
  batch_size = min(settings.recipe.batch_size, num_images)
  num_full_batches, remainder = divmod(num_images, batch_size)
  num_keys = num_full_batches + 1  # one per full batch, and one for the partial batch
  if settings.augment_mode == 'idc':
    augments = not idc.parse_strategy(settings.augment_strategy).empty
  else:
    augments = bool(augment_lib.parse_strategy(settings.augment_strategy))
  mixes = settings.cutmix_probability > 0
  epochs_trained, first_low_lr_epoch = epoch_plan(
    settings.epochs, settings.schedule, settings.milestones
  )
  lr_drops = first_low_lr_epoch < epochs_trained
  restarts = lr_drops and settings.schedule in RESTARTING_SCHEDULES
  microbatch = lowering.microbatch((batch_size, *images.shape[1:]), net.has_batch_stats)

  def minibatch_step(
    variables, opt_state, optimizer, epoch_labels, batch_indices, op_key, param_key, *cutmix_key
  ):
    batch = augment_minibatch(
      op_key, param_key, images[batch_indices], settings.augment_strategy, settings.augment_mode
    )
    batch_labels = epoch_labels[batch_indices]
    mix = None
    if mixes:  # after the augmentation, as IDC's train_epoch
      batch_height, batch_width = batch.shape[1:3]
      draw = sample_cutmix(
        *cutmix_key,  # given with CutMix only
        batch.shape[0],
        batch_height,
        batch_width,
        settings.cutmix_probability,
        settings.cutmix_beta,
      )
      batch, ratio = cutmix(batch, draw)
      mix = (batch_labels[draw.partner], ratio)
    variables, opt_state, _ = sgd_step(
      net, optimizer, variables, opt_state, batch, batch_labels, microbatch=microbatch, mix=mix
    )
    return variables, opt_state

  def epoch(carry, epoch_index, shared_op_key=None):
    variables, opt_state, loop_key = carry
    if restarts:
      # The reference builds a new optimizer at the drop: a zero momentum buffer.
      fresh = settings.recipe.optimizer().init(variables['params'])
      opt_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(epoch_index == first_low_lr_epoch, new, old), fresh, opt_state
      )
    if lr_drops:  # 'multistep': PyTorch's scheduler changes the lr of the same optimizer
      optimizer = settings.recipe.optimizer(epoch_lr(settings, epoch_index))
    else:
      optimizer = settings.recipe.optimizer()
    epoch_labels = labels
    if soft_labels is not None:
      hard = jax.nn.one_hot(labels, soft_labels.shape[-1], dtype=soft_labels.dtype)
      soft_until = epochs_trained - settings.hard_label_epochs
      epoch_labels = jnp.where(epoch_index < soft_until, soft_labels, hard)
    epoch_key = jax.random.fold_in(loop_key, epoch_index)
    stream = lambda name: jax.random.fold_in(epoch_key, _EPOCH_STREAMS[name])
    order = jax.random.permutation(stream('order'), num_images)
    param_keys = jax.random.split(stream('augment_params'), num_keys)
    if not settings.share_augment_op:
      op_keys = jax.random.split(stream('augment_ops'), num_keys)
    elif shared_op_key is not None:
      op_keys = jax.random.split(jax.random.fold_in(shared_op_key, epoch_index), num_keys)
    elif augments:
      raise ValueError(
        'share_augment_op=True needs the shared_op_key of the networks trained together.'
      )
    else:
      op_keys = param_keys  # no augmentation: never drawn from
    # One CutMix key per minibatch (none without CutMix: the draws above stay the same).
    cutmix_keys = (jax.random.split(stream('cutmix'), num_keys),) if mixes else ()
    full = order[: num_full_batches * batch_size].reshape(num_full_batches, batch_size)

    def step(state, inputs):
      *inputs, index = inputs
      if progress_every:
        progress.tick(epoch_index * num_full_batches + index, progress_every)
      return minibatch_step(*state, optimizer, epoch_labels, *inputs), None

    (variables, opt_state), _ = jax.lax.scan(
      step,
      (variables, opt_state),
      (
        full,
        op_keys[:-1],
        param_keys[:-1],
        *(keys[:-1] for keys in cutmix_keys),
        jnp.arange(num_full_batches),
      ),
    )
    if remainder:  # the last, partial batch (no drop-last)
      variables, opt_state = minibatch_step(
        variables,
        opt_state,
        optimizer,
        epoch_labels,
        order[num_full_batches * batch_size :],
        op_keys[-1],
        param_keys[-1],
        *(keys[-1] for keys in cutmix_keys),
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
  soft_labels: jax.Array | None = None,
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
    soft_labels: as `make_epoch_fn`.

  Returns:
    The stacked trained variables (leading axis P).
  """
  carry = init_networks(keys, net, images.shape[1:], settings.recipe.optimizer())
  epoch = make_epoch_fn(net, images, labels, settings, lowering, progress_every, soft_labels)
  epochs_trained, _ = epoch_plan(settings.epochs, settings.schedule)

  def all_epochs(one_carry, shared_op_key):
    one_carry, _ = jax.lax.scan(
      lambda c, e: (epoch(c, e, shared_op_key), None), one_carry, jnp.arange(epochs_trained)
    )
    return one_carry

  return over_networks(all_epochs, lowering.loop_networks)(carry, shared_op_key)[0]


def evaluation_epochs(epochs_trained: int, every: int) -> tuple[int, ...]:
  """The epoch counts after which `train_and_test_networks` tests: every, 2 * every, ... and the
  last (`epochs_trained`); every <= 0 or >= epochs_trained: the last only."""
  if not 0 < every < epochs_trained:
    return (epochs_trained,)
  return tuple(range(every, epochs_trained + 1, every)) + (
    (epochs_trained,) if epochs_trained % every else ()
  )


def train_and_test_networks(
  keys: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  net: models.Network,
  settings: TrainSettings,
  lowering: Lowering,
  test_images: jax.Array,
  test_labels: jax.Array,
  every: int,
  test_batch_size: int = 1000,
  shared_op_key: jax.Array | None = None,
  progress_every: int = 0,
  soft_labels: jax.Array | None = None,
) -> jax.Array:
  """`train_networks`, testing every network after each of `evaluation_epochs`; jit-able.

  The training is `train_networks`'s (the same networks from the same keys, to float rounding):
  the epochs run in segments of `every` (a `scan` of segments, then the remainder), each
  followed by the test accuracy.

  Args:
    keys, images, labels, net, settings, lowering, shared_op_key, progress_every, soft_labels:
      as `train_networks`.
    test_images: [M, H, W, C] normalised test images.
    test_labels: [M] int labels.
    every: epochs between tests (see `evaluation_epochs`).
    test_batch_size: test images per forward pass.

  Returns:
    [T, P] test accuracies in [0, 1], row t after `evaluation_epochs(...)[t]` epochs.
  """
  carry = init_networks(keys, net, images.shape[1:], settings.recipe.optimizer())
  epoch = make_epoch_fn(net, images, labels, settings, lowering, progress_every, soft_labels)
  epochs_trained, _ = epoch_plan(settings.epochs, settings.schedule)
  if not 0 < every < epochs_trained:
    every = epochs_trained
  num_segments, remainder = divmod(epochs_trained, every)

  def test(variables):
    one = jax.tree_util.tree_map(lambda x: x[None], variables)
    return accuracies(one, net, test_images, test_labels, test_batch_size)[0]

  def one_network(one_carry, shared_op_key):
    def run_epochs(one_carry, epoch_indices):
      return jax.lax.scan(
        lambda c, e: (epoch(c, e, shared_op_key), None), one_carry, epoch_indices
      )[0]

    def segment(one_carry, start):
      one_carry = run_epochs(one_carry, start + jnp.arange(every))
      return one_carry, test(one_carry[0])

    one_carry, curve = jax.lax.scan(segment, one_carry, jnp.arange(num_segments) * every)
    if remainder:
      one_carry = run_epochs(one_carry, num_segments * every + jnp.arange(remainder))
      curve = jnp.concatenate([curve, test(one_carry[0])[None]])
    return curve

  return over_networks(one_network, lowering.loop_networks)(carry, shared_op_key).T


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

"""Evaluation protocols: train fresh networks on a small set, test them on real data.

`num_eval` networks are trained together in one jitted program (`dd_jax.train`: networks
stacked, `scan` over epochs and minibatches). Each network has its own initialisation, data
order, augmentation parameters and (by default) DSA ops, as independent runs of the reference
would.

The settings come from a named protocol (`dd_jax.protocols`; `config.eval.protocol`), any field
overridable. The default, 'dm', is DatasetCondensation's `evaluate_synset` (utils.py): SGD
(momentum 0.9, coupled weight decay 5e-4 applied to every parameter, as PyTorch's SGD), batch 256
reshuffled every epoch without dropping the last partial batch, mean cross-entropy, DSA on every
minibatch (one op per batch, parameters per image). Schedule 'reference': epochs + 1 epochs, the
learning rate x0.1 after epoch epochs // 2 + 1, with a fresh optimizer (momentum buffer reset),
as the reference's `for ep in range(Epoch + 1)` loop. Test accuracy once, at the end, on the full
test set. Protocols with `eval_every` > 0 also test every `eval_every` epochs; the records keep
the last accuracy and the best over those points (what the IDC family reports).

`python -m dd_jax.evaluate` evaluates any synthetic set file: `sets` reads and checks it,
`command.evaluate_file` does the work, `main` holds the flags. Those two are the command's, like
`dd_jax.main`, and import `dd_jax.run`; this module imports nothing above `dd_jax.distill`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dd_jax import augment as augment_lib
from dd_jax import models, progress, protocols, stats
from dd_jax import settings as settings_lib
from dd_jax import train as train_lib
from dd_jax.lowering import Lowering

# `EvalSettings.select_checkpoint`.
CHECKPOINT_SELECTIONS = ('last', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class EvalSettings(settings_lib.Settings):
  """Evaluation hyper-parameters (config section `eval`).

  Attributes:
    model: registry name of the evaluated architecture.
    protocol: the `dd_jax.protocols` name the other fields were resolved from (recorded).
    num_eval: networks trained (each from its own key).
    epochs: the schedule's epoch count (see `train.epoch_plan`).
    recipe: the optimizer (config fields `optimizer`, `batch_size`, `lr`, `momentum`,
      `weight_decay`).
    augment_strategy: DSA strategy of every minibatch ('none': no augmentation).
    schedule: lr schedule, see `train.TrainSettings` ('reference', 'halves', 'constant' or
      'multistep').
    milestones: 'multistep': the fractions of the epochs after which the lr is multiplied by
      `gamma`.
    gamma: 'multistep': the factor at each milestone.
    augment_mode: 'dsa' (DM's DSA: one op per minibatch) or 'idc' (IDC's DiffAug with
      per-image parameters).
    cutmix_probability: probability of CutMix per minibatch (0: none).
    share_augment_op: networks trained together share each minibatch's DSA op (cheaper under
      vmap on accelerators; correlates the networks).
    eval_every: test every this many epochs as well as after the last (0: the last only).
    soft_labels: train on a teacher's soft labels (`train.soft_targets`; NCFM's option), the
      caller giving them to `evaluate_set`; the last `hard_label_epochs` epochs on the labels.
    hard_label_epochs: see `soft_labels`.
    select_checkpoint: which synthetic set a run exports and reports: 'last' (the last
      iteration's), 'validation' (the evaluation point with the best validation accuracy; the
      run holds out a validation split, and the exported set is scored on the test split
      afterwards by `python -m dd_jax.evaluate`) or 'test' (the best test accuracy, as DANCE,
      DSDM and M3D report: a choice on the test split, labelled in every table and record).
    test_batch_size: test images per forward pass (does not change the accuracies).
  """

  model: str = settings_lib.field('ConvNet', choices=models.network_names)
  protocol: str = settings_lib.field('dm', choices=protocols.NAMES)
  num_eval: int = settings_lib.field(5, check=settings_lib.POSITIVE)
  epochs: int = settings_lib.field(1000, check=settings_lib.POSITIVE)
  recipe: train_lib.OptimizerRecipe = train_lib.OptimizerRecipe()
  augment_strategy: str = augment_lib.DEFAULT_STRATEGY
  schedule: str = settings_lib.field('reference', choices=train_lib.SCHEDULES)
  milestones: tuple[float, ...] = ()
  gamma: float = train_lib.MULTISTEP_GAMMA
  augment_mode: str = settings_lib.field('dsa', choices=train_lib.AUGMENT_MODES)
  cutmix_probability: float = 0.0
  share_augment_op: bool = settings_lib.field(False, choices=(False, True))
  eval_every: int = settings_lib.field(0, check=settings_lib.NON_NEGATIVE)
  soft_labels: bool = settings_lib.field(False, choices=(False, True))
  hard_label_epochs: int = settings_lib.field(100, check=settings_lib.NON_NEGATIVE)
  select_checkpoint: str = settings_lib.field('last', choices=CHECKPOINT_SELECTIONS)
  test_batch_size: int = settings_lib.field(1000, check=settings_lib.POSITIVE)

  @property
  def selects_checkpoint(self) -> bool:
    """Whether the run exports its best evaluation point rather than its last iteration."""
    return self.select_checkpoint != 'last'

  def check(self) -> None:
    # A list from a config would make the settings unhashable (a static jit argument).
    object.__setattr__(self, 'milestones', tuple(self.milestones))
    self.train_settings()  # its checks name the same fields

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> EvalSettings:
    """The settings of section `eval` of the experiment config `config`, its unset fields from
    its protocol (`protocols.resolve`).

    Raises:
      ValueError: a value out of range, naming it as `config.eval.<field>`.
    """
    section = protocols.resolve(config.eval)
    recipe = settings_lib.from_section(train_lib.OptimizerRecipe, section, 'eval')
    return settings_lib.from_section(cls, section, 'eval', recipe=recipe)

  def train_settings(self) -> train_lib.TrainSettings:
    return train_lib.TrainSettings(
      epochs=self.epochs,
      recipe=self.recipe,
      augment_strategy=self.augment_strategy,
      schedule=self.schedule,
      milestones=self.milestones,
      gamma=self.gamma,
      augment_mode=self.augment_mode,
      cutmix_probability=self.cutmix_probability,
      share_augment_op=self.share_augment_op,
      hard_label_epochs=self.hard_label_epochs,
    )


class Accuracies(NamedTuple):
  """Test accuracies in percent of the networks of one evaluation.

  Attributes:
    epochs: (T,) the epoch counts after which the networks were tested (the last is the end).
    curve: [T, P] accuracy of network p after epochs[t].
  """

  epochs: tuple[int, ...]
  curve: np.ndarray

  @property
  def last(self) -> np.ndarray:
    """[P] after the last epoch."""
    return self.curve[-1]

  @property
  def best(self) -> np.ndarray:
    """[P] the best over the evaluation points (chosen on the test split)."""
    return self.curve.max(axis=0)


@functools.partial(jax.jit, static_argnames=('net', 'settings', 'lowering', 'progress_every'))
def _train_and_test(
  key,
  images,
  labels,
  soft_labels,
  test_images,
  test_labels,
  net,
  settings,
  lowering,
  progress_every,
):
  net_keys = jax.random.split(jax.random.fold_in(key, 0), settings.num_eval)
  shared_op_key = jax.random.fold_in(key, 1) if settings.share_augment_op else None
  train_settings = settings.train_settings()
  options = dict(
    shared_op_key=shared_op_key, progress_every=progress_every, soft_labels=soft_labels
  )
  with lowering.precision_scope():
    if settings.eval_every:
      return train_lib.train_and_test_networks(
        net_keys, images, labels, net, train_settings, lowering, test_images, test_labels,
        settings.eval_every, settings.test_batch_size, **options,
      )  # fmt: skip
    variables = train_lib.train_networks(
      net_keys, images, labels, net, train_settings, lowering, **options
    )
    accuracies = train_lib.accuracies(
      variables, net, test_images, test_labels, settings.test_batch_size
    )
    return accuracies[None]


def evaluate_set(
  key: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  test_images: jax.Array,
  test_labels: jax.Array,
  num_classes: int,
  settings: EvalSettings,
  lowering: Lowering,
  soft_labels: jax.Array | None = None,
) -> Accuracies:
  """Trains `settings.num_eval` fresh networks on (images, labels) and tests them.

  Args:
    key: PRNG key (initialisations, data order, augmentation).
    images: [N, H, W, C] normalised training images (a synthetic set or a real subset).
    labels: [N] int labels.
    test_images: [M, H, W, C] normalised real test images.
    test_labels: [M] int labels.
    num_classes: K.
    settings: the protocol's hyper-parameters.
    lowering: how the networks are computed and trained together (`dd_jax.lowering`).
    soft_labels: [N, K] a teacher's targets, required when `settings.soft_labels` (ignored
      otherwise).

  Returns:
    The networks' test accuracies after the last epoch and, with `settings.eval_every`, after
    every `eval_every` epochs (`train.evaluation_epochs`).
  """
  if settings.soft_labels and soft_labels is None:
    raise ValueError("config.eval.soft_labels=True needs the teacher's soft labels.")
  net = models.get_network(settings.model, num_classes, conv=lowering.train_conv)
  train_settings = settings.train_settings()
  every, ticks = train_lib.progress_ticks(settings.num_eval, len(images), train_settings, lowering)
  description = (
    f'training {stats.count(settings.num_eval, "network")} ({settings.model}) on '
    f'{len(images)} images'
  )
  with progress.bar(ticks, description):
    curve = _train_and_test(
      key,
      jnp.asarray(images, jnp.float32),
      jnp.asarray(labels, jnp.int32),
      jnp.asarray(soft_labels, jnp.float32) if settings.soft_labels else None,
      jnp.asarray(test_images, jnp.float32),
      jnp.asarray(test_labels, jnp.int32),
      net,
      settings,
      lowering,
      every,
    )
    curve = np.asarray(curve)
  epochs_trained, _ = train_lib.epoch_plan(train_settings.epochs, train_settings.schedule)
  return Accuracies(train_lib.evaluation_epochs(epochs_trained, settings.eval_every), curve * 100.0)


def accuracy_columns(settings: EvalSettings, split: str) -> tuple[str, str]:
  """A table's accuracy columns under `settings`: (header cells, separator cells). The last
  epoch's accuracy, and with evaluation points the best one, labelled as chosen on `split`."""
  header = f' {split} accuracy, last epoch (%) |'
  if settings.eval_every:
    header += f' best of every {settings.eval_every} epochs, chosen on {split} (%) |'
    return header, '---|---|'
  return header, '---|'


def accuracy_cells(evaluation: dict, settings: EvalSettings) -> str:
  """The cells of `accuracy_columns` for an evaluation record (`run.evaluation_record`)."""
  cells = f' {stats.format_mean_std(evaluation["accuracies"])} |'
  if settings.eval_every:
    best = evaluation.get('best_accuracies', evaluation['accuracies'])
    cells += f' {stats.format_mean_std(best)} |'
  return cells

"""IDM (Zhao et al., CVPR 2023) with optional IID constraints: partition and expansion, the
per-class jitted step, and the method (its model queue: `dd_jax.distill.model_queue`).

    state = init_idm_state(images, labels, net, settings, spec, seed)
    step = make_idm_step(net, settings, spec, lowering, extractor)
    state, metrics = step(state, sampler)          # jitted; traces once

Partition and expansion: each stored image holds four half-resolution images in its 2x2
quadrants (order top-left, bottom-left, top-right, bottom-right); `expand` splits them and
upsamples each x2 bilinearly, and both matching and evaluation use the 4 * ipc expanded images
(`dd_jax.multiformation` at factor 2 in column order, shared with the IDC family).

The model queue is a fixed-capacity ring buffer of stacked network variables with a validity
mask, so the jitted step never retraces as the queue grows. One step, in the reference order:
restart the running accuracies (every `accuracy_window` steps, or at the listed
`accuracy_restarts`); push a fresh random network every
`push_every` steps (the oldest leaves when the queue is full); draw one valid network to match
with; one optimizer step per class (a scan; the momentum buffer is shared by the whole image
tensor, so earlier classes' rows keep moving); then train `train_nets` queue networks for
`train_steps` SGD steps on uniform real batches, counting their training accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dd_jax import augment as augment_lib
from dd_jax import data as data_lib
from dd_jax import extractors as extractors_lib
from dd_jax import keys as keys_lib
from dd_jax import losses, models, multiformation
from dd_jax import settings as settings_lib
from dd_jax import train as train_lib
from dd_jax.distill import base, class_steps
from dd_jax.distill.model_queue import (
  ModelQueue,
  init_queue,
  member,
  pick_for_training,
  push,
  restart_accuracies,
  sample_member,
  train_members,
  training_accuracy,
)
from dd_jax.lowering import Lowering
from dd_jax.settings import NON_NEGATIVE, POSITIVE, field

# ---------------------------------------------------------------------------------------------
# Partition and expansion.


# IDM's layout of `dd_jax.multiformation`: f = 2, quadrants column by column (the reference
# fills top-left, bottom-left, top-right, bottom-right), 2x2 average pooling at initialisation.
FACTOR = 2
ORDER = 'column'


def downscale(images: jax.Array) -> jax.Array:
  """2x2 average pooling: [N, H, W, C] -> [N, H / 2, W / 2, C] (H and W even)."""
  return multiformation.downsample(images, FACTOR, 'mean')


def assemble_quadrants(quadrants: jax.Array) -> jax.Array:
  """[4, N, h, w, C] in order (top-left, bottom-left, top-right, bottom-right) -> [N, 2h, 2w, C]."""
  return multiformation.assemble(quadrants, ORDER)


def split_quadrants(images: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [4, N, H / 2, W / 2, C] in order (top-left, bottom-left, top-right,
  bottom-right); the inverse of `assemble_quadrants`."""
  return multiformation.split(images, FACTOR, ORDER)


def expand(images: jax.Array) -> jax.Array:
  """The 4N images a partitioned set stands for: [N, H, W, C] -> [4N, H, W, C].

  Quadrant-major (all top-left quadrants first, as the reference), each quadrant upsampled x2
  bilinearly with half-pixel centres (PyTorch's align_corners=False; at the border the nearest
  pixel is repeated, the same as PyTorch's clamping).
  """
  return multiformation.decode(images, FACTOR, ORDER)


def expanded_set(
  images: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """(images, labels) of a class-blocked partitioned set, expanded class by class.

  Args:
    images: [K * ipc, H, W, C] stored images, class-blocked.
    labels: [K * ipc] their labels (ipc equal labels per class).
    num_classes: K.

  Returns:
    ([K * 4 * ipc, H, W, C], [K * 4 * ipc]), still class-blocked.
  """
  return multiformation.decode_classes(images, labels, num_classes, FACTOR, ORDER)


def partitioned_init(real: jax.Array) -> jax.Array:
  """Stored images from four real images each: [4, N, H, W, C] -> [N, H, W, C].

  real[q] fills quadrant q (top-left, bottom-left, top-right, bottom-right), downscaled by 2x2
  average pooling (not an antialiased resize).
  """
  return multiformation.mix_init(
    real.reshape(-1, *real.shape[2:]), real.shape[1], FACTOR, ORDER, 'mean'
  )


# ---------------------------------------------------------------------------------------------
# State, settings and the step.


@flax.struct.dataclass
class IDMState(base.DistillState):
  """A DM state plus the model queue. `images` are the stored (partitioned) images."""

  queue: ModelQueue


def _parse_steps(text: str) -> tuple[int, ...]:
  """'2000,5000' -> (2000, 5000); '' -> ()."""
  try:
    return tuple(sorted({int(item) for item in text.split(',') if item.strip()}))
  except ValueError:
    raise settings_lib.SettingError(
      'accuracy_restarts', text, 'must be comma-separated iterations, e.g. "2000,5000"'
    ) from None


@dataclasses.dataclass(frozen=True)
class IDMSettings(base.DistillSettings):
  """DM's settings plus IDM's (config section idm); `weights` act on the expanded images.

  Attributes:
    ce_weight: weight of the class-aware cross-entropy (times the accuracy in percent).
    accuracy_window: steps between restarts of the running training accuracies (used when
      `accuracy_restarts` is empty).
    accuracy_restarts: the steps at which the running accuracies restart (the reference resets
      them at its evaluation points); empty: every `accuracy_window` steps.
    queue_init: networks in the queue at the start.
    queue_capacity: most networks held.
    push_every: steps between pushes of a fresh network.
    train_nets: queue networks trained after each step.
    train_steps: SGD steps per trained network.
    queue_recipe: their SGD (config idm.train_batch_size, train_lr, train_momentum,
      train_weight_decay).
  """

  ce_weight: float = field(0.5, check=NON_NEGATIVE)
  accuracy_window: int = field(100, check=POSITIVE)
  accuracy_restarts: tuple[int, ...] = ()
  queue_init: int = field(3, check=POSITIVE)
  queue_capacity: int = field(100, check=POSITIVE)
  push_every: int = field(30, check=POSITIVE)
  train_nets: int = field(2, check=POSITIVE)
  train_steps: int = field(10, check=NON_NEGATIVE)
  queue_recipe: train_lib.OptimizerRecipe = train_lib.OptimizerRecipe()

  def check(self) -> None:
    super().check()
    if self.queue_init > self.queue_capacity:
      raise settings_lib.SettingError(
        'queue_init', self.queue_init, f'exceeds queue_capacity={self.queue_capacity}'
      )
    if self.num_nets != 1:
      raise settings_lib.SettingError(
        'num_nets', self.num_nets, 'but IDM matches one queue network per step; set it to 1'
      )
    if self.model.endswith('BN'):
      raise settings_lib.SettingError(
        'model',
        self.model,
        'has batch norm, but IDM takes one optimizer step per class, '
        'which batch statistics over all classes cannot serve (the reference raises too); '
        'choose a network without batch norm',
      )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **values: Any) -> IDMSettings:
    idm = config.idm
    base_settings = base.DistillSettings.from_config(config)
    common = {
      f.name: getattr(base_settings, f.name) for f in dataclasses.fields(base.DistillSettings)
    }
    try:
      restarts = _parse_steps(idm.accuracy_restarts)
    except settings_lib.SettingError as error:
      raise ValueError(
        f'config.idm.accuracy_restarts={idm.accuracy_restarts!r} {error.requirement}.'
      ) from None
    recipe = settings_lib.from_section(train_lib.OptimizerRecipe, idm, 'idm', prefix='train_')
    return settings_lib.from_section(
      cls,
      idm,
      'idm',
      value_paths={'num_nets': 'distill.num_nets', 'model': 'model.name'},
      **common,
      accuracy_restarts=restarts,
      queue_recipe=recipe,
      **values,
    )

  def restarts_accuracies(self, step: jax.Array) -> jax.Array:
    """Whether the step taken from state `step` first restarts the running accuracies."""
    if self.accuracy_restarts:
      return jnp.isin(step, jnp.asarray(self.accuracy_restarts))
    return (step > 0) & (step % self.accuracy_window == 0)


def init_idm_state(
  images: jax.Array,
  labels: jax.Array,
  net: models.Network,
  settings: IDMSettings,
  spec: base.DataSpec,
  seed: int,
) -> IDMState:
  """The state before the first step.

  Args:
    images: [K * ipc, H, W, C] initial stored images (normalised).
    labels: [K * ipc] class-blocked labels.
    net: the queue's architecture.
    settings: the step settings.
    spec: the dataset's class count and normalisation.
    seed: the run's seed: the steps take its 'distill' stream, the initial queue networks its
      'queue' stream.
  """
  state = base.init_state(
    images, labels, settings.image_optimizer(spec), keys_lib.run_key(seed, 'distill')
  )
  queue = init_queue(
    keys_lib.run_key(seed, 'queue'),
    net,
    state.images.shape[1:],
    settings.queue_capacity,
    settings.queue_init,
    settings.queue_recipe.optimizer(),
  )
  return IDMState(
    **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, queue=queue
  )


def make_idm_step(
  net: models.Network,
  settings: IDMSettings,
  spec: base.DataSpec,
  lowering: Lowering,
  extractor: extractors_lib.Extractor = extractors_lib.matching_net_extractor,
) -> base.Step:
  """Builds the IDM step `(state, sampler) -> (state, metrics)`; its jitted core traces once.

  Metrics: 'loss' (weighted total summed over classes), the unweighted sums 'match', 'cc', 'cm',
  'ce', the matching network's running training accuracy 'net_accuracy' (percent),
  'queue_size' and 'grad_norm' (norm of the stacked per-class gradients).
  """
  num_classes, ipc = spec.num_classes, settings.ipc
  optimizer = settings.image_optimizer(spec)
  network_optimizer = settings.queue_recipe.optimizer()
  augment = lambda k, x: augment_lib.augment(k, x, settings.strategy, siamese=True)

  def step(state: IDMState, sampler: data_lib.ClassSampler, extractor_params: Any):
    key = keys_lib.step_key(state.key, state.step)
    cc_key = keys_lib.centralization_keys(key, 1)[0]  # the host derives it the same way
    image_shape = state.images.shape[1:]
    queue = state.queue
    queue = jax.lax.cond(
      settings.restarts_accuracies(state.step), restart_accuracies, lambda q: q, queue
    )
    queue = jax.lax.cond(
      state.step % settings.push_every == 0,
      lambda q: push(q, keys_lib.stream(key, 'queue_push'), net, image_shape, network_optimizer),
      lambda q: q,
      queue,
    )
    slot = sample_member(queue, keys_lib.stream(key, 'queue_match'))
    variables = member(queue, slot)
    accuracy = training_accuracy(queue, slot)
    real_keys = jax.random.split(keys_lib.stream(key, 'real'), num_classes)
    class_keys = jax.random.split(keys_lib.stream(key, 'augment'), num_classes)
    if extractor.select is not None:  # the host selected for the one CC key of the step
      extractor_params = jax.tree_util.tree_map(lambda x: x[0], extractor_params)

    def class_loss(class_images, class_id):
      real = data_lib.sample_class(sampler, real_keys[class_id], class_id, settings.batch_real)
      real = data_lib.normalize(real, spec.mean, spec.std)
      real = jax.lax.stop_gradient(augment(class_keys[class_id], real))
      syn = augment(class_keys[class_id], expand(class_images))
      real_features, real_map = net.embed(variables, real)
      syn_features, syn_map, logits = net.embed_with_logits(variables, syn)
      cc_features = extractor.features(extractor_params, cc_key, syn, syn_features)
      cc_real_features = None
      if settings.weights.needs_real_cc_features:  # the scale-free CC forms' unit
        cc_real_features = extractor.features(extractor_params, cc_key, real, real_features)
      terms = losses.class_objective(
        real_features,
        real_map,
        syn_features,
        syn_map,
        settings.weights,
        cc_features,
        cc_real_features,
      )
      ce = train_lib.cross_entropy(logits, jnp.full((syn.shape[0],), class_id))
      total = terms.total + settings.ce_weight * accuracy * ce
      return total, {
        'loss': total,
        'match': terms.match,
        'cc': terms.cc,
        'cm': terms.cm,
        'ce': ce,
      }

    def class_grad(class_images, class_id):
      grad, aux = jax.grad(class_loss, has_aux=True)(class_images, class_id)
      return grad, (aux, jnp.sum(jnp.square(grad)))

    images, opt_state, (per_class, squared_norms) = class_steps.per_class_updates(
      state.images, state.opt_state, optimizer, num_classes, ipc, class_grad
    )
    slots, mask = pick_for_training(queue, keys_lib.stream(key, 'queue_pick'), settings.train_nets)
    queue = train_members(
      queue,
      slots,
      mask,
      keys_lib.stream(key, 'queue_train'),
      sampler,
      net,
      settings.queue_recipe,
      lowering,
      steps=settings.train_steps,
      mean=spec.mean,
      std=spec.std,
    )
    metrics = {name: jnp.sum(value) for name, value in per_class.items()}
    metrics.update(
      net_accuracy=accuracy,
      queue_size=queue.size().astype(jnp.float32),
      grad_norm=jnp.sqrt(jnp.sum(squared_norms)),
    )
    return state.replace(
      step=state.step + 1, images=images, opt_state=opt_state, queue=queue
    ), metrics

  @jax.jit
  def jitted_step(state: IDMState, sampler: data_lib.ClassSampler, extractor_params: Any):
    with lowering.precision_scope():
      return step(state, sampler, extractor_params)

  def arguments(state: IDMState, sampler: data_lib.ClassSampler):
    # e.g. a pool's drawn member, chosen on the host for the step's one CC key
    return state, sampler, extractor.step_params(state.key, state.step, 1)

  return base.Step(jitted=jitted_step, arguments=arguments)


class IDM(base.Method):
  """Improved distribution matching: partitioned images expanded 4x, a queue of partly trained
  matching networks, one optimizer step per class, a class-aware cross-entropy term."""

  name = 'idm'
  presets = base.Presets(
    image_lr=0.2,
    # The IID paper's IDM weights; its scale-free CC is not measured on IDM yet.
    iid={
      'reference': base.IIDSetting('squared', 0.01, 1.0, 0.03),
      'default': base.IIDSetting('squared', 0.01, 1.0, 0.03),
    },
  )

  def settings(self, config: ml_collections.ConfigDict) -> IDMSettings:
    return IDMSettings.from_config(config)

  def check_data(self, settings: IDMSettings, dataset: data_lib.Dataset) -> None:
    super().check_data(settings, dataset)
    height, width = dataset.image_shape[:2]
    if height % 2 or width % 2:
      raise ValueError(
        f'method=idm splits images into 2x2 quadrants; {dataset.name} images are '
        f'{height}x{width} (odd). Use --config.method=dm.'
      )
    smallest = int(np.min(dataset.train_class_counts()))
    if settings.init == 'real' and 4 * settings.ipc > smallest:
      raise ValueError(
        f'method=idm with distill.init=real fills each stored image with 4 real '
        f'images: config.ipc={settings.ipc} needs {4 * settings.ipc} per class, '
        f'but the smallest class of {dataset.name} has {smallest}; lower '
        '--config.ipc or use --config.distill.init=noise.'
      )
    if settings.queue_recipe.batch_size > len(dataset.train_labels):
      raise ValueError(
        f'config.idm.train_batch_size={settings.queue_recipe.batch_size} exceeds '
        f'the {len(dataset.train_labels)} training images of {dataset.name}.'
      )

  def initial_images(self, settings, dataset, key):
    labels = np.repeat(np.arange(dataset.num_classes), settings.ipc)
    if settings.init != 'real':
      return np.asarray(jax.random.normal(key, (len(labels), *dataset.image_shape))), labels
    # Each stored image: 4 distinct real images of its class, 2x2 average-pooled.
    indices = data_lib.random_real_subset(key, dataset.train_labels, 4 * settings.ipc)
    real = dataset.normalize(dataset.train_images[indices])
    real = real.reshape(dataset.num_classes, 4, settings.ipc, *dataset.image_shape)
    images = np.asarray(jax.vmap(partitioned_init)(real)).reshape(len(labels), *dataset.image_shape)
    return images, labels

  def init_state(self, settings, spec, images, labels, net, seed):
    return init_idm_state(images, labels, net, settings, spec, seed)

  def make_step(
    self, net, settings, spec, lowering, extractor=extractors_lib.matching_net_extractor, mesh=None
  ):
    if mesh is not None:
      raise ValueError(
        'IDM runs on one device (its per-class steps are sequential); set '
        '--config.distill.devices=1.'
      )
    return make_idm_step(net, settings, spec, lowering, extractor)

  def training_set(self, state: IDMState, num_classes: int) -> tuple[jax.Array, jax.Array]:
    return expanded_set(state.images, state.labels, num_classes)

  def stored_images(self, state: IDMState) -> jax.Array:
    return state.images

  def paper_preset(
    self, config: ml_collections.ConfigDict, dataset: str, ipc: int, with_iid: bool
  ) -> None:
    """The reference commands' IDM settings of (dataset, ipc) (`PAPER_SETTINGS`)."""
    if with_iid:
      # The IID paper's IDM script restarts the class-aware accuracies at its evaluation points.
      config.idm.accuracy_restarts = '2000,5000,10000,20000'
    (
      config.idm.ce_weight,
      config.distill.batch_real,
      config.idm.push_every,
      config.idm.train_steps,
      config.idm.accuracy_window,
    ) = PAPER_SETTINGS[(dataset, ipc)]


# (dataset, ipc) -> IDM settings of the reference commands: ce_weight, batch_real,
# push_every (net_generate_interval), train_steps (model_train_steps), accuracy_window (the
# reference's eval_interval, where the running accuracies restart). CIFAR-100 IPC 50 lists
# 10-40 train steps; 10 here.
PAPER_SETTINGS = {
  ('cifar10', 1): (0.5, 5000, 5, 10, 100),
  ('cifar10', 10): (0.5, 256, 30, 10, 100),
  ('cifar10', 50): (0.1, 256, 30, 10, 500),
  ('cifar100', 1): (0.5, 500, 5, 10, 100),
  ('cifar100', 10): (0.1, 256, 30, 50, 100),
  ('cifar100', 50): (0.1, 256, 30, 10, 500),
  ('tinyimagenet', 1): (0.5, 256, 30, 10, 100),
  ('tinyimagenet', 10): (0.5, 256, 30, 10, 500),
  ('tinyimagenet', 50): (0.8, 256, 30, 50, 1000),
}
# Not in the IDM paper: CIFAR-10's settings, except 256 real images per class at IPC 1 (CIFAR-10
# takes its whole class of 5000, more than SVHN's smallest class holds).
for _name in ('mnist', 'fashion_mnist', 'svhn'):
  for _ipc in (1, 10, 50):
    PAPER_SETTINGS[(_name, _ipc)] = PAPER_SETTINGS[('cifar10', _ipc)]
  PAPER_SETTINGS[(_name, 1)] = (0.5, 256, 5, 10, 100)

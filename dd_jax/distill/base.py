"""What every distillation method shares: settings, state, the step object, the method interface.

A method (DM, IDM, ...) is a `Method` registered by name in `dd_jax.distill.methods`. The run,
the presets and the comparison table see only this interface:

    method = methods.get(config.method)
    method.presets                                      # reference image lr, IID settings
    settings = method.settings(config)                  # checked; names config fields
    method.check_data(settings, dataset)                # before any work
    net = method.network(settings, num_classes, lowering)
    images, labels = method.initial_images(settings, dataset, run_key(seed, 'init'))
    spec = DataSpec.of(dataset)                         # class count, shape, normalisation
    state = method.init_state(settings, spec, images, labels, net, seed)  # keys: run streams
    step = method.make_step(net, settings, spec, lowering, extractor, mesh)
    state, metrics = step(state, sampler)               # jitted core, traces once
    images, labels = method.training_set(state, num_classes)   # what evaluation trains on
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dd_jax import data as data_lib
from dd_jax import extractors as extractors_lib
from dd_jax import keys as keys_lib
from dd_jax import losses, models
from dd_jax import settings as settings_lib
from dd_jax import train as train_lib
from dd_jax.lowering import Lowering
from dd_jax.settings import NON_NEGATIVE, POSITIVE, field

SYNTHETIC_INITS = ('real', 'noise')
IMAGE_OPTIMIZERS = ('sgd', 'adamw')
# Where the image optimizer steps: on the stored normalised images (DM's and IDM's codes) or on
# their [0, 1] pixels (the IDC family's codes; `in_pixel_space`).
IMAGE_SPACES = ('normalized', 'pixel')
# The named IID settings every method declares (config strings: iid=<name>).
# 'reference': the IID code's (Deng et al., CVPR 2024), for CC on a pretrained ResNet18 pool.
# 'default': dd_jax's, chosen on validation data (experiments/results/iid_scale_free.md).
IID_SETTING_NAMES = ('reference', 'default')


class IIDSetting(NamedTuple):
  """The constraints of an IID variant: CC's form, weight and tau (threshold form), CM's weight."""

  cc_form: str
  cc_weight: float
  cc_tau: float
  cm_weight: float


@dataclasses.dataclass(frozen=True)
class Presets:
  """What the presets (`dd_jax.presets`, configs/) need to know of a method.

  Attributes:
    image_lr: the reference learning rate of the synthetic images (in the units of the
      method's `distill.image_space`).
    iid: the method's IID setting of each name of IID_SETTING_NAMES.
    config: other config fields the method's reference sets, by dotted path (e.g.
      {'distill.init': 'mix'}); a preset of the method applies them.
    protocol: the evaluation protocol of the method's published numbers (`dd_jax.protocols`);
      configs/paper.py evaluates with it at the paper budget.
  """

  image_lr: float
  iid: Mapping[str, IIDSetting]
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  protocol: str = 'dm'

  def check(self, method: str) -> None:
    """Raises ValueError unless every field is usable, naming the method and what is missing."""
    missing = [name for name in IID_SETTING_NAMES if name not in self.iid]
    if missing or not self.image_lr > 0:
      raise ValueError(
        f'Method {method!r} declares incomplete presets: it needs image_lr > 0 (has '
        f'{self.image_lr!r}) and IID settings named {list(IID_SETTING_NAMES)} (missing '
        f'{missing}); set them in its `presets` class attribute (see dd_jax.distill.base.Presets).'
      )


@flax.struct.dataclass
class DistillState:
  """Everything a distillation run carries from step to step (and checkpoints).

  Attributes:
    step: number of optimizer steps taken.
    images: [K * ipc, H, W, C] synthetic (stored) images in normalised space, class-blocked.
    labels: [K * ipc] fixed labels (0, ..., 0, 1, ..., K - 1).
    opt_state: the optax state of `images`.
    key: raw PRNG key data of the run's 'distill' stream; the step taken from a state with
      `step == t` uses `keys.step_key(key, t)`, so a resumed run draws exactly what an
      uninterrupted one would.
  """

  step: jax.Array
  images: jax.Array
  labels: jax.Array
  opt_state: optax.OptState
  key: jax.Array


def init_state(
  images: jax.Array, labels: jax.Array, optimizer: optax.GradientTransformation, key: jax.Array
) -> DistillState:
  """The state before the first step. `key` is a typed PRNG key."""
  images = jnp.asarray(images, jnp.float32)
  return DistillState(
    step=jnp.zeros((), jnp.int32),
    images=images,
    labels=jnp.asarray(labels, jnp.int32),
    opt_state=optimizer.init(images),
    key=jax.random.key_data(key),
  )


@dataclasses.dataclass(frozen=True)
class Step:
  """A distillation step: `step(state, sampler) -> (state, metrics)`.

  Attributes:
    jitted: the compiled core `(state, sampler, extractor_params) -> (state, metrics)`; traces
      once per run (exposed to lower it for FLOPs and memory, or to count its traces).
    arguments: `(state, sampler) -> (state, sampler, extractor_params)`, the host-side work
      before each call (e.g. drawing the pool members the step's keys choose, placing arguments
      on a mesh).
  """

  jitted: Callable[..., tuple[Any, dict[str, jax.Array]]]
  arguments: Callable[[Any, data_lib.ClassSampler], tuple[Any, ...]]

  def __call__(
    self, state: Any, sampler: data_lib.ClassSampler
  ) -> tuple[Any, dict[str, jax.Array]]:
    return self.jitted(*self.arguments(state, sampler))


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a step needs to know of the dataset (not its arrays).

  Attributes:
    num_classes: K.
    image_shape: (H, W, C).
    mean: per-channel normalisation mean ([0, 1] pixel units).
    std: per-channel normalisation std ([0, 1] pixel units).
  """

  num_classes: int
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def of(cls, dataset: data_lib.Dataset) -> DataSpec:
    return cls(
      num_classes=dataset.num_classes,
      image_shape=tuple(dataset.image_shape),
      mean=tuple(dataset.mean),
      std=tuple(dataset.std),
    )


def objective_weights(config: ml_collections.ConfigDict) -> losses.ObjectiveWeights:
  """The loss weights of config.constraints, checked (messages name the config field)."""
  cc, cm = config.constraints.cc, config.constraints.cm
  for path, value in (('cc.weight', cc.weight), ('cm.weight', cm.weight), ('cc.tau', cc.tau)):
    if value < 0:
      raise ValueError(f'config.constraints.{path}={value!r} must be >= 0.')
  for path, value, choices in (
    ('cc.form', cc.form, losses.CC_FORMS),
    ('cm.grouping', cm.grouping, losses.GROUPINGS),
  ):
    if value not in choices:
      raise ValueError(
        f'config.constraints.{path}={value!r} is not valid; choose one of {list(choices)}.'
      )
  return losses.ObjectiveWeights(
    cc=float(cc.weight),
    cm=float(cm.weight),
    cc_form=cc.form,
    cc_alpha=float(cc.alpha),
    cc_beta=float(cc.beta),
    cc_tau=float(cc.tau),
    cm_grouping=cm.grouping,
  )


# Fields of DistillSettings read from outside config.distill, and their config paths.
_OUTSIDE_DISTILL = {
  'ipc': 'ipc',
  'model': 'model.name',
  'strategy': 'augment.strategy',
  'extractor': 'constraints.cc.extractor',
}


@dataclasses.dataclass(frozen=True)
class DistillSettings(settings_lib.Settings):
  """Settings every method's step and run share (config.distill, plus ipc, model.name,
  augment.strategy and config.constraints).

  Attributes:
    ipc: synthetic (stored) images per class.
    model: registry name of the matching network.
    strategy: DSA strategy of the siamese augmentation ('' or 'none' disables it).
    extractor: whose features class centralization acts on ('matching_net' or 'pool').
    weights: loss weights and options (config.constraints).
    iterations: optimizer steps.
    batch_real: real images per class and step.
    init: initial synthetic images: 'real' (a random real subset) or 'noise'.
    optimizer: the image optimizer: 'sgd' (with momentum) or 'adamw' (PyTorch's defaults:
      betas 0.9 / 0.999, eps 1e-8; NCFM).
    lr: the image optimizer's learning rate, in the units of `image_space`.
    momentum: SGD's momentum.
    weight_decay: the image optimizer's weight decay (SGD: added to the gradient, as PyTorch;
      AdamW: decoupled).
    image_space: what the image optimizer steps: 'normalized' (the stored images, as DM's and
      IDM's codes) or 'pixel' (their [0, 1] pixels, as the IDC family's codes; `in_pixel_space`).
    num_nets: random networks matched per step (losses averaged over them).
    devices: devices the DM step splits classes (and networks) across; 0 = all.
    real_chunk: real images embedded at once (0: automatic); results do not depend on it.
    syn_chunk: synthetic images embedded at once, no batch norm (0: automatic); results do not
      depend on it.
    eval_every: steps between evaluations (the last step is always evaluated).
    checkpoint_every: steps between checkpoints.
    log_every: steps between progress lines; divides eval_every and checkpoint_every, so a
      resumed run re-logs identical lines.
  """

  ipc: int = field(10, check=POSITIVE)
  model: str = field('ConvNet', choices=models.network_names)
  strategy: str = 'color_crop_cutout_flip_scale_rotate'
  extractor: str = field('matching_net', choices=extractors_lib.NAMES)
  weights: losses.ObjectiveWeights = losses.ObjectiveWeights()
  iterations: int = field(20_000, check=POSITIVE)
  batch_real: int = field(256, check=POSITIVE)
  init: str = field('real', choices=SYNTHETIC_INITS)
  optimizer: str = field('sgd', choices=IMAGE_OPTIMIZERS)
  lr: float = field(1.0, check=POSITIVE)
  momentum: float = field(0.5, check=NON_NEGATIVE)
  weight_decay: float = field(0.0, check=NON_NEGATIVE)
  image_space: str = field('normalized', choices=IMAGE_SPACES)
  num_nets: int = field(1, check=POSITIVE)
  devices: int = field(0, check=NON_NEGATIVE)
  real_chunk: int = field(0, check=NON_NEGATIVE)
  syn_chunk: int = field(0, check=NON_NEGATIVE)
  eval_every: int = field(2_000, check=POSITIVE)
  checkpoint_every: int = field(500, check=POSITIVE)
  log_every: int = field(100, check=POSITIVE)

  def check_strategy(self) -> None:
    """Refuses a `strategy` the method's augmentation cannot run (DM's DSA here)."""
    train_lib.check_augment_strategy(self.strategy, 'strategy')

  def check(self) -> None:
    self.check_strategy()
    for name in ('checkpoint_every', 'eval_every'):
      if getattr(self, name) % self.log_every:
        raise settings_lib.SettingError(
          name, getattr(self, name), f'must be a multiple of log_every={self.log_every}'
        )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **values: Any) -> DistillSettings:
    """The settings of `config` (sections distill, constraints; ipc, model.name,
    augment.strategy), plus `values` (a subclass's own fields)."""
    return settings_lib.from_section(
      cls,
      config.distill,
      'distill',
      value_paths=_OUTSIDE_DISTILL,
      **{
        'ipc': config.ipc,
        'model': config.model.name,
        'strategy': config.augment.strategy,
        'extractor': config.constraints.cc.extractor,
        'weights': objective_weights(config),
        **values,
      },
    )

  def image_optimizer(self, spec: DataSpec) -> optax.GradientTransformation:
    """The optimizer of the stored (normalised) synthetic images: `optimizer` with `lr`,
    `momentum` and `weight_decay`, stepping them or their pixels (`image_space`)."""
    if self.optimizer == 'adamw':
      optimizer = optax.adamw(self.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=self.weight_decay)
    else:
      optimizer = optax.sgd(self.lr, momentum=self.momentum)
      if self.weight_decay:
        optimizer = optax.chain(optax.add_decayed_weights(self.weight_decay), optimizer)
    if self.image_space == 'pixel':
      return in_pixel_space(optimizer, spec.mean, spec.std)
    return optimizer


def in_pixel_space(
  optimizer: optax.GradientTransformation, mean: Any, std: Any
) -> optax.GradientTransformation:
  """`optimizer` stepping the pixels x = std * z + mean of normalised images z.

  The IDC family's codes keep their synthetic images in [0, 1] and normalise them inside the
  augmentation, so their learning rates are in pixel units; dd_jax stores the images normalised.
  The pixel gradient is g_z / std and a pixel update u_x moves z by u_x / std: SGD at lr on the
  pixels is SGD at lr / std^2 on z, Adam's pixel step is std times Adam's step on z, and weight
  decay pulls the pixels (not z) towards 0. Exact for any optax optimizer.

  Args:
    optimizer: the optimizer of the pixel images.
    mean: C floats, the per-channel normalisation mean (pixel units).
    std: C floats, the per-channel normalisation std.

  Returns:
    The transformation of normalised images [..., C] (channels last); its state is `optimizer`'s
    state of the pixel images.
  """

  def per_channel(tree, fn):
    return jax.tree.map(
      lambda x: fn(x, jnp.asarray(mean, x.dtype), jnp.asarray(std, x.dtype)), tree
    )

  def to_pixels(images):
    return per_channel(images, lambda z, m, s: z * s + m)

  def init(params):
    return optimizer.init(to_pixels(params))

  def update(updates, state, params=None):
    pixel_grads = per_channel(updates, lambda g, m, s: g / s)
    pixels = None if params is None else to_pixels(params)
    pixel_updates, state = optimizer.update(pixel_grads, state, pixels)
    return per_channel(pixel_updates, lambda u, m, s: u / s), state

  return optax.GradientTransformation(init, update)


def check_batch_real(settings: DistillSettings, dataset: data_lib.Dataset) -> None:
  """Real images are drawn per class without replacement: batch_real must fit every class."""
  smallest = int(np.min(dataset.train_class_counts()))
  if settings.batch_real > smallest:
    raise ValueError(
      f'config.distill.batch_real={settings.batch_real} is larger than the '
      f'smallest class of {dataset.name} ({smallest} training images); real images '
      f'are drawn without replacement, so set --config.distill.batch_real<='
      f'{smallest}.'
    )


class Method(abc.ABC):
  """A distillation method, registered by name in `dd_jax.distill.methods`.

  Attributes:
    name: the registry name (`config.method`).
    presets: the reference image lr and IID settings presets give the method.
    supports_mesh: whether `make_step` can split its work over a device mesh.
    uses_pool: whether the method's step takes networks of the pretrained pool (config.pool):
      the run then builds (or loads) it and passes `make_step(..., pool=<pool_lib.Pool>)`.
  """

  name: ClassVar[str]
  presets: ClassVar[Presets]
  supports_mesh: ClassVar[bool] = False
  uses_pool: ClassVar[bool] = False

  @abc.abstractmethod
  def settings(self, config: ml_collections.ConfigDict) -> DistillSettings:
    """The method's settings from `config`; raises ValueError naming the field and the fix."""

  def check_data(self, settings: DistillSettings, dataset: data_lib.Dataset) -> None:
    """Data-dependent checks, before any work; raises ValueError naming the field and the fix."""
    data_lib.check_ipc(dataset, settings.ipc)
    check_batch_real(settings, dataset)

  def network(
    self, settings: DistillSettings, num_classes: int, lowering: Lowering
  ) -> models.Network:
    """The matching network's architecture (trained networks' convolutions by default)."""
    return models.get_network(settings.model, num_classes, conv=lowering.train_conv)

  @abc.abstractmethod
  def initial_images(
    self, settings: DistillSettings, dataset: data_lib.Dataset, key: jax.Array
  ) -> tuple[np.ndarray, np.ndarray]:
    """Class-blocked initial stored images (normalised) and their labels."""

  def init_state(
    self,
    settings: DistillSettings,
    spec: DataSpec,
    images: np.ndarray,
    labels: np.ndarray,
    net: models.Network,
    seed: int,
  ) -> Any:
    """The state before the first step (a `DistillState` or a subclass); its keys come from the
    run streams of `seed` (`keys.run_key`), the steps' from 'distill'."""
    del net
    return init_state(
      images, labels, settings.image_optimizer(spec), keys_lib.run_key(seed, 'distill')
    )

  @abc.abstractmethod
  def make_step(
    self,
    net: models.Network,
    settings: DistillSettings,
    spec: DataSpec,
    lowering: Lowering,
    extractor: extractors_lib.Extractor = extractors_lib.matching_net_extractor,
    mesh: jax.sharding.Mesh | None = None,
  ) -> Step:
    """The jitted step."""

  def training_set(self, state: Any, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """What evaluation trains on and synthetic.npz holds: (images [N, H, W, C], labels [N])."""
    del num_classes
    return state.images, state.labels

  def stored_images(self, state: Any) -> jax.Array | None:
    """The stored images when they differ from `training_set` (exported beside it), else None."""
    del state
    return None

  def paper_preset(
    self, config: ml_collections.ConfigDict, dataset: str, ipc: int, with_iid: bool
  ) -> None:
    """Sets the method's own settings of its paper for (dataset, IPC) (configs/paper.py), and
    those of the IID paper's script for it when `with_iid`; none by default."""
    del config, dataset, ipc, with_iid

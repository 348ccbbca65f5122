"""The IDC family's distillation step (M3D, DANCE; the engine NCFM and DSDM build on), generic over
the matching term and the networks matched with.

The official codes of the IDC family (Kim et al., ICML 2022) and of the methods built on it share
one iteration, which `make_family_step` computes:

  1. the stored images are clipped to the pixel range (every iteration, as the codes clamp S);
  2. the iteration's networks come from the method's `NetworkSource`: M3D a fresh random network
     every `network_every` iterations, DANCE a pretrained pool member interpolated between its
     initial and final weights (the final weights being the "expert" of the calibration pass);
  3. every class draws `batch_real` real images and one IDC DiffAug parameter set
     (`augment.idc`, batch mode), shared by its real images and its decoded synthetic images;
     the real features of all classes come first (they do not depend on the images);
  4. the match pass: per class, the matching term (plus the IID constraints, by weight) between
     the real features and those of the class's stored images decoded by multi-formation
     (`multiformation.decode`, factor f: each stored image stands for f * f images), then one
     optimizer step on the whole stored tensor (`class_steps`; 'joint': one summed step);
  5. `calibration_passes` calibration passes (DANCE): per class, the expert's cross-entropy on a
     fresh augmentation of the class's decoded images, as its own optimizer step.

Synthetic images are stored normalised (dd_jax's convention); the codes keep them in [0, 1] and
normalise inside the augmentation, which is the same computation (decode, clipping and the
augmentation's zero fill commute with per-channel normalisation as they are written here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dd_jax import data as data_lib
from dd_jax import extractors as extractors_lib
from dd_jax import keys as keys_lib
from dd_jax import losses, models, multiformation
from dd_jax import settings as settings_lib
from dd_jax import train as train_lib
from dd_jax.augment import idc
from dd_jax.distill import base, class_steps, dm
from dd_jax.lowering import Lowering
from dd_jax.settings import NON_NEGATIVE, POSITIVE, field

FAMILY_INITS = ('mix', 'real', 'noise')

# No published code applies IID to the family's methods: they take DM's IID settings ('reference':
# the IID code's constraints on DM; 'default': the scale-free CC, a fraction of the matching term
# whatever its scale, and DM's CM weight, not tuned for these losses).
DM_IID_SETTINGS = dm.DM.presets.iid


# `FamilySettings.class_gradients` (its field `class_steps` hides the module in the class body).
_CLASS_GRADIENTS = class_steps.GRADIENTS


@dataclasses.dataclass(frozen=True)
class FamilySettings(base.DistillSettings):
  """DM's settings plus the IDC family's (config section `family`).

  `strategy` (config.augment.strategy) is IDC's DiffAug strategy here (`augment.idc`: e.g.
  'color_crop_cutout', every listed op applied, one geometric op drawn), not DM's DSA.

  Attributes:
    init: 'mix' (each stored image tiles f * f downsampled real images: the class's first
      f * f * ipc training images, as the codes), 'real' (ipc random real images) or 'noise'.
    factor: multi-formation factor f (1: none).
    class_steps: 'per_class' (one optimizer step per class, the codes) or 'joint' (one summed
      step per iteration: faster, not faithful).
    class_gradients: 'per_class' only: 'together' (every class's gradient in one batched pass,
      the same steps to float rounding: `class_steps.per_class_updates`), 'one_by_one' (one
      pass per class step, as the codes compute them) or 'auto' (the lowering's: one by one
      where it loops over classes, on CPU; together on accelerators).
    network_every: iterations one random matching network serves (M3D's `ipm`).
    calibration_passes: DANCE's calibration passes per iteration (0: none).
    pool_members: pool members an iteration draws its network from (DANCE's `num_premodel`).
  """

  init: str = field('mix', choices=FAMILY_INITS)
  factor: int = field(2, check=POSITIVE)
  class_steps: str = field('per_class', choices=class_steps.MODES)
  class_gradients: str = field('auto', choices=('auto', *_CLASS_GRADIENTS))
  network_every: int = field(1, check=POSITIVE)
  calibration_passes: int = field(0, check=NON_NEGATIVE)
  pool_members: int = field(5, check=POSITIVE)

  def check_strategy(self) -> None:
    idc.parse_strategy(self.strategy, 'strategy')

  def check(self) -> None:
    super().check()
    if self.model.endswith('BN'):
      raise settings_lib.SettingError(
        'model',
        self.model,
        'has batch norm, but the IDC family takes one optimizer step per class, which batch '
        'statistics over all classes cannot serve; choose a network without batch norm',
      )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **values: Any) -> FamilySettings:
    # DM's fields, without DM's checks of the two the family reads differently.
    common = base.DistillSettings.from_config(config, init='real', strategy='none')
    fields = {f.name: getattr(common, f.name) for f in dataclasses.fields(base.DistillSettings)}
    del fields['init'], fields['strategy']
    return settings_lib.from_section(
      cls,
      config.family,
      'family',
      value_paths={'init': 'distill.init', 'model': 'model.name', 'strategy': 'augment.strategy'},
      **fields,
      init=config.distill.init,
      strategy=config.augment.strategy,
      **values,
    )

  def decoded_per_class(self) -> int:
    return self.factor * self.factor * self.ipc


@flax.struct.dataclass
class FamilyState(base.DistillState):
  """A DM state whose `images` are the stored images of multi-formation factor `factor`."""

  factor: int = flax.struct.field(pytree_node=False, default=1)


class Networks(NamedTuple):
  """The networks of one iteration: the matching network's variables, and the expert's (the
  calibration pass's classifier) or None."""

  matching: Any
  expert: Any = None


# (state key data, state step, the source's parameters) -> Networks; called inside the jitted
# step. The parameters (e.g. a pool's members) are a jit argument, never a constant.
NetworkSource = Callable[[jax.Array, jax.Array, Any], Networks]


def random_networks(net: models.Network, image_shape: tuple[int, ...], every: int) -> NetworkSource:
  """A freshly initialised network, the same for `every` consecutive iterations (M3D's `ipm`;
  every=1: a new one per iteration, as DM).

  The network of iteration t comes from the 'networks' stream of the first iteration of its
  block (t - t mod every), so a resumed run draws the same networks.
  """

  def source(key_data, step, params):
    del params
    block_start = step - step % every
    key = keys_lib.stream(keys_lib.step_key(key_data, block_start), 'networks')
    return Networks(matching=net.init(key, (1, *image_shape)))

  return source


def clip_to_pixels(images: jax.Array, mean, std) -> jax.Array:
  """Normalised images clipped to the pixel range [0, 1] (the codes clamp S each iteration)."""
  mean, std = jnp.asarray(mean, images.dtype), jnp.asarray(std, images.dtype)
  return jnp.clip(images, -mean / std, (1.0 - mean) / std)


def augmentation_params(
  key: jax.Array, num_classes: int, strategy: str, height: int, width: int
) -> idc.Params:
  """One IDC DiffAug parameter set per class (batch mode), from `key` split by class: each
  field has a leading class axis. Class c's set serves its real and its synthetic images."""
  draw = lambda class_key: idc.sample_params(class_key, strategy, height, width)
  return jax.vmap(draw)(jax.random.split(key, num_classes))


def _augment_classes(params: idc.Params, images: jax.Array, strategy: str, loop: bool):
  """`idc.apply` of class k's parameters to images[k], for every class ([K, n, H, W, C])."""
  apply = lambda p, x: idc.apply(x, p, strategy)
  if loop:
    return jax.lax.map(lambda pair: apply(*pair), (params, images))
  return jax.vmap(apply)(params, images)


def make_family_step(
  net: models.Network,
  settings: FamilySettings,
  spec: base.DataSpec,
  lowering: Lowering,
  networks: NetworkSource,
  extractor: extractors_lib.Extractor = extractors_lib.matching_net_extractor,
  match: losses.MatchFn = losses.mean_matching,
  network_params: Any = None,
) -> base.Step:
  """Builds the IDC-family step `(state, sampler) -> (state, metrics)`; it traces once.

  Args:
    net: the matching network's architecture.
    settings: the family settings.
    spec: the dataset's class count, image shape and normalisation.
    lowering: the platform's programs (real chunks, class loops, precision).
    networks: the iteration's networks (`random_networks`, a pool's interpolation, ...).
    extractor: where class centralization takes its features.
    match: the matching term of each class (M3D: an MMD; DANCE: `losses.mean_matching`).
    network_params: what `networks` takes (e.g. a pool's members, on the host), passed to the
      jitted step as an argument.

  Returns:
    The step. Metrics: 'loss' (the match pass's weighted total), the unweighted 'match', 'cc',
    'cm' and 'calibration' (the calibration passes' cross-entropy), each summed over classes,
    and 'grad_norm' (of the match pass's class gradients).
  """
  num_classes, ipc, batch_real = spec.num_classes, settings.ipc, settings.batch_real
  image_shape = tuple(spec.image_shape)
  height, width = image_shape[:2]
  strategy, factor = settings.strategy, settings.factor
  optimizer = settings.image_optimizer()
  gradients = settings.class_gradients
  if gradients == 'auto':
    gradients = 'one_by_one' if lowering.loop_classes else 'together'
  update = class_steps.class_updates(settings.class_steps, gradients)
  real_chunk = dm.resolve_real_chunk(settings, num_classes, lowering)
  draw_params = lambda key: augmentation_params(key, num_classes, strategy, height, width)
  decode = lambda class_images: multiformation.decode(class_images, factor)
  class_params = lambda params, c: jax.tree_util.tree_map(lambda x: x[c], params)

  def step(state: base.DistillState, sampler, extractor_params, source_params):
    key = keys_lib.step_key(state.key, state.step)
    cc_key = keys_lib.centralization_keys(key, 1)[0]  # the host derives it the same way
    if extractor.select is not None:  # the host selected for the one CC key of the step
      extractor_params = jax.tree_util.tree_map(lambda x: x[0], extractor_params)
    variables, expert = networks(state.key, state.step, source_params)
    images = clip_to_pixels(state.images, spec.mean, spec.std)

    real = data_lib.sample_all_classes(sampler, keys_lib.stream(key, 'real'), batch_real)
    real = data_lib.normalize(real, spec.mean, spec.std)
    params = draw_params(keys_lib.stream(key, 'augment'))
    real = jax.lax.stop_gradient(_augment_classes(params, real, strategy, lowering.loop_classes))
    real_features, real_map = dm.embed_real(net, variables, real, real_chunk)
    cc_real_features = None
    if settings.weights.needs_real_cc_features:  # the scale-free CC forms' unit
      flat = lambda x: x.reshape(num_classes * batch_real, *x.shape[2:])
      cc_real_features = extractor.features(
        extractor_params, cc_key, flat(real), flat(real_features)
      ).reshape(num_classes, batch_real, -1)

    def match_loss(class_images, class_id):
      syn = idc.apply(decode(class_images), class_params(params, class_id), strategy)
      syn_features, syn_map = net.embed(variables, syn)
      terms = losses.class_objective(
        real_features[class_id],
        real_map[class_id],
        syn_features,
        syn_map,
        settings.weights,
        extractor.features(extractor_params, cc_key, syn, syn_features),
        None if cc_real_features is None else cc_real_features[class_id],
        match=match,
      )
      return terms.total, terms

    def match_grad(class_images, class_id):
      grad, terms = jax.grad(match_loss, has_aux=True)(class_images, class_id)
      return grad, (terms, jnp.sum(jnp.square(grad)))

    images, opt_state, (terms, squared_norms) = update(
      images, state.opt_state, optimizer, num_classes, ipc, match_grad
    )
    metrics = {
      'loss': jnp.sum(terms.total),
      'match': jnp.sum(terms.match),
      'cc': jnp.sum(terms.cc),
      'cm': jnp.sum(terms.cm),
      'grad_norm': jnp.sqrt(jnp.sum(squared_norms)),
    }

    calibration = jnp.zeros(())
    for calibration_pass in range(settings.calibration_passes):
      pass_key = jax.random.fold_in(keys_lib.stream(key, 'calibrate'), calibration_pass)
      fresh = draw_params(pass_key)

      def calibration_grad(class_images, class_id, fresh=fresh):
        def loss(x):
          syn = idc.apply(decode(x), class_params(fresh, class_id), strategy)
          logits = net.apply(expert, syn)
          return train_lib.cross_entropy(logits, jnp.full((syn.shape[0],), class_id))

        value, grad = jax.value_and_grad(loss)(class_images)
        return grad, value

      images, opt_state, ce = update(
        images, opt_state, optimizer, num_classes, ipc, calibration_grad
      )
      calibration = calibration + jnp.sum(ce)
    if settings.calibration_passes:
      metrics['calibration'] = calibration
    return state.replace(step=state.step + 1, images=images, opt_state=opt_state), metrics

  @jax.jit
  def jitted_step(state, sampler, extractor_params, source_params):
    with lowering.precision_scope():
      return step(state, sampler, extractor_params, source_params)

  def arguments(state: base.DistillState, sampler: data_lib.ClassSampler):
    return state, sampler, extractor.step_params(state.key, state.step, 1), network_params

  return base.Step(jitted=jitted_step, arguments=arguments)


def first_images_per_class(dataset: data_lib.Dataset, count: int) -> np.ndarray:
  """The first `count` training images of every class, class-blocked, normalised ([K, count,
  H, W, C]): the codes' deterministic `class_sample(c, n)` of the "mix" initialisation."""
  labels = np.asarray(dataset.train_labels)
  indices = [np.flatnonzero(labels == c)[:count] for c in range(dataset.num_classes)]
  return np.asarray(dataset.normalize(dataset.train_images[np.stack(indices)]))


class FamilyMethod(base.Method):
  """A method of the IDC family: its settings, multi-formation and the family step. A subclass
  gives its name, presets, matching term and network source (`make_step`)."""

  def settings(self, config: ml_collections.ConfigDict) -> FamilySettings:
    return FamilySettings.from_config(config)

  def check_data(self, settings: FamilySettings, dataset: data_lib.Dataset) -> None:
    super().check_data(settings, dataset)
    height, width = dataset.image_shape[:2]
    if height % settings.factor or width % settings.factor:
      raise ValueError(
        f'config.family.factor={settings.factor} cuts each stored image into factor x factor '
        f'crops, but {dataset.name} images are {height}x{width}; choose a factor dividing both.'
      )
    if settings.init == 'mix':
      data_lib.check_ipc(dataset, settings.decoded_per_class())

  def initial_images(self, settings, dataset, key):
    labels = np.repeat(np.arange(dataset.num_classes), settings.ipc)
    if settings.init == 'mix':
      real = first_images_per_class(dataset, settings.decoded_per_class())
      mix = jax.vmap(lambda x: multiformation.mix_init(x, settings.ipc, settings.factor))
      return np.asarray(mix(real)).reshape(len(labels), *dataset.image_shape), labels
    if settings.init == 'real':
      return dm.random_real_images(dataset, settings.ipc, key), labels
    return np.asarray(jax.random.normal(key, (len(labels), *dataset.image_shape))), labels

  def init_state(self, settings, images, labels, net, seed):
    state = super().init_state(settings, images, labels, net, seed)
    return FamilyState(
      **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
      factor=settings.factor,
    )

  def training_set(self, state: FamilyState, num_classes: int) -> tuple[jax.Array, jax.Array]:
    return multiformation.decode_classes(state.images, state.labels, num_classes, state.factor)

  def stored_images(self, state: FamilyState) -> jax.Array | None:
    return state.images if state.factor > 1 else None

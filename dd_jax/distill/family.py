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
     fresh augmentation of the class's decoded images, as its own optimizer step;
  6. the matcher's state moves on (`Matcher.after_classes`: DSDM's class prototypes) and, with
     `plateau_factor`, the image learning rate follows the iteration's loss (NCFM).

A method's matching term is a `Matcher`: a plain `MatchFn` of the two feature sets (M3D, DANCE),
or a term with draws of its own per class step (NCFM's frequencies), a state carried across
iterations (DSDM's prototypes) and parameters trained by ascent from class step to class step
(NCFM's sampling network).

Synthetic images are stored normalised (dd_jax's convention); the codes keep them in [0, 1] and
normalise inside the augmentation. Decode, clipping and the augmentation's zero fill commute with
per-channel normalisation as they are written here; the optimizer step does not, so the family
steps the images' pixels (`distill.image_space='pixel'`, `base.in_pixel_space`) and its learning
rates are the codes'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
from dd_jax import losses, models, multiformation
from dd_jax import pool as pool_lib
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


# What every method of the family shares: the codes' "mix" initialisation, image steps on the
# [0, 1] pixels, IDC's DiffAug and factor-2 multi-formation.
IDC_STEP = {
  'distill.init': 'mix',
  'distill.image_space': 'pixel',
  'augment.strategy': 'color_crop_cutout',
  'family.factor': 2,
}


# The IDC family's pool recipe (DANCE's official pretraining; NCFM's differs only in its batch of
# 128): ConvNets, SGD 0.01 / 0.9 / 5e-4 (config.pool's defaults), batch 64, the lr x 0.2 at 2/3
# and 5/6 of the epochs, IDC's DiffAug (colour, crop; per image), CutMix with probability 0.5.
# The reduced budgets (budget=cpu, configs/digits.py) give it to every pooled method, so they
# share one cached pool.
POOL_RECIPE = {
  'pool.model': 'ConvNet',
  'pool.batch_size': 64,
  'pool.schedule': 'multistep',
  'pool.milestones': (2 / 3, 5 / 6),
  'pool.gamma': 0.2,
  'pool.augment_strategy': 'color_crop',
  'pool.augment_mode': 'idc',
  'pool.cutmix_probability': 0.5,
}


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
    fixed_real: match every class against its first `batch_real` training images at every
      iteration (NCFM's code) instead of a fresh random draw.
    plateau_factor: > 0: the image learning rate is multiplied by it when the iteration loss
      (match and calibration, per class) has not improved for more than `plateau_patience`
      iterations (PyTorch's ReduceLROnPlateau, NCFM); 0: a constant learning rate.
    plateau_patience: see plateau_factor.
  """

  init: str = field('mix', choices=FAMILY_INITS)
  factor: int = field(2, check=POSITIVE)
  class_steps: str = field('per_class', choices=class_steps.MODES)
  class_gradients: str = field('auto', choices=('auto', *_CLASS_GRADIENTS))
  network_every: int = field(1, check=POSITIVE)
  calibration_passes: int = field(0, check=NON_NEGATIVE)
  pool_members: int = field(5, check=POSITIVE)
  fixed_real: bool = False
  plateau_factor: float = field(0.0, check=NON_NEGATIVE)
  plateau_patience: int = field(500, check=NON_NEGATIVE)
  # A method's own config section and the fields a subclass reads from it (NCFM's 'ncfm').
  section: ClassVar[str | None] = None
  section_fields: ClassVar[tuple[str, ...]] = ()

  def check_strategy(self) -> None:
    idc.parse_strategy(self.strategy, 'strategy')

  def check(self) -> None:
    super().check()
    if self.plateau_factor >= 1:
      raise settings_lib.SettingError(
        'plateau_factor', self.plateau_factor, 'must be < 1 (0: no plateau schedule)'
      )
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
    own = {name: config[cls.section][name] for name in cls.section_fields}
    return settings_lib.from_section(
      cls,
      config.family,
      'family',
      value_paths={
        'init': 'distill.init',
        'model': 'model.name',
        'strategy': 'augment.strategy',
        **{name: f'{cls.section}.{name}' for name in own},
      },
      **fields,
      **own,
      init=config.distill.init,
      strategy=config.augment.strategy,
      **values,
    )

  def decoded_per_class(self) -> int:
    return self.factor * self.factor * self.ipc

  def plateau_schedule(self) -> optax.GradientTransformationExtraArgs | None:
    """The image learning rate's plateau schedule, or None (`plateau_factor` 0)."""
    if not self.plateau_factor:
      return None
    return class_steps.plateau_schedule(self.plateau_factor, self.plateau_patience)

  def image_optimizer(self, spec: base.DataSpec) -> optax.GradientTransformation:
    optimizer = super().image_optimizer(spec)
    schedule = self.plateau_schedule()
    return optimizer if schedule is None else class_steps.on_plateau(optimizer, schedule)


@flax.struct.dataclass
class FamilyState(base.DistillState):
  """A DM state whose `images` are the stored images of multi-formation factor `factor`, with
  the state of the method's matching term (`Matcher.init_state`; () for a plain one)."""

  factor: int = flax.struct.field(pytree_node=False, default=1)
  matcher_state: Any = ()


class ClassContext(NamedTuple):
  """What a class step's matching term may use beyond the two feature sets.

  Attributes:
    key: the class step's key (the step's 'match' stream folded with the class id).
    class_id: the class (an int32 scalar, traced).
    step: the iteration (traced).
    state: the matcher's state as this class step sees it.
  """

  key: jax.Array
  class_id: jax.Array
  step: jax.Array
  state: Any


# (class_id -> augmentation key) -> features [K, f * f * ipc, D] of every class's decoded
# synthetic images under the iteration's matching network and a fresh augmentation drawn from
# the key, without gradient.
ClassFeatures = Callable[[jax.Array], jax.Array]


class Matcher:
  """A method's matching term on the family step: by default `match(real, syn)` of a plain
  `losses.MatchFn`, with no state.

  A subclass may draw per class step (`ClassContext.key`), carry a state across iterations
  (`init_state`, moved on by `after_classes`) and train parameters of its own by gradient
  ascent on the same loss (`params`, `ascend`): those change from class step to class step, so
  the class gradients are then computed one by one.
  """

  ascends: ClassVar[bool] = False  # whether `params` / `ascend` train parameters by ascent

  def __init__(self, match: losses.MatchFn = losses.mean_matching):
    self.match = match

  def init_state(self, feature_dim: int, num_classes: int, key: jax.Array) -> Any:
    """The state before the first iteration (`feature_dim`: the matching features' size)."""
    del feature_dim, num_classes, key
    return ()

  def loss(
    self, real_features: jax.Array, syn_features: jax.Array, context: ClassContext, params: Any
  ) -> jax.Array:
    """The class's matching term (its real side constant): a scalar."""
    del context, params
    return self.match(real_features, syn_features)

  def params(self, state: Any) -> Any:
    """The parameters `loss` takes that ascent trains (None: none)."""
    del state
    return None

  def ascend(self, state: Any, grads: Any) -> Any:
    """The state after one ascent step of `params` along `grads` (of the class's loss)."""
    del grads
    return state

  def after_classes(self, state: Any, step: jax.Array, class_features: ClassFeatures, key) -> Any:
    """The state after the iteration's class steps (`class_features` of the updated images)."""
    del step, class_features, key
    return state


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


def interpolated_pool(net: models.Network, pool: pool_lib.Pool, members: int):
  """The `NetworkSource` of DANCE and NCFM and its parameters: per iteration, member
  k ~ U{0..members-1} and lambda ~ U(0, 1) from the step's 'pool_member' stream; the matching
  network is lambda * initial_k + (1 - lambda) * final_k, the expert final_k.

  Returns:
    (source, params): params = (initial, final) variables of the first `members` members,
    stacked and on the device, for the jitted step.
  """
  del net  # the pool's own architecture
  if pool.settings is None:
    raise ValueError('An interpolated pool needs its settings to recompute its initial weights.')
  final = jax.tree_util.tree_map(lambda x: x[:members], pool.variables)
  image_shape = tuple(pool.metadata['image_shape'])
  initial = pool_lib.initial_variables(pool.settings, pool.net, image_shape, 0, members)
  params = jax.device_put((initial, final))

  def source(key_data, step, params):
    initial, final = params
    key = keys_lib.stream(keys_lib.step_key(key_data, step), 'pool_member')
    member_key, lam_key = jax.random.split(key)
    member = jax.random.randint(member_key, (), 0, members)
    lam = jax.random.uniform(lam_key)
    take = lambda tree: jax.tree_util.tree_map(lambda x: x[member], tree)
    expert = take(final)
    return Networks(matching=pool_lib.interpolate(take(initial), expert, lam), expert=expert)

  return source, params


def final_pool(net: models.Network, pool: pool_lib.Pool, members: int):
  """The `NetworkSource` of DSDM and its parameters: per iteration, member j ~ U{0..members-1}
  (the 'pool_member' stream) with its final weights, matching and expert.

  Returns:
    (source, params): params = the first `members` members' final variables, on the device.
  """
  del net
  params = jax.device_put(jax.tree_util.tree_map(lambda x: x[:members], pool.variables))

  def source(key_data, step, params):
    key = keys_lib.stream(keys_lib.step_key(key_data, step), 'pool_member')
    member = jax.random.randint(key, (), 0, members)
    chosen = jax.tree_util.tree_map(lambda x: x[member], params)
    return Networks(matching=chosen, expert=chosen)

  return source, params


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
  matcher: Matcher | None = None,
  network_params: Any = None,
) -> base.Step:
  """Builds the IDC-family step `(state, sampler) -> (state, metrics)`; it traces once.

  Args:
    net: the matching network's architecture, with the convolutions of its image gradients (the
      real images' forward passes take `lowering.real_conv`).
    settings: the family settings.
    spec: the dataset's class count, image shape and normalisation.
    lowering: the platform's programs (real chunks, class loops, precision).
    networks: the iteration's networks (`random_networks`, a pool's interpolation, ...).
    extractor: where class centralization takes its features.
    matcher: the matching term of each class (default: DM's `losses.mean_matching`, as DANCE).
    network_params: what `networks` takes (e.g. a pool's members, on the host), passed to the
      jitted step as an argument.

  Returns:
    The step, on a `FamilyState`. Metrics: 'loss' (the match pass's weighted total), the
    unweighted 'match', 'cc', 'cm' and 'calibration' (the calibration passes' cross-entropy),
    each summed over classes, and 'grad_norm' (of the match pass's class gradients).
  """
  matcher = Matcher() if matcher is None else matcher
  num_classes, ipc, batch_real = spec.num_classes, settings.ipc, settings.batch_real
  image_shape = tuple(spec.image_shape)
  height, width = image_shape[:2]
  strategy, factor = settings.strategy, settings.factor
  optimizer, schedule = settings.image_optimizer(spec), settings.plateau_schedule()
  gradients = settings.class_gradients
  if gradients == 'auto':
    gradients = 'one_by_one' if lowering.loop_classes or matcher.ascends else 'together'
  if gradients == 'together' and matcher.ascends and settings.class_steps == 'per_class':
    raise ValueError(
      'config.family.class_gradients=together: this method trains parameters of its matching '
      'term from class step to class step, so its class gradients are taken one by one; set '
      'config.family.class_gradients=auto or one_by_one.'
    )
  update = class_steps.class_updates(settings.class_steps, gradients)
  real_chunk = dm.resolve_real_chunk(settings, num_classes, lowering)
  draw_params = lambda key: augmentation_params(key, num_classes, strategy, height, width)
  decode = lambda class_images: multiformation.decode(class_images, factor)
  class_params = lambda params, c: jax.tree_util.tree_map(lambda x: x[c], params)
  real_net = net.with_conv(lowering.real_conv)  # forward only: the lowering's real-image programs

  def step(state: FamilyState, sampler, extractor_params, source_params):
    key = keys_lib.step_key(state.key, state.step)
    cc_key = keys_lib.centralization_keys(key, 1)[0]  # the host derives it the same way
    if extractor.select is not None:  # the host selected for the one CC key of the step
      extractor_params = jax.tree_util.tree_map(lambda x: x[0], extractor_params)
    variables, expert = networks(state.key, state.step, source_params)
    images = clip_to_pixels(state.images, spec.mean, spec.std)

    if settings.fixed_real:
      real = data_lib.first_of_all_classes(sampler, batch_real)
    else:
      real = data_lib.sample_all_classes(sampler, keys_lib.stream(key, 'real'), batch_real)
    real = data_lib.normalize(real, spec.mean, spec.std)
    params = draw_params(keys_lib.stream(key, 'augment'))
    real = jax.lax.stop_gradient(_augment_classes(params, real, strategy, lowering.loop_classes))
    real_features, real_map = dm.embed_real(real_net, variables, real, real_chunk)
    cc_real_features = None
    if settings.weights.needs_real_cc_features:  # the scale-free CC forms' unit
      flat = lambda x: x.reshape(num_classes * batch_real, *x.shape[2:])
      cc_real_features = extractor.features(
        extractor_params, cc_key, flat(real), flat(real_features)
      ).reshape(num_classes, batch_real, -1)
    match_key = keys_lib.stream(key, 'match')

    def match_loss(class_images, matched_params, context):
      class_id = context.class_id
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
        match=lambda r, s: matcher.loss(r, s, context, matched_params),
      )
      return terms.total, terms

    def match_grad(class_images, class_id, matcher_state):
      context = ClassContext(
        jax.random.fold_in(match_key, class_id), class_id, state.step, matcher_state
      )
      grad_fn = jax.grad(match_loss, argnums=(0, 1), has_aux=True)
      (grad, params_grad), terms = grad_fn(class_images, matcher.params(matcher_state), context)
      matcher_state = matcher.ascend(matcher_state, params_grad)
      return grad, (terms, jnp.sum(jnp.square(grad))), matcher_state

    if matcher.ascends:
      images, opt_state, (terms, squared_norms), matcher_state = update(
        images, state.opt_state, optimizer, num_classes, ipc, match_grad,
        carry=state.matcher_state,
      )  # fmt: skip
    else:
      matcher_state = state.matcher_state
      images, opt_state, (terms, squared_norms) = update(
        images, state.opt_state, optimizer, num_classes, ipc,
        lambda x, c: match_grad(x, c, matcher_state)[:2],
      )  # fmt: skip
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
    if schedule is not None:  # the codes step the scheduler on the iteration's mean class loss
      iteration_loss = (metrics['loss'] + calibration) / num_classes
      opt_state = class_steps.end_iteration(opt_state, iteration_loss, schedule)
      metrics['lr_scale'] = opt_state.plateau.scale

    def class_features(augment_key):
      fresh = draw_params(augment_key)
      by_class = images.reshape(num_classes, ipc, *image_shape)
      decoded = jax.vmap(decode)(by_class)
      augmented = _augment_classes(fresh, decoded, strategy, lowering.loop_classes)
      return jax.lax.stop_gradient(
        jax.lax.map(lambda x: real_net.embed(variables, x)[0], augmented)
      )

    matcher_state = matcher.after_classes(
      matcher_state, state.step, class_features, keys_lib.stream(key, 'after_classes')
    )
    new_state = state.replace(
      step=state.step + 1, images=images, opt_state=opt_state, matcher_state=matcher_state
    )
    return new_state, metrics

  @jax.jit
  def jitted_step(state, sampler, extractor_params, source_params):
    with lowering.precision_scope():
      return step(state, sampler, extractor_params, source_params)

  def arguments(state: FamilyState, sampler: data_lib.ClassSampler):
    return state, sampler, extractor.step_params(state.key, state.step, 1), network_params

  return base.Step(jitted=jitted_step, arguments=arguments)


def feature_dim(net: models.Network, image_shape: tuple[int, ...]) -> int:
  """The size of the matching network's flattened features for images of `image_shape`."""
  variables = jax.eval_shape(lambda key: net.init(key, (1, *image_shape)), jax.random.key(0))
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  features, _ = jax.eval_shape(net.embed, variables, images)
  return int(features.shape[-1])


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

  def matcher(self, settings: FamilySettings) -> Matcher:
    """The method's matching term (DM's mean matching by default)."""
    del settings
    return Matcher()

  def init_state(self, settings, spec, images, labels, net, seed):
    state = super().init_state(settings, spec, images, labels, net, seed)
    matcher_state = self.matcher(settings).init_state(
      feature_dim(net, tuple(images.shape[1:])),
      int(np.max(labels)) + 1,
      keys_lib.run_key(seed, 'matcher'),
    )
    return FamilyState(
      **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
      factor=settings.factor,
      matcher_state=matcher_state,
    )

  def training_set(self, state: FamilyState, num_classes: int) -> tuple[jax.Array, jax.Array]:
    return multiformation.decode_classes(state.images, state.labels, num_classes, state.factor)

  def stored_images(self, state: FamilyState) -> jax.Array | None:
    return state.images if state.factor > 1 else None


class PooledFamilyMethod(FamilyMethod):
  """A family method matching with networks of the pretrained pool (config.pool): DANCE, NCFM,
  DSDM. A subclass gives its name, presets and matcher, and its `network_source`."""

  uses_pool = True

  def network_source(self, net: models.Network, pool: pool_lib.Pool, settings: FamilySettings):
    """(NetworkSource, its parameters) of the pool (`interpolated_pool` by default)."""
    return interpolated_pool(net, pool, settings.pool_members)

  def check_pool(self, config: ml_collections.ConfigDict) -> None:
    """The method matches with the pool's own networks: their architecture is the matching one."""
    if config.pool.model != config.model.name:
      raise ValueError(
        f'method={self.name} matches with the pool members (config.pool.model='
        f'{config.pool.model!r}), but config.model.name={config.model.name!r}; set both to the '
        'same network.'
      )
    if config.family.pool_members > config.pool.size:
      raise ValueError(
        f'config.family.pool_members={config.family.pool_members} exceeds config.pool.size='
        f'{config.pool.size}; draw from at most the pool.'
      )

  def settings(self, config: ml_collections.ConfigDict) -> FamilySettings:
    self.check_pool(config)
    return super().settings(config)

  def make_step(
    self,
    net,
    settings,
    spec,
    lowering,
    extractor=extractors_lib.matching_net_extractor,
    mesh=None,
    pool=None,
  ):
    del mesh  # one device
    if pool is None:
      raise ValueError(
        f'{self.name} needs the pretrained pool: make_step(..., pool=<pool_lib.Pool>).'
      )
    source, params = self.network_source(net, pool, settings)
    return make_family_step(
      net,
      settings,
      spec,
      lowering,
      source,
      extractor,
      matcher=self.matcher(settings),
      network_params=params,
    )

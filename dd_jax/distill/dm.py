"""One DM (+ IID) distillation step as a pure, jitted function (SPEC sections 4 and 5).

    state = init_state(images, labels, optimizer, seed_key)
    step = make_dm_step(net, settings, optimizer, cc_extractor)
    state, metrics = step(state, sampler)        # jitted; traces once

Inside the step: a brand-new randomly initialised backbone (or `num_nets` of them, vmapped) is
built from the step's key; every class draws `batch_real` real images on device; each class gets
one siamese DSA draw applied to its real and synthetic images; the real images of all classes go
through the network class by class (batch norm: all classes as one batch, the path of SPEC
section 5), the synthetic images of all classes as one batch; the losses are vmapped over classes
and summed; one optimizer step updates all synthetic images.
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
from dd_jax import sharding as sharding_lib


@flax.struct.dataclass
class DistillState:
  """Everything a distillation run carries from step to step (and checkpoints).

  Attributes:
    step: number of optimizer steps taken.
    images: [K * ipc, H, W, C] synthetic images in normalised space, class-blocked.
    labels: [K * ipc] fixed labels (0, ..., 0, 1, ..., K - 1).
    opt_state: the optax state of `images`.
    key: raw PRNG key data of the run; the step taken from a state with `step == t` uses
      fold_in(key, t), so a resumed run draws exactly what an uninterrupted one would.
  """
  step: jax.Array
  images: jax.Array
  labels: jax.Array
  opt_state: optax.OptState
  key: jax.Array


def init_state(images: jax.Array, labels: jax.Array, optimizer: optax.GradientTransformation,
               key: jax.Array) -> DistillState:
  """The state before the first step. `key` is a typed PRNG key."""
  images = jnp.asarray(images, jnp.float32)
  return DistillState(step=jnp.zeros((), jnp.int32), images=images,
                      labels=jnp.asarray(labels, jnp.int32), opt_state=optimizer.init(images),
                      key=jax.random.key_data(key))


@dataclasses.dataclass(frozen=True)
class CentralizationExtractor:
  """Gives the features class centralization acts on (SPEC 4.3).

  Attributes:
    name: 'matching_net' or 'pool' (for messages).
    features: `(params, key, syn_images, matching_features) -> [K * ipc, D']`, called inside the
      jitted step with the parameters of this network's draw (see `select`), the network's CC key,
      the augmented synthetic images [K * ipc, H, W, C] and the matching network's features of
      them [K * ipc, D].
    params: a pytree (e.g. a pool's stacked variables, on the host) the step's parameters come
      from; handed to the jitted step as an argument, never baked in as a constant. None if
      unused.
    select: None, or `(params, keys) -> selected` run on the host before every step with the
      step's [n] CC keys (one per matching network): the step receives `selected`, whose leaves
      have a leading axis n, and `features` gets entry i with key i. A pool selects the drawn
      members, so only they go to the device (1000 ResNet18 would take ~44 GB there). Without
      `select`, every call of `features` gets `params` whole.
  """
  name: str
  features: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
  params: Any = None
  select: Callable[[Any, jax.Array], Any] | None = None


def _matching_features(params, key, syn_images, matching_features):
  del params, key, syn_images
  return matching_features


# CC on the random matching network's own features (no extra forward pass).
matching_net_extractor = CentralizationExtractor(name='matching_net',
                                                 features=_matching_features)


def cc_keys(step_key: jax.Array, num_nets: int) -> jax.Array:
  """The [num_nets] class-centralization keys of a DM step with key `step_key` (one per matching
  network; a pool draws each network's member from its key)."""
  return jax.random.split(jax.random.split(step_key, 4)[3], num_nets)


@dataclasses.dataclass(frozen=True)
class DMSettings:
  """Static settings of the DM step.

  Attributes:
    num_classes: K.
    ipc: synthetic images per class.
    batch_real: real images per class and step.
    num_nets: random networks matched per step (losses averaged over them).
    strategy: the DSA strategy string ('' or 'none' disables augmentation).
    weights: loss weights and options.
    mean: per-channel normalisation mean (pixel units).
    std: per-channel normalisation std.
    real_chunk: real images embedded at once by networks with per-sample norms (a loop over
      chunks bounds memory; the result does not depend on it). 0: one class at a time.
  """
  num_classes: int
  ipc: int
  batch_real: int
  num_nets: int
  strategy: str
  weights: losses.ObjectiveWeights
  mean: tuple[float, ...]
  std: tuple[float, ...]
  real_chunk: int = 0


def make_dm_step(net: models.Network, settings: DMSettings,
                 optimizer: optax.GradientTransformation,
                 cc_extractor: CentralizationExtractor = matching_net_extractor,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> Callable[[DistillState, data_lib.ClassSampler],
                               tuple[DistillState, dict[str, jax.Array]]]:
  """Builds the step `(state, sampler) -> (state, metrics)`; its jitted core traces once.

  Args:
    net: the matching network architecture.
    settings: static step settings.
    optimizer: the optax optimizer of the synthetic images.
    cc_extractor: where class centralization takes its features.
    mesh: a `sharding.class_mesh`: classes (and networks) split across its devices; the state
      must be placed with `sharding.place_state`. None: one device.

  Returns:
    The step. Metrics: 'loss' (weighted total), the unweighted terms 'dm', 'cc', 'cm' (summed
    over classes, averaged over networks) and 'grad_norm'.
  """
  num_classes, ipc, batch_real = settings.num_classes, settings.ipc, settings.batch_real
  real_chunk = settings.real_chunk or batch_real
  if (num_classes * batch_real) % real_chunk:
    raise ValueError(f'real_chunk={real_chunk} must divide the {num_classes} x {batch_real} real '
                     'images of a step.')
  by_class = lambda x: sharding_lib.constrain_by_class(x, mesh)

  def loss_fn(images, key, sampler, extractor_params):
    net_key, real_key, augment_key, _ = jax.random.split(key, 4)
    image_shape = images.shape[1:]
    real = by_class(data_lib.sample_all_classes(sampler, real_key, batch_real))
    real = data_lib.normalize(real, settings.mean, settings.std)
    syn = by_class(images.reshape(num_classes, ipc, *image_shape))
    # Siamese DSA: one draw per class, shared by that class's real and synthetic images.
    class_keys = jax.random.split(augment_key, num_classes)
    augment = lambda k, x: augment_lib.augment(k, x, settings.strategy, siamese=True)
    real = jax.lax.stop_gradient(jax.vmap(augment)(class_keys, real))
    syn = jax.vmap(augment)(class_keys, syn)
    syn_flat = by_class(syn.reshape(num_classes * ipc, *image_shape))
    per_class = lambda x, n: x.reshape(num_classes, n, *x.shape[1:])  # [K * n, ...] -> [K, n, ...]

    def terms_for_network(network_key, network_cc_key, network_extractor_params):
      variables = net.init(network_key, (1, *image_shape))
      embed = lambda x: net.embed(variables, x, train=True)
      if net.has_batch_stats:
        # SPEC 5: batch statistics pool all classes' real images (and all synthetic ones).
        real_features, real_map = jax.tree_util.tree_map(
            lambda x: per_class(x, batch_real),
            embed(real.reshape(num_classes * batch_real, *image_shape)))
      elif mesh is None:
        # Per-sample norms: chunk by chunk gives the same numbers with memory bounded by one
        # chunk (K * batch_real images at once would not fit for 200 classes); on CPU chunks of
        # 64 run the convolutions 1.4x faster than a class of 256 (cache-sized working set).
        real_features, real_map = jax.tree_util.tree_map(
            lambda x: x.reshape(num_classes, batch_real, *x.shape[2:]),
            jax.lax.map(embed, real.reshape(-1, real_chunk, *image_shape)))
      else:
        # Split across devices, each embeds its own classes at once (a loop would not split).
        real_features, real_map = by_class(jax.vmap(embed)(real))
      syn_features, syn_map = embed(syn_flat)
      cc_features = cc_extractor.features(network_extractor_params, network_cc_key, syn_flat,
                                          syn_features)
      return losses.classwise_objective(real_features, real_map, per_class(syn_features, ipc),
                                        per_class(syn_map, ipc), per_class(cc_features, ipc),
                                        settings.weights)

    network_keys = jax.random.split(net_key, settings.num_nets)
    # With a mesh, the networks split over its 'nets' axis.
    over_networks = jax.vmap(terms_for_network,
                             in_axes=(0, 0, None if cc_extractor.select is None else 0),
                             spmd_axis_name=sharding_lib.NETS if mesh is not None else None)
    terms = jax.tree_util.tree_map(
        lambda x: jnp.mean(x, axis=0),
        over_networks(network_keys, cc_keys(key, settings.num_nets), extractor_params))
    return terms.total, terms

  @jax.jit
  def jitted_step(state: DistillState, sampler: data_lib.ClassSampler, extractor_params: Any):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    grads, terms = jax.grad(loss_fn, has_aux=True)(state.images, key, sampler, extractor_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.images)
    images = by_class(optax.apply_updates(state.images, updates))
    metrics = {'loss': terms.total, 'dm': terms.dm, 'cc': terms.cc, 'cm': terms.cm,
               'grad_norm': optax.tree_utils.tree_norm(grads)}
    return state.replace(step=state.step + 1, images=images, opt_state=opt_state), metrics

  placed = {}  # the sampler (and fixed extractor parameters) copied to the mesh, once
  host_cc_keys = jax.jit(lambda key_data, step: cc_keys(
      jax.random.fold_in(jax.random.wrap_key_data(key_data), step), settings.num_nets))

  def arguments(state: DistillState, sampler: data_lib.ClassSampler):
    # The extractor's parameters are an argument, never compile-time constants.
    params = cc_extractor.params
    if mesh is not None:
      if placed.get('source') is not sampler:
        fixed = params if cc_extractor.select is None else None
        placed.update(source=sampler, value=sharding_lib.replicate((sampler, fixed), mesh))
      sampler, params = placed['value']
    if cc_extractor.select is not None:  # e.g. a pool's drawn members, chosen on the host
      params = cc_extractor.select(cc_extractor.params, host_cc_keys(state.key, state.step))
      if mesh is not None:
        params = sharding_lib.replicate(params, mesh)
    return state, sampler, params

  def step(state: DistillState, sampler: data_lib.ClassSampler):
    return jitted_step(*arguments(state, sampler))

  # The compiled core and its arguments, to lower it (FLOPs, memory) or count its traces.
  step.jitted, step.arguments = jitted_step, arguments
  return step

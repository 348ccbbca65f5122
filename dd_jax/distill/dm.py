"""DM (Zhao & Bilen, WACV 2023) with the IID constraints: the method and its jitted step.

    state = method.init_state(settings, spec, images, labels, net, seed)
    step = make_dm_step(net, settings, spec, lowering, extractor)
    state, metrics = step(state, sampler)        # jitted; traces once

A step, in named stages that other distribution-matching methods reuse: `draw_and_augment` (a
brand-new randomly initialised backbone, or `num_nets` of them, is built from the step's
'networks' stream; every class draws `batch_real` real images on device; each class gets one
siamese DSA draw applied to its real and synthetic images), `embed_real` and `embed_synthetic`
(in chunks as the lowering says; batch norm: all classes as one batch, as the reference's
batch-norm branch), the objective (a matching term, DM's mean matching by default, plus the
constraints, summed over classes and averaged over networks), and one optimizer step on all
synthetic images.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dd_jax import augment as augment_lib
from dd_jax import data as data_lib
from dd_jax import extractors as extractors_lib
from dd_jax import keys as keys_lib
from dd_jax import losses, models
from dd_jax import sharding as sharding_lib
from dd_jax.distill import base
from dd_jax.lowering import Lowering


def _chunk(configured: int, total: int, field: str, what: str, default: int) -> int:
  if configured:
    if total % configured:
      raise ValueError(f'config.distill.{field}={configured} must divide the {what}.')
    return configured
  return default


def resolve_real_chunk(settings: base.DistillSettings, num_classes: int, lowering: Lowering) -> int:
  """settings.real_chunk, or the lowering's (`Lowering.real_chunk`: CPU the largest divisor of
  the step's real images up to 64, cache-sized working sets; a class elsewhere).

  Raises:
    ValueError: a configured real_chunk that does not divide num_classes x batch_real.
  """
  total = num_classes * settings.batch_real
  what = f'{num_classes} x {settings.batch_real} real images of a step'
  default = lowering.real_chunk(total, settings.batch_real)
  return _chunk(settings.real_chunk, total, 'real_chunk', what, default)


def resolve_syn_chunk(settings: base.DistillSettings, num_classes: int, lowering: Lowering) -> int:
  """settings.syn_chunk, or the lowering's (`Lowering.synthetic_chunk`: on CPU the largest
  divisor of the synthetic images up to 64 or a tenth of them; all at once elsewhere).

  Raises:
    ValueError: a configured syn_chunk that does not divide num_classes x ipc.
  """
  total = num_classes * settings.ipc
  what = f'{num_classes} x {settings.ipc} synthetic images'
  return _chunk(settings.syn_chunk, total, 'syn_chunk', what, lowering.synthetic_chunk(total))


def draw_and_augment(
  key: jax.Array,
  images: jax.Array,
  sampler: data_lib.ClassSampler,
  settings: base.DistillSettings,
  spec: base.DataSpec,
  lowering: Lowering,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The step's real batch and its synthetic images, under one siamese DSA draw per class.

  Args:
    key: the step key (streams 'real' and 'augment').
    images: [K * ipc, H, W, C] class-blocked synthetic images.
    sampler: the real images, on device.
    settings: batch_real and the DSA strategy.
    spec: class count and normalisation.
    lowering: DSA class by class (`loop_classes`) or under vmap.
    mesh: classes split across its devices (DSA then under vmap), or None.

  Returns:
    (real [K, batch_real, H, W, C] normalised and augmented, no gradient; synthetic
    [K * ipc, H, W, C] augmented).
  """
  num_classes, image_shape = spec.num_classes, images.shape[1:]
  by_class = lambda x: sharding_lib.constrain_by_class(x, mesh)
  real = by_class(
    data_lib.sample_all_classes(sampler, keys_lib.stream(key, 'real'), settings.batch_real)
  )
  real = data_lib.normalize(real, spec.mean, spec.std)
  syn = by_class(images.reshape(num_classes, -1, *image_shape))
  class_keys = jax.random.split(keys_lib.stream(key, 'augment'), num_classes)
  augment = lambda k, x: augment_lib.augment(k, x, settings.strategy, siamese=True)
  if mesh is None and lowering.loop_classes:
    # One class at a time: each class's `lax.switch` then runs its drawn op alone (under vmap
    # the op index is batched, and every op of the strategy runs on every class).
    augment_classes = lambda x: jax.lax.map(lambda pair: augment(*pair), (class_keys, x))
  else:
    augment_classes = lambda x: jax.vmap(augment)(class_keys, x)  # split across devices
  real = jax.lax.stop_gradient(augment_classes(real))
  syn = augment_classes(syn)
  return real, by_class(syn.reshape(-1, *image_shape))


def embed_real(
  net: models.Network,
  variables: Any,
  real: jax.Array,
  real_chunk: int,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Features [K, B, D] and final maps [K, B, h, w, C] of the real batch [K, B, H, W, C].

  Batch norm: all classes as one batch (the reference's batch-norm branch). Otherwise chunk by
  chunk of `real_chunk` images (memory bounded by one chunk), or with a mesh each device its own
  classes at once.
  """
  num_classes, batch_real, *image_shape = real.shape
  embed = lambda x: net.embed(variables, x, train=True)
  if net.has_batch_stats:
    return jax.tree_util.tree_map(
      lambda x: x.reshape(num_classes, batch_real, *x.shape[1:]),
      embed(real.reshape(num_classes * batch_real, *image_shape)),
    )
  if mesh is None:
    return jax.tree_util.tree_map(
      lambda x: x.reshape(num_classes, batch_real, *x.shape[2:]),
      jax.lax.map(embed, real.reshape(-1, real_chunk, *image_shape)),
    )
  return sharding_lib.constrain_by_class(jax.vmap(embed)(real), mesh)


def embed_synthetic(
  net: models.Network,
  variables: Any,
  syn: jax.Array,
  syn_chunk: int,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Features [N, D] and final maps of the synthetic images [N, H, W, C], in unrolled chunks of
  `syn_chunk` (XLA:CPU runs convolution backward passes slowly in loops) unless batch norm or a
  mesh takes them at once."""
  embed = lambda x: net.embed(variables, x, train=True)
  if net.has_batch_stats or mesh is not None or syn_chunk == syn.shape[0]:
    return embed(syn)
  parts = [embed(part) for part in jnp.split(syn, syn.shape[0] // syn_chunk)]
  features, feature_map = (jnp.concatenate(pieces) for pieces in zip(*parts))
  return features, feature_map


def make_dm_step(
  net: models.Network,
  settings: base.DistillSettings,
  spec: base.DataSpec,
  lowering: Lowering,
  extractor: extractors_lib.Extractor = extractors_lib.matching_net_extractor,
  mesh: jax.sharding.Mesh | None = None,
  match: losses.MatchFn = losses.mean_matching,
) -> base.Step:
  """Builds the DM step `(state, sampler) -> (state, metrics)`; its jitted core traces once.

  Args:
    net: the matching network architecture (its convolutions: `lowering.real_conv`; the
      synthetic images take `lowering.synthetic_conv`, the same variables).
    settings: the step settings (ipc, batch_real, num_nets, strategy, weights, lr, momentum,
      real_chunk, syn_chunk).
    spec: the dataset's class count and normalisation.
    lowering: the platform's programs (chunks, DSA loop, convolutions, precision).
    extractor: where class centralization takes its features.
    mesh: a `sharding.class_mesh`: classes (and networks) split across its devices; the state
      must be placed with `sharding.place_state`. None: one device.
    match: the matching term of each class (a `losses.MatchFn`; DM: `losses.mean_matching`).

  Returns:
    The step. Metrics: 'loss' (weighted total), the unweighted terms 'match', 'cc', 'cm' (summed
    over classes, averaged over networks) and 'grad_norm'.
  """
  num_classes, ipc, batch_real = spec.num_classes, settings.ipc, settings.batch_real
  real_chunk = resolve_real_chunk(settings, num_classes, lowering)
  syn_chunk = resolve_syn_chunk(settings, num_classes, lowering)
  optimizer = settings.image_optimizer(spec)
  syn_net = net.with_conv(lowering.synthetic_conv)
  per_class = lambda x, n: x.reshape(num_classes, n, *x.shape[1:])  # [K * n, ...] -> [K, n, ...]

  def objective(real, syn, network_key, cc_key, extractor_params):
    """The terms of one random matching network."""
    variables = net.init(network_key, (1, *real.shape[2:]))
    real_features, real_map = embed_real(net, variables, real, real_chunk, mesh)
    syn_features, syn_map = embed_synthetic(syn_net, variables, syn, syn_chunk, mesh)
    cc_features = extractor.features(extractor_params, cc_key, syn, syn_features)
    cc_real_features = None
    if settings.weights.needs_real_cc_features:
      # The unit of the scale-free CC forms: the real batch under the CC extractor (the
      # matching network's features as they are; a pool member embeds the real batch).
      cc_real_features = per_class(
        extractor.features(
          extractor_params,
          cc_key,
          real.reshape(num_classes * batch_real, *real.shape[2:]),
          real_features.reshape(num_classes * batch_real, -1),
        ),
        batch_real,
      )
    return losses.classwise_objective(
      real_features,
      real_map,
      per_class(syn_features, ipc),
      per_class(syn_map, ipc),
      settings.weights,
      per_class(cc_features, ipc),
      cc_real_features,
      match=match,
    )

  def loss_fn(images, key, sampler, extractor_params):
    real, syn = draw_and_augment(key, images, sampler, settings, spec, lowering, mesh)
    network_keys = jax.random.split(keys_lib.stream(key, 'networks'), settings.num_nets)
    # With a mesh, the networks split over its 'nets' axis.
    over_networks = jax.vmap(
      lambda *args: objective(real, syn, *args),
      in_axes=(0, 0, None if extractor.select is None else 0),
      spmd_axis_name=sharding_lib.NETS if mesh is not None else None,
    )
    terms = jax.tree_util.tree_map(
      lambda x: jnp.mean(x, axis=0),
      over_networks(
        network_keys, keys_lib.centralization_keys(key, settings.num_nets), extractor_params
      ),
    )
    return terms.total, terms

  @jax.jit
  def jitted_step(state: base.DistillState, sampler: data_lib.ClassSampler, extractor_params: Any):
    with lowering.precision_scope():
      key = keys_lib.step_key(state.key, state.step)
      grads, terms = jax.grad(loss_fn, has_aux=True)(state.images, key, sampler, extractor_params)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.images)
      images = sharding_lib.constrain_by_class(optax.apply_updates(state.images, updates), mesh)
    metrics = {
      'loss': terms.total,
      'match': terms.match,
      'cc': terms.cc,
      'cm': terms.cm,
      'grad_norm': optax.tree_utils.tree_norm(grads),
    }
    return state.replace(step=state.step + 1, images=images, opt_state=opt_state), metrics

  replicas = sharding_lib.Replicas(mesh) if mesh is not None else None

  def arguments(state: base.DistillState, sampler: data_lib.ClassSampler):
    # The extractor's parameters are an argument, never compile-time constants.
    params = extractor.params
    if mesh is not None:
      fixed = params if extractor.select is None else None
      sampler, params = replicas.of(sampler, (sampler, fixed))
    if extractor.select is not None:  # e.g. a pool's drawn members, chosen on the host
      params = extractor.step_params(state.key, state.step, settings.num_nets)
      if mesh is not None:
        params = sharding_lib.replicate(params, mesh)
    return state, sampler, params

  return base.Step(jitted=jitted_step, arguments=arguments)


def random_real_images(dataset: data_lib.Dataset, ipc: int, key: jax.Array) -> np.ndarray:
  """`ipc` random real training images per class (normalised, class-blocked): DM's
  initialisation and the random-real baseline (same key, same subset)."""
  indices = data_lib.random_real_subset(key, dataset.train_labels, ipc)
  return np.asarray(dataset.normalize(dataset.train_images[indices]))


class DM(base.Method):
  """Distribution matching: a fresh random network per step, class means of real and synthetic
  features matched, plus the IID constraints (CC, CM) by weight."""

  name = 'dm'
  presets = base.Presets(
    image_lr=1.0,
    iid={
      'reference': base.IIDSetting('squared', 0.05, 1.0, 0.01),
      # Scale-free CC, chosen on validation data (experiments/results/iid_scale_free.md).
      'default': base.IIDSetting('calibrated', 0.3, 1.0, 0.01),
    },
  )
  supports_mesh = True

  def settings(self, config: ml_collections.ConfigDict) -> base.DistillSettings:
    return base.DistillSettings.from_config(config)

  def network(
    self, settings: base.DistillSettings, num_classes: int, lowering: Lowering
  ) -> models.Network:
    # The DM step runs no convolution backward inside a loop: XLA's convolutions (the lowering's
    # `real_conv`; the synthetic images take `synthetic_conv` in the step).
    return models.get_network(settings.model, num_classes, conv=lowering.real_conv)

  def initial_images(self, settings, dataset, key):
    labels = np.repeat(np.arange(dataset.num_classes), settings.ipc)
    if settings.init == 'real':
      return random_real_images(dataset, settings.ipc, key), labels
    return np.asarray(jax.random.normal(key, (len(labels), *dataset.image_shape))), labels

  def make_step(
    self, net, settings, spec, lowering, extractor=extractors_lib.matching_net_extractor, mesh=None
  ):
    return make_dm_step(net, settings, spec, lowering, extractor, mesh)

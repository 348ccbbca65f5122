"""DM (Zhao & Bilen, WACV 2023) with the IID constraints: the method and its jitted step.

    state = base.init_state(images, labels, settings.image_optimizer(), distill_key)
    step = make_dm_step(net, settings, spec, extractor)
    state, metrics = step(state, sampler)        # jitted; traces once

Inside the step: a brand-new randomly initialised backbone (or `num_nets` of them, vmapped) is
built from the step's 'networks' stream; every class draws `batch_real` real images on device;
each class gets one siamese DSA draw applied to its real and synthetic images; the real images of
all classes go through the network in chunks, and so do the synthetic ones on CPU (batch norm:
all classes as one batch, as the reference's batch-norm branch); the losses are
vmapped over classes and summed; one optimizer step updates all synthetic images.
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


def _chunk(configured: int, total: int, field: str, what: str, cpu_default: int) -> int:
  if configured:
    if total % configured:
      raise ValueError(f'config.distill.{field}={configured} must divide the {what}.')
    return configured
  return cpu_default


def _largest_divisor_up_to(total: int, bound: int) -> int:
  return max(d for d in range(1, min(total, bound) + 1) if total % d == 0)


def resolve_real_chunk(settings: base.DistillSettings, num_classes: int) -> int:
  """settings.real_chunk, or its default: the largest divisor of the step's real images up to 64
  on CPU (measured fastest: cache-sized working sets), one class elsewhere.

  Raises:
    ValueError: a configured real_chunk that does not divide num_classes x batch_real.
  """
  total = num_classes * settings.batch_real
  what = f'{num_classes} x {settings.batch_real} real images of a step'
  if jax.default_backend() != 'cpu':
    return _chunk(settings.real_chunk, total, 'real_chunk', what, settings.batch_real)
  return _chunk(settings.real_chunk, total, 'real_chunk', what, _largest_divisor_up_to(total, 64))


def resolve_syn_chunk(settings: base.DistillSettings, num_classes: int) -> int:
  """settings.syn_chunk, or its default: on CPU the largest divisor of the synthetic images up to
  64 (or up to a tenth of them, which bounds the unrolled passes at 10); all at once elsewhere.

  On CPU, the image gradient of the mean embedding of 100 / 500 CIFAR-sized images took 0.86x /
  0.75x the time in chunks of 50 than in one pass (cache-sized working sets, as for real_chunk).

  Raises:
    ValueError: a configured syn_chunk that does not divide num_classes x ipc.
  """
  total = num_classes * settings.ipc
  what = f'{num_classes} x {settings.ipc} synthetic images'
  if jax.default_backend() != 'cpu':
    return _chunk(settings.syn_chunk, total, 'syn_chunk', what, total)
  default = _largest_divisor_up_to(total, max(64, total // 10))
  return _chunk(settings.syn_chunk, total, 'syn_chunk', what, default)


def make_dm_step(
  net: models.Network,
  settings: base.DistillSettings,
  spec: base.DataSpec,
  extractor: extractors_lib.Extractor = extractors_lib.matching_net_extractor,
  mesh: jax.sharding.Mesh | None = None,
) -> base.Step:
  """Builds the DM step `(state, sampler) -> (state, metrics)`; its jitted core traces once.

  Args:
    net: the matching network architecture.
    settings: the step settings (ipc, batch_real, num_nets, strategy, weights, lr, momentum,
      real_chunk, syn_chunk).
    spec: the dataset's class count and normalisation.
    extractor: where class centralization takes its features.
    mesh: a `sharding.class_mesh`: classes (and networks) split across its devices; the state
      must be placed with `sharding.place_state`. None: one device.

  Returns:
    The step. Metrics: 'loss' (weighted total), the unweighted terms 'dm', 'cc', 'cm' (summed
    over classes, averaged over networks) and 'grad_norm'.
  """
  num_classes, ipc, batch_real = spec.num_classes, settings.ipc, settings.batch_real
  real_chunk = resolve_real_chunk(settings, num_classes)
  syn_chunk = resolve_syn_chunk(settings, num_classes)
  optimizer = settings.image_optimizer()
  by_class = lambda x: sharding_lib.constrain_by_class(x, mesh)
  syn_net = net
  if net.conv_impl == 'xla' and jax.default_backend() == 'cpu':
    # The synthetic images' first norm folds into their first convolution
    # (`layers.conv_instance_norm`): their gradient skips the norm's backward pass over the
    # [N, H, W, width] map and XLA:CPU's slow image gradient of a 3-channel convolution (the
    # layer's forward and backward on 50 CIFAR images: ~0.65x the time; the DM + IID step at
    # batch 64: ~9% less). The real images, forward only, keep XLA's convolution: faster there.
    syn_net = net.with_conv_impl('xla_fold')

  def loss_fn(images, key, sampler, extractor_params):
    image_shape = images.shape[1:]
    real = by_class(data_lib.sample_all_classes(sampler, keys_lib.stream(key, 'real'), batch_real))
    real = data_lib.normalize(real, spec.mean, spec.std)
    syn = by_class(images.reshape(num_classes, ipc, *image_shape))
    # Siamese DSA: one draw per class, shared by that class's real and synthetic images.
    class_keys = jax.random.split(keys_lib.stream(key, 'augment'), num_classes)
    augment = lambda k, x: augment_lib.augment(k, x, settings.strategy, siamese=True)
    if mesh is None:
      # One class at a time: each class's `lax.switch` then runs its drawn op alone (under vmap
      # the op index is batched, and every op of the strategy runs on every class).
      augment_classes = lambda x: jax.lax.map(lambda pair: augment(*pair), (class_keys, x))
    else:
      augment_classes = lambda x: jax.vmap(augment)(class_keys, x)  # split across devices
    real = jax.lax.stop_gradient(augment_classes(real))
    syn = augment_classes(syn)
    syn_flat = by_class(syn.reshape(num_classes * ipc, *image_shape))
    per_class = lambda x, n: x.reshape(num_classes, n, *x.shape[1:])  # [K * n, ...] -> [K, n, ...]

    def terms_for_network(network_key, network_cc_key, network_extractor_params):
      variables = net.init(network_key, (1, *image_shape))
      embed = lambda x: net.embed(variables, x, train=True)
      syn_embed = lambda x: syn_net.embed(variables, x, train=True)
      if net.has_batch_stats:
        # Batch statistics pool all classes' real images (and all synthetic ones), as the
        # reference's batch-norm branch.
        real_features, real_map = jax.tree_util.tree_map(
          lambda x: per_class(x, batch_real),
          embed(real.reshape(num_classes * batch_real, *image_shape)),
        )
      elif mesh is None:
        # Per-sample norms: chunk by chunk gives the same numbers with memory bounded by one
        # chunk (K * batch_real images at once would not fit for 200 classes); on CPU chunks of
        # 64 run the convolutions 1.4x faster than a class of 256 (cache-sized working set).
        real_features, real_map = jax.tree_util.tree_map(
          lambda x: x.reshape(num_classes, batch_real, *x.shape[2:]),
          jax.lax.map(embed, real.reshape(-1, real_chunk, *image_shape)),
        )
      else:
        # Split across devices, each embeds its own classes at once (a loop would not split).
        real_features, real_map = by_class(jax.vmap(embed)(real))
      if net.has_batch_stats or mesh is not None or syn_chunk == num_classes * ipc:
        syn_features, syn_map = syn_embed(syn_flat)
      else:
        # Unrolled rather than a loop: XLA:CPU runs convolution backward passes slowly in loops.
        parts = [syn_embed(part) for part in jnp.split(syn_flat, num_classes * ipc // syn_chunk)]
        syn_features, syn_map = (jnp.concatenate(pieces) for pieces in zip(*parts))
      cc_features = extractor.features(
        network_extractor_params, network_cc_key, syn_flat, syn_features
      )
      cc_real_features = None
      if settings.weights.needs_real_cc_features:
        # The unit of the scale-free CC forms: the real batch under the CC extractor (the
        # matching network's features as they are; a pool member embeds the real batch).
        cc_real_features = per_class(
          extractor.features(
            network_extractor_params,
            network_cc_key,
            real.reshape(num_classes * batch_real, *image_shape),
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
      )

    network_keys = jax.random.split(keys_lib.stream(key, 'networks'), settings.num_nets)
    # With a mesh, the networks split over its 'nets' axis.
    over_networks = jax.vmap(
      terms_for_network,
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
    key = keys_lib.step_key(state.key, state.step)
    grads, terms = jax.grad(loss_fn, has_aux=True)(state.images, key, sampler, extractor_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.images)
    images = by_class(optax.apply_updates(state.images, updates))
    metrics = {
      'loss': terms.total,
      'dm': terms.dm,
      'cc': terms.cc,
      'cm': terms.cm,
      'grad_norm': optax.tree_utils.tree_norm(grads),
    }
    return state.replace(step=state.step + 1, images=images, opt_state=opt_state), metrics

  placed = {}  # the sampler (and fixed extractor parameters) copied to the mesh, once

  def arguments(state: base.DistillState, sampler: data_lib.ClassSampler):
    # The extractor's parameters are an argument, never compile-time constants.
    params = extractor.params
    if mesh is not None:
      if placed.get('source') is not sampler:
        fixed = params if extractor.select is None else None
        placed.update(source=sampler, value=sharding_lib.replicate((sampler, fixed), mesh))
      sampler, params = placed['value']
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
  supports_mesh = True

  def settings(self, config: ml_collections.ConfigDict) -> base.DistillSettings:
    return base.DistillSettings.from_config(config)

  def network(self, settings: base.DistillSettings, num_classes: int) -> models.Network:
    # The DM step runs no convolution backward inside a loop, so XLA's own convolution is right
    # everywhere (the CPU default, Winograd and im2col layers, exists for loops: see
    # models.layers.resolve_conv_impl).
    return models.get_network(settings.model, num_classes, conv_impl='xla')

  def initial_images(self, settings, dataset, key):
    labels = np.repeat(np.arange(dataset.num_classes), settings.ipc)
    if settings.init == 'real':
      return random_real_images(dataset, settings.ipc, key), labels
    return np.asarray(jax.random.normal(key, (len(labels), *dataset.image_shape))), labels

  def init_state(self, settings, images, labels, net, distill_key, queue_key):
    del net, queue_key
    return base.init_state(images, labels, settings.image_optimizer(), distill_key)

  def make_step(
    self, net, settings, spec, extractor=extractors_lib.matching_net_extractor, mesh=None
  ):
    return make_dm_step(net, settings, spec, extractor, mesh)

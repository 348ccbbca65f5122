"""The IDC family's step (dd_jax.distill.family) and its methods M3D and DANCE: what the
method-generic tier (test_methods.py) does not check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_POOL, float64, make_tiny_config

from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import experiment, losses, models, presets
from dd_jax import keys as keys_lib
from dd_jax import lowering as lowering_lib
from dd_jax import pool as pool_lib
from dd_jax.distill import base, class_steps, family, methods

NO_CONSTRAINTS = losses.ObjectiveWeights(cc=0.0, cm=0.0)


def _constant_classes(num_classes=3, per_class=4):
  """A dataset whose every class holds `per_class` copies of one random image."""
  rng = np.random.default_rng(0)
  patterns = rng.integers(20, 235, size=(num_classes, 8, 8, 1)).astype(np.uint8)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  return data_lib.Dataset(
    name='constant',
    train_images=patterns[labels],
    train_labels=labels,
    test_images=patterns[labels],
    test_labels=labels,
    class_names=tuple(f'c{k}' for k in range(num_classes)),
    mean=(0.5,),
    std=(0.25,),
  )


def _settings(**overrides):
  values = dict(
    ipc=1,
    batch_real=4,
    model='ConvNetW32',
    strategy='color_crop_cutout',
    weights=NO_CONSTRAINTS,
    lr=1.0,
    momentum=0.5,
    init='real',
    factor=1,
  )
  return family.FamilySettings(**{**values, **overrides})


def _step(settings, dataset, networks=None, **kwargs):
  net = models.get_network(settings.model, dataset.num_classes)
  spec = base.DataSpec.of(dataset)
  networks = networks or family.random_networks(net, spec.image_shape, settings.network_every)
  step = family.make_family_step(net, settings, spec, lowering_lib.CPU, networks, **kwargs)
  images = np.asarray(dataset.normalize(dataset.train_images[:: dataset.train_class_counts()[0]]))
  labels = np.arange(dataset.num_classes)
  state = base.init_state(images, labels, settings.image_optimizer(spec), jax.random.key(0))
  state = family.FamilyState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)})
  return step, state, data_lib.ClassSampler.from_dataset(dataset)


def test_a_class_draw_is_shared_by_its_real_and_synthetic_images():
  """Every real image of a class equals its synthetic image: under one shared DiffAug draw the
  features are equal and the matching term is zero; a different draw would move them apart."""
  dataset = _constant_classes()
  step, state, sampler = _step(_settings(), dataset)
  _, metrics = step(state, sampler)
  assert float(metrics['match']) == pytest.approx(0.0, abs=1e-8)
  # Not zero by construction: 2x2 multi-formation makes the synthetic images differ.
  step, state, sampler = _step(_settings(factor=2), dataset)
  assert float(step(state, sampler)[1]['match']) > 1e-3


def test_each_class_gets_its_own_draw():
  params = family.augmentation_params(jax.random.key(0), 4, 'color_crop_cutout', 32, 32)
  assert params.brightness.shape == (4, 1) and params.shift_rows.shape == (4, 1)
  assert len(set(np.asarray(params.brightness)[:, 0].tolist())) == 4
  again = family.augmentation_params(jax.random.key(0), 4, 'color_crop_cutout', 32, 32)
  np.testing.assert_array_equal(again.cutout_rows, params.cutout_rows)


def test_the_step_takes_one_optimizer_step_per_class_unless_joint():
  dataset = _constant_classes()
  results = {}
  for mode in ('per_class', 'joint'):
    step, state, sampler = _step(_settings(factor=2, class_steps=mode), dataset)
    results[mode] = np.asarray(step(state, sampler)[0].images)
  assert np.max(np.abs(results['per_class'] - results['joint'])) > 1e-4


@pytest.mark.parametrize('calibration_passes', [0, 1], ids=['m3d_like', 'with_calibration'])
def test_class_gradients_together_take_the_same_steps_as_one_by_one(
  tiny_dataset, pool, calibration_passes
):
  # Two iterations from real images (momentum 0.5 carries the first into the second), the
  # matching term and, with a calibration pass, the expert's cross-entropy.
  pool = dataclasses.replace(pool, settings=TINY_POOL)
  source, params = family.interpolated_pool(pool.net, pool, members=2)
  images = {}
  for gradients in ('one_by_one', 'together'):
    settings = _settings(
      model=TINY_POOL.model, factor=2, class_gradients=gradients,
      calibration_passes=calibration_passes,
    )  # fmt: skip
    step, state, sampler = _step(settings, tiny_dataset, networks=source, network_params=params)
    for _ in range(2):
      state, _ = step(state, sampler)
    images[gradients] = np.asarray(state.images)
  np.testing.assert_allclose(images['together'], images['one_by_one'], rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(images['together'] - _step(settings, tiny_dataset)[1].images)) > 1e-3


def test_random_networks_last_network_every_iterations():
  net = models.get_network('ConvNetW32', 10)
  source = family.random_networks(net, (8, 8, 1), every=3)
  key_data = jax.random.key_data(jax.random.key(0))
  first = lambda step: jax.tree_util.tree_leaves(source(key_data, jnp.int32(step), None))[0]
  np.testing.assert_array_equal(first(0), first(2))
  assert not np.allclose(first(2), first(3))
  np.testing.assert_array_equal(first(3), first(5))
  # every=1: a new network per step, drawn as DM draws its own (the step's 'networks' stream).
  per_step = family.random_networks(net, (8, 8, 1), every=1)
  dm_network = net.init(keys_lib.stream(keys_lib.step_key(key_data, 4), 'networks'), (1, 8, 8, 1))
  for ours, theirs in zip(
    jax.tree_util.tree_leaves(per_step(key_data, jnp.int32(4), None)),
    jax.tree_util.tree_leaves(dm_network),
  ):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize('optimizer', ['sgd_momentum_decay', 'adamw', 'adamw_on_plateau'])
def test_in_pixel_space_steps_the_pixels_of_normalised_images(optimizer):
  """Three steps of the wrapped optimizer on normalised images z equal three steps of the
  optimizer itself on the pixels x = std z + mean with the pixel gradients g / std (float64)."""
  make = {
    'sgd_momentum_decay': lambda: optax.chain(
      optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.5)
    ),
    'adamw': lambda: optax.adamw(0.01, weight_decay=0.05),
    'adamw_on_plateau': lambda: class_steps.on_plateau(
      optax.adamw(0.01, weight_decay=0.05), class_steps.plateau_schedule(0.5, 1)
    ),
  }[optimizer]
  mean, std = (0.49, 0.45), (0.2, 0.35)
  with float64():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(4, 3, 3, 2)))
    grads = [jnp.asarray(rng.normal(size=z.shape)) for _ in range(3)]
    to_pixels = lambda images: images * jnp.asarray(std) + jnp.asarray(mean)
    x = to_pixels(z)
    wrapped, pixel = base.in_pixel_space(make(), mean, std), make()
    wrapped_state, pixel_state = wrapped.init(z), pixel.init(x)
    plain, plain_state = make(), make().init(z)
    plain_z = z
    for g in grads:
      updates, wrapped_state = wrapped.update(g, wrapped_state, z)
      z = optax.apply_updates(z, updates)
      updates, pixel_state = pixel.update(g / jnp.asarray(std), pixel_state, x)
      x = optax.apply_updates(x, updates)
      updates, plain_state = plain.update(g, plain_state, plain_z)
      plain_z = optax.apply_updates(plain_z, updates)
    np.testing.assert_allclose(to_pixels(z), x, rtol=1e-12, atol=1e-12)
    # The state is the pixel optimizer's; stepping z itself is another optimizer.
    assert jax.tree.structure(wrapped_state) == jax.tree.structure(pixel_state)
    assert np.max(np.abs(np.asarray(z - plain_z))) > 1e-3


def test_the_family_step_takes_pixel_learning_rates():
  """On one channel, SGD at lr on the pixels is SGD at lr / std^2 on the stored normalised
  images: the step's image_space reaches its optimizer (and its state)."""
  dataset = _constant_classes()
  (std,) = dataset.std
  images = {}
  for space, lr in (('pixel', 0.5), ('normalized', 0.5 / std**2), ('normalized', 0.5)):
    settings = _settings(factor=2, image_space=space, lr=lr)
    step, state, sampler = _step(settings, dataset)
    for _ in range(2):
      state, _ = step(state, sampler)
    images[space, lr] = np.asarray(state.images)
  np.testing.assert_allclose(
    images['pixel', 0.5], images['normalized', 0.5 / std**2], rtol=1e-5, atol=1e-5
  )
  assert np.max(np.abs(images['pixel', 0.5] - images['normalized', 0.5])) > 1e-3


@pytest.mark.parametrize('method', ['dm', 'idm', 'm3d', 'dance', 'ncfm', 'dsdm'])
def test_the_family_steps_pixels_and_dm_idm_their_stored_images(method):
  config = config_lib.default_config()
  presets.set_method(config, method, 'default')
  assert config.distill.image_space == ('normalized' if method in ('dm', 'idm') else 'pixel')


def test_clip_to_pixels_in_normalised_units():
  images = jnp.asarray([[[[-5.0]]], [[[0.1]]], [[[7.0]]]])
  clipped = family.clip_to_pixels(images, (0.5,), (0.25,))
  np.testing.assert_allclose(np.asarray(clipped).ravel(), [-2.0, 0.1, 2.0])


def test_dance_matches_an_interpolated_member_and_calibrates_with_its_final_weights(
  tiny_dataset, pool
):
  pool = dataclasses.replace(pool, settings=TINY_POOL)
  source, params = family.interpolated_pool(pool.net, pool, members=2)
  key_data = jax.random.key_data(jax.random.key(3))
  networks = jax.jit(source)(key_data, jnp.int32(7), params)
  key = keys_lib.stream(keys_lib.step_key(key_data, 7), 'pool_member')
  member_key, lam_key = jax.random.split(key)
  member = int(jax.random.randint(member_key, (), 0, 2))
  lam = float(jax.random.uniform(lam_key))
  initial = pool_lib.initial_variables(TINY_POOL, pool.net, tiny_dataset.image_shape, 0, 2)
  final = jax.tree_util.tree_map(lambda x: x[member], pool.variables)
  for ours, theirs in zip(
    jax.tree_util.tree_leaves(networks.expert), jax.tree_util.tree_leaves(final)
  ):
    np.testing.assert_array_equal(ours, theirs)
  for matched, start, end in zip(
    jax.tree_util.tree_leaves(networks.matching),
    jax.tree_util.tree_leaves(initial),
    jax.tree_util.tree_leaves(final),
  ):
    np.testing.assert_allclose(matched, lam * start[member] + (1 - lam) * end, rtol=1e-5)


def test_the_calibration_pass_takes_its_own_steps_on_the_experts_cross_entropy(tiny_dataset, pool):
  pool = dataclasses.replace(pool, settings=TINY_POOL)
  settings = _settings(model=TINY_POOL.model, batch_real=4, lr=0.5, momentum=0.0)
  source, params = family.interpolated_pool(pool.net, pool, members=2)
  after = {}
  for passes in (0, 1):
    calibrated = dataclasses.replace(settings, calibration_passes=passes)
    step, state, sampler = _step(calibrated, tiny_dataset, networks=source, network_params=params)
    after[passes], metrics = step(state, sampler)
    assert ('calibration' in metrics) == bool(passes)
  assert float(metrics['calibration']) > 0
  # Without momentum, the difference is the calibration steps alone: -lr * their gradients,
  # which lower the expert's cross-entropy on the (un-augmented) decoded images.
  expert = source(state.key, state.step, params).expert  # the step's drawn member

  def cross_entropy(images):
    logits = pool.net.apply(expert, images)
    return float(jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(3), jnp.arange(3)]))

  assert not np.allclose(after[0].images, after[1].images)
  assert cross_entropy(after[1].images) < cross_entropy(after[0].images)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'model.name': 'ConvNetBN'}, 'has batch norm'),
    ({'family.factor': 3}, r'family.factor=3 .* 8x8'),
    ({'augment.strategy': 'color_blur'}, r'augment.strategy.*unknown IDC DiffAug op'),
    ({'distill.init': 'pixels'}, r'distill.init'),
  ],
)
def test_bad_family_settings_are_refused_naming_the_field(overrides, message, tmp_path):
  from dd_jax import run as run_lib

  config = make_tiny_config(method='m3d', **overrides)
  with pytest.raises(ValueError, match=message):
    settings = experiment.validate_config(config)
    run_lib.prepare_data(settings)


def test_dance_refuses_a_pool_of_another_network():
  config = make_tiny_config(method='dance', **{'pool.model': 'ConvNet', 'pool.size': 5})
  with pytest.raises(ValueError, match=r"config.pool.model='ConvNet'.*config.model.name"):
    experiment.validate_config(config)


def test_mix_init_tiles_the_first_images_of_each_class(tiny_dataset):
  settings = _settings(init='mix', factor=2, ipc=1)
  images, labels = methods.get('m3d').initial_images(settings, tiny_dataset, jax.random.key(0))
  np.testing.assert_array_equal(labels, [0, 1, 2])
  first = family.first_images_per_class(tiny_dataset, 4)
  for c in range(3):
    np.testing.assert_array_equal(
      first[c],
      tiny_dataset.normalize(
        tiny_dataset.train_images[np.flatnonzero(tiny_dataset.train_labels == c)[:4]]
      ),
    )
    # Quadrant k (row-major) holds the class's k-th image, every second pixel.
    np.testing.assert_allclose(images[c, :4, 4:], first[c, 1, ::2, ::2], rtol=1e-6)
    np.testing.assert_allclose(images[c, 4:, :4], first[c, 2, ::2, ::2], rtol=1e-6)

"""NCFM's and DSDM's pieces on the family step that the method-generic tier does not check: the
min-max step of NCFM's sampling network, DSDM's prototype schedule, the plateau schedule of the
image lr, the fixed real subset and the image optimizers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_POOL

from dd_jax import data as data_lib
from dd_jax import keys as keys_lib
from dd_jax import losses, models
from dd_jax import lowering as lowering_lib
from dd_jax.distill import base, class_steps, dsdm, family, ncfm

NO_CONSTRAINTS = losses.ObjectiveWeights(cc=0.0, cm=0.0)
COMMON = dict(
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


def _family_run(settings, dataset, matcher, networks=None, network_params=None, classes=None):
  """(step, state, sampler) of the family step with `matcher` on `dataset`'s first image of
  each class (of its first `classes` classes: one class makes an iteration one class step)."""
  classes = classes or dataset.num_classes
  labels = np.asarray(dataset.train_labels)
  keep = labels < classes
  sampler = data_lib.ClassSampler.create(dataset.train_images[keep], labels[keep], classes)
  spec = dataclasses.replace(base.DataSpec.of(dataset), num_classes=classes)
  net = models.get_network(settings.model, dataset.num_classes)
  networks = networks or family.random_networks(net, spec.image_shape, 1)
  step = family.make_family_step(
    net, settings, spec, lowering_lib.CPU, networks, matcher=matcher, network_params=network_params
  )
  first = [int(np.flatnonzero(labels == k)[0]) for k in range(classes)]
  images = np.asarray(dataset.normalize(dataset.train_images[first]))
  state = base.init_state(
    images, np.arange(classes), settings.image_optimizer(spec), jax.random.key(0)
  )
  dim = family.feature_dim(net, spec.image_shape)
  matcher_state = matcher.init_state(dim, classes, jax.random.key(1))
  state = family.FamilyState(
    **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
    matcher_state=matcher_state,
  )
  return step, state, sampler


def _squared_norm(a, b):
  return sum(
    float(jnp.sum(jnp.square(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def test_the_min_max_step_descends_the_images_and_ascends_the_sampling_network(tiny_dataset):
  """One class, one iteration: the images take a gradient-descent step and the sampling network
  a gradient-ascent step on the same loss, both from the pre-step point. Checked to first order
  against two separate steps: the match loss (the step's metric, at the state's point and keys)
  changes by -lr_S ||g_S||^2 when only the images move and by +lr_psi ||g_psi||^2 when only the
  network moves, with ||g|| read off each step's displacement."""
  image_lr, net_lr = 1e-4, 1e-5
  settings = ncfm.NCFMSettings(
    **COMMON, sampling_net=True, sampling_lr=net_lr, sampling_momentum=0.0
  )
  settings = dataclasses.replace(settings, lr=image_lr, momentum=0.0)
  step, state, sampler = _family_run(settings, tiny_dataset, ncfm.CFMatcher(settings), classes=1)
  moved, metrics = step(state, sampler)
  loss = float(metrics['match'])
  params, new_params = state.matcher_state[0], moved.matcher_state[0]
  image_move = _squared_norm(moved.images, state.images)
  net_move = _squared_norm(new_params, params)
  assert image_move > 0 and net_move > 0

  only_images = state.replace(images=moved.images)
  only_net = state.replace(matcher_state=(new_params, state.matcher_state[1]))
  images_change = float(step(only_images, sampler)[1]['match']) - loss
  net_change = float(step(only_net, sampler)[1]['match']) - loss
  # Descent: -lr ||g||^2 = -||displacement||^2 / lr; ascent: +||displacement||^2 / lr.
  assert images_change == pytest.approx(-image_move / image_lr, rel=0.1)
  assert net_change == pytest.approx(net_move / net_lr, rel=0.1)


def test_without_the_sampling_network_the_frequencies_are_gaussian_per_class_step():
  settings = ncfm.NCFMSettings(**COMMON, num_frequencies=6)
  matcher = ncfm.CFMatcher(settings)
  assert matcher.init_state(5, 2, jax.random.key(0)) == () and not matcher.ascends
  context = family.ClassContext(jax.random.key(3), jnp.int32(1), jnp.int32(0), ())
  frequencies = matcher.frequencies(5, context, None)
  np.testing.assert_array_equal(frequencies, keys_lib.normal(jax.random.key(3), (6, 5)))


def test_the_sampling_network_proposes_its_rows_in_the_open_unit_interval():
  params = ncfm.sampling_net_init(jax.random.key(0), 16)
  assert params['weight0'].shape == (16, 16)
  assert float(jnp.max(jnp.abs(params['weight0']))) <= 1 / 4  # PyTorch's U(+-1/sqrt(fan_in))
  rows = ncfm.sampling_net_apply(params, jax.random.key(1), rows=4)
  assert rows.shape == (4, 16) and float(jnp.max(jnp.abs(rows))) < 1
  # Batch norm over the rows (training mode): every column of the last block's input is
  # normalised over the 4 rows, so the rows differ.
  assert float(jnp.min(jnp.std(rows, axis=0))) > 1e-3
  many = ncfm.sampling_net_apply(params, jax.random.key(1), rows=1024)
  assert many.shape == (1024, 16)


def test_the_dsdm_prototype_term_acts_only_after_its_start(tiny_dataset, pool):
  """prototype_start 1: iterations 0 and 1 have no prototype term whatever its weight; at 2 it
  acts. The prototypes are the mean features at iteration 0 (momentum 1 then keeps them)."""
  pool = dataclasses.replace(pool, settings=TINY_POOL)
  source, params = family.final_pool(pool.net, pool, members=2)
  common = {**COMMON, 'model': TINY_POOL.model, 'factor': 2}
  histories, prototypes = {}, {}
  for weight in (0.0, 1e4):
    settings = dsdm.DSDMSettings(
      **common, prototype_weight=weight, prototype_start=1, prototype_momentum=1.0
    )
    step, state, sampler = _family_run(
      settings, tiny_dataset, dsdm.PrototypeMatcher(settings), source, params
    )
    history = []
    for _ in range(3):
      state, metrics = step(state, sampler)
      history.append(float(metrics['match']))
      prototypes.setdefault(weight, []).append(np.asarray(state.matcher_state))
    histories[weight] = history
  np.testing.assert_allclose(histories[1e4][:2], histories[0.0][:2], rtol=1e-6)
  assert histories[1e4][2] > histories[0.0][2] * 1.01
  first, second, _ = prototypes[0.0]
  assert first.shape == (3, family.feature_dim(pool.net, tiny_dataset.image_shape))
  assert np.abs(first).max() > 0  # set from the features at iteration 0
  np.testing.assert_array_equal(second, first)  # momentum 1: kept


def test_the_dsdm_prototypes_move_by_their_moving_average():
  settings = dsdm.DSDMSettings(**{**COMMON, 'factor': 2}, prototype_momentum=0.99)
  matcher = dsdm.PrototypeMatcher(settings)
  state = matcher.init_state(3, 2, jax.random.key(0))
  features = jnp.arange(24.0).reshape(2, 4, 3)  # [K, n, D]
  first = matcher.after_classes(state + 5.0, jnp.int32(0), lambda key: features, None)
  np.testing.assert_allclose(first, jnp.mean(features, axis=1))  # t = 0: set, not averaged
  later = matcher.after_classes(first, jnp.int32(1), lambda key: 2 * features, None)
  np.testing.assert_allclose(later, 0.01 * 2 * jnp.mean(features, axis=1) + 0.99 * first)


def test_dsdm_refuses_a_single_synthetic_image_per_class(tiny_config):
  from dd_jax.distill import methods

  config = tiny_config(method='dsdm', ipc=1, **{'family.factor': 1, 'pool.model': 'ConvNetW32'})
  with pytest.raises(ValueError, match=r'^config.family.factor=1 .*covariance'):
    methods.get('dsdm').settings(config)
  config = tiny_config(
    method='dsdm', **{'dsdm.prototype_momentum': 1.5, 'pool.model': 'ConvNetW32'}
  )
  with pytest.raises(ValueError, match=r'^config.dsdm.prototype_momentum=1.5 must be <= 1'):
    methods.get('dsdm').settings(config)
  config = tiny_config(method='ncfm', **{'ncfm.num_frequencies': 0, 'pool.model': 'ConvNetW32'})
  with pytest.raises(ValueError, match=r'^config.ncfm.num_frequencies=0 must be > 0'):
    methods.get('ncfm').settings(config)


def test_the_plateau_schedule_follows_pytorchs_reduce_on_plateau():
  """PyTorch's ReduceLROnPlateau(factor 0.5, patience 2), hand-run: best 5 then 4; the 3rd call
  without improvement (> patience) halves the lr, and the count restarts."""
  schedule = class_steps.plateau_schedule(0.5, 2)
  optimizer = class_steps.on_plateau(optax.sgd(1.0), schedule)
  params = jnp.zeros(3)
  state = optimizer.init(params)
  scales = []
  for loss in (5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0):
    updates, state = optimizer.update(jnp.ones(3), state, params)
    scales.append(float(-updates[0]))
    state = class_steps.end_iteration(state, jnp.float32(loss), schedule)
  # The update of iteration t uses the scale after iteration t - 1.
  assert scales == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
  # 4 * (1 - 1e-4) is the threshold: 3.9999 does not count as an improvement.
  state = optimizer.init(params)
  for loss in (4.0, 3.9999, 3.9999, 3.9999):
    state = class_steps.end_iteration(state, jnp.float32(loss), schedule)
  assert float(state.plateau.scale) == 0.5


def test_the_family_step_steps_the_plateau_once_per_iteration(tiny_dataset):
  settings = family.FamilySettings(**COMMON, plateau_factor=0.5, plateau_patience=0)
  step, state, sampler = _family_run(settings, tiny_dataset, family.Matcher())
  scales = []
  for _ in range(3):
    state, metrics = step(state, sampler)
    scales.append(float(metrics['lr_scale']))
  # Patience 0: every iteration that does not beat the best halves the lr (the first sets it).
  assert scales[0] == 1.0 and all(b in (a, a / 2) for a, b in zip(scales, scales[1:]))
  assert isinstance(state.opt_state, class_steps.PlateauState)


def test_fixed_real_takes_the_first_images_of_every_class(tiny_dataset):
  sampler = data_lib.ClassSampler.from_dataset(tiny_dataset)
  firsts = np.asarray(data_lib.first_of_all_classes(sampler, 2))
  labels = np.asarray(tiny_dataset.train_labels)
  for k in range(tiny_dataset.num_classes):
    np.testing.assert_array_equal(firsts[k], tiny_dataset.train_images[labels == k][:2])
  with pytest.raises(data_lib.DataError, match='smallest class'):
    data_lib.first_of_all_classes(sampler, 100)


def test_the_image_optimizers_follow_pytorchs_updates():
  params, grad = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 0.5])
  spec = base.DataSpec(num_classes=1, image_shape=(2,), mean=(0.0,), std=(1.0,))
  sgd = family.FamilySettings(
    **{**COMMON, 'lr': 0.1, 'momentum': 0.0}, weight_decay=0.01, image_space='normalized'
  )
  optimizer = sgd.image_optimizer(spec)
  updates, _ = optimizer.update(grad, optimizer.init(params), params)
  np.testing.assert_allclose(params + updates, params - 0.1 * (grad + 0.01 * params), rtol=1e-6)
  adamw = family.FamilySettings(
    **{**COMMON, 'lr': 0.1}, optimizer='adamw', weight_decay=0.01, image_space='normalized'
  )
  optimizer = adamw.image_optimizer(spec)
  updates, _ = optimizer.update(grad, optimizer.init(params), params)
  # First AdamW step: p (1 - lr wd) - lr g / (|g| + eps).
  expected = params * (1 - 0.1 * 0.01) - 0.1 * grad / (jnp.abs(grad) + 1e-8)
  np.testing.assert_allclose(params + updates, expected, rtol=1e-6)

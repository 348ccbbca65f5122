"""The DM step (dd_jax.distill.dm) on digits: compile once, extractors, networks, batch norm."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import data as data_lib
from dd_jax import extractors, losses, models
from dd_jax import keys as keys_lib
from dd_jax.distill import base, dm
from dd_jax.lowering import CPU
from dd_jax.models.kernels import ConvLowering

STRATEGY = 'color_crop_cutout_scale_rotate'


def _settings(**fields):
  defaults = dict(
    ipc=2,
    batch_real=8,
    strategy=STRATEGY,
    model='ConvNetW32',
    lr=1.0,
    momentum=0.5,
    weights=losses.ObjectiveWeights.reference_iid(),
  )
  return base.DistillSettings(**{**defaults, **fields})


def _setup(digits, net=None, extractor=extractors.matching_net_extractor, lowering=CPU, **fields):
  settings = _settings(**fields)
  net = net or models.get_network('ConvNetW32', digits.num_classes)
  step = dm.make_dm_step(net, settings, base.DataSpec.of(digits), lowering, extractor)
  labels = np.repeat(np.arange(digits.num_classes), settings.ipc)
  images = jax.random.normal(jax.random.key(0), (len(labels), 8, 8, 1))
  spec = base.DataSpec.of(digits)
  state = base.init_state(images, labels, settings.image_optimizer(spec), jax.random.key(1))
  return step, state, data_lib.ClassSampler.from_dataset(digits)


def test_step_compiles_once_and_updates_images(digits):
  chex.clear_trace_counter()

  # Called once per trace of the step (the step calls its extractor once per trace).
  @chex.assert_max_traces(n=1)
  def features(params, key, syn_images, matching_features):
    del params, key, syn_images
    return matching_features

  step, state, sampler = _setup(digits, extractor=extractors.Extractor('counting', features))
  initial = state.images
  for _ in range(5):
    state, metrics = step(state, sampler)
  assert int(state.step) == 5
  assert not np.allclose(state.images, initial)
  for name in ('loss', 'match', 'cc', 'cm', 'grad_norm'):
    assert np.isfinite(float(metrics[name])), name
  np.testing.assert_allclose(
    metrics['loss'], metrics['match'] + 0.05 * metrics['cc'] + 0.01 * metrics['cm'], rtol=1e-5
  )


def test_cc_uses_the_pluggable_extractor(digits):
  outputs = {}
  # The params travel into the jitted step as an argument: 'scaled' reads its factor there.
  for name, extractor in [
    ('matching', extractors.matching_net_extractor),
    ('scaled', extractors.Extractor('scaled', lambda p, k, x, f: p * f, jnp.asarray(2.0))),
    ('constant', extractors.Extractor('constant', lambda p, k, x, f: jnp.zeros_like(f))),
  ]:
    step, state, sampler = _setup(digits, extractor=extractor)
    outputs[name] = step(state, sampler)[1]
  np.testing.assert_allclose(outputs['scaled']['cc'], 4.0 * outputs['matching']['cc'], rtol=1e-4)
  assert float(outputs['constant']['cc']) == 0.0
  np.testing.assert_allclose(outputs['constant']['match'], outputs['matching']['match'], rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class _FixedKeyNetwork(models.Network):
  """A network whose `init` ignores the key it is given and uses `key_data` instead."""

  key_data: tuple[int, ...] = ()

  def init(self, key, input_shape):
    del key
    fixed = jax.random.wrap_key_data(jnp.asarray(self.key_data, jnp.uint32))
    return super().init(fixed, input_shape)


def test_num_nets_is_the_mean_of_single_network_steps_with_the_same_networks(digits):
  """A step matching 3 networks equals the mean of three one-network steps, each given one of
  those networks (same real batch, augmentation and state): terms and image update."""
  net = models.get_network('ConvNetW32', digits.num_classes)
  step, state, sampler = _setup(digits, net=net, num_nets=3)
  three_state, three = step(state, sampler)
  step_key = keys_lib.step_key(state.key, state.step)
  network_keys = jax.random.split(keys_lib.stream(step_key, 'networks'), 3)
  singles = []
  for key in network_keys:
    fixed = _FixedKeyNetwork(
      name=net.name, module=net.module, key_data=tuple(int(k) for k in jax.random.key_data(key))
    )
    one_step, _, _ = _setup(digits, net=fixed, num_nets=1)
    singles.append(one_step(state, sampler))
  for name in ('loss', 'match', 'cc', 'cm'):
    values = [float(metrics[name]) for _, metrics in singles]
    assert len(set(np.round(values, 3))) == 3, name  # three different networks
    np.testing.assert_allclose(float(three[name]), np.mean(values), rtol=1e-5)
  # SGD from a zero momentum buffer: the update is -lr * gradient, and gradients average too.
  mean_update = np.mean([np.asarray(s.images - state.images) for s, _ in singles], axis=0)
  np.testing.assert_allclose(
    np.asarray(three_state.images - state.images), mean_update, rtol=1e-4, atol=1e-6
  )


def test_batchnorm_step_pools_all_classes_statistics(digits):
  """With batch norm, the real images of all classes form one batch (and the synthetic images
  another): the DM term equals one computed with explicitly pooled statistics, and differs from
  per-class statistics."""
  net = models.get_network('ConvNetBN', digits.num_classes)
  assert net.has_batch_stats
  spec = base.DataSpec.of(digits)
  settings = dataclasses.replace(
    _settings(batch_real=4, strategy='none'), weights=losses.ObjectiveWeights(cc=0.0, cm=0.0)
  )
  step = dm.make_dm_step(net, settings, spec, CPU)
  images = jax.random.normal(jax.random.key(0), (20, 8, 8, 1))
  state = base.init_state(
    images, np.repeat(np.arange(10), 2), settings.image_optimizer(spec), jax.random.key(1)
  )
  sampler = data_lib.ClassSampler.from_dataset(digits)
  _, metrics = step(state, sampler)

  step_key = keys_lib.step_key(state.key, state.step)
  variables = net.init(jax.random.split(keys_lib.stream(step_key, 'networks'), 1)[0], (1, 8, 8, 1))
  real = data_lib.normalize(
    data_lib.sample_all_classes(sampler, keys_lib.stream(step_key, 'real'), 4), spec.mean, spec.std
  )  # [10, 4, 8, 8, 1]
  syn = images.reshape(10, 2, 8, 8, 1)
  embed = lambda x: net.embed(variables, x, train=True)[0]

  def dm_term(real_features, syn_features):
    return sum(float(losses.mean_matching(r, s)) for r, s in zip(real_features, syn_features))

  pooled = dm_term(
    embed(real.reshape(40, 8, 8, 1)).reshape(10, 4, -1),
    embed(syn.reshape(20, 8, 8, 1)).reshape(10, 2, -1),
  )
  per_class = dm_term([embed(r) for r in real], [embed(s) for s in syn])
  np.testing.assert_allclose(float(metrics['match']), pooled, rtol=1e-5)
  assert abs(per_class - pooled) > 1e-3 * abs(pooled)


def test_ipc1_constraints_vanish(digits):
  """At IPC 1 the synthetic covariance is 0 and CC is 0, so DM + IID == DM."""
  results = []
  for weights in (losses.ObjectiveWeights.reference_iid(), losses.ObjectiveWeights()):
    settings = dataclasses.replace(_settings(ipc=1, strategy='none'), weights=weights)
    step = dm.make_dm_step(
      models.get_network('ConvNetW32', 10), settings, base.DataSpec.of(digits), CPU
    )
    state = base.init_state(
      jax.random.normal(jax.random.key(0), (10, 8, 8, 1)),
      np.arange(10),
      settings.image_optimizer(base.DataSpec.of(digits)),
      jax.random.key(1),
    )
    results.append(step(state, data_lib.ClassSampler.from_dataset(digits)))
  (with_iid, metrics), (plain, _) = results
  assert float(metrics['cc']) == 0.0
  np.testing.assert_allclose(with_iid.images, plain.images, rtol=1e-6, atol=1e-6)


def test_fast_real_embedding_equals_the_straightforward_one(digits):
  """XLA convolutions with the real batch in chunks of 4 == im2col one class at a time."""
  outcomes = []
  for impl, real_chunk in (('im2col', 8), ('xla', 4), ('xla', 16)):
    net = models.get_network('ConvNetW32', digits.num_classes, conv=ConvLowering(impl))
    step, state, sampler = _setup(digits, net=net, real_chunk=real_chunk)
    for _ in range(2):
      state, metrics = step(state, sampler)
    outcomes.append((np.asarray(state.images), {k: float(v) for k, v in metrics.items()}))
  (images, metrics), *fast = outcomes
  for fast_images, fast_metrics in fast:
    np.testing.assert_allclose(fast_images, images, atol=2e-5)
    for name, value in metrics.items():
      assert fast_metrics[name] == pytest.approx(value, rel=2e-5), name
  with pytest.raises(ValueError, match='real_chunk=3 must divide the 10 x 8 real images'):
    dm.make_dm_step(
      models.get_network('ConvNetW32', 10), _settings(real_chunk=3), base.DataSpec.of(digits), CPU
    )


def test_synthetic_images_in_chunks_equal_one_pass(digits):
  """Synthetic images embedded (and differentiated) in unrolled chunks == all at once."""
  outcomes = []
  for syn_chunk in (40, 4, 20):  # 10 classes x ipc 4: one pass, 10 chunks, 2 chunks
    step, state, sampler = _setup(digits, ipc=4, syn_chunk=syn_chunk)
    for _ in range(2):
      state, metrics = step(state, sampler)
    outcomes.append((np.asarray(state.images), {k: float(v) for k, v in metrics.items()}))
  (images, metrics), *chunked = outcomes
  for chunked_images, chunked_metrics in chunked:
    np.testing.assert_allclose(chunked_images, images, atol=2e-5)
    for name, value in metrics.items():
      assert chunked_metrics[name] == pytest.approx(value, rel=2e-5), name
  with pytest.raises(ValueError, match='syn_chunk=3 must divide the 10 x 2 synthetic images'):
    dm.make_dm_step(
      models.get_network('ConvNetW32', 10), _settings(syn_chunk=3), base.DataSpec.of(digits), CPU
    )


def test_synthetic_images_fold_their_first_norm_into_their_first_convolution(digits):
  """The CPU lowering's synthetic images (not the real ones) take the first layer as
  `kernels.conv_instance_norm`: two XLA convolutions fewer per synthetic chunk in the traced
  step, and the same step as without the fold to float rounding."""
  net = models.get_network('ConvNetW32', digits.num_classes)
  outcomes = []
  for fold in (True, False):
    lowering = dataclasses.replace(CPU, synthetic_conv=ConvLowering('xla', fold_norm=fold))
    step, state, sampler = _setup(digits, net=net, lowering=lowering, syn_chunk=4)
    jaxpr = str(jax.make_jaxpr(step.jitted)(*step.arguments(state, sampler)))
    for _ in range(2):
      state, metrics = step(state, sampler)
    outcomes.append((jaxpr.count('conv_general_dilated'), np.asarray(state.images), dict(metrics)))
  (folded_convs, images, metrics), (plain_convs, plain_images, plain_metrics) = outcomes
  # Per synthetic chunk (5 of 4 images): the first convolution's forward and image gradient.
  assert plain_convs - folded_convs == 2 * 5
  np.testing.assert_allclose(images, plain_images, atol=2e-5)
  for name, value in plain_metrics.items():
    assert float(metrics[name]) == pytest.approx(float(value), rel=2e-5), name


@pytest.mark.parametrize(
  'ipc, classes, expected', [(1, 10, 10), (10, 10, 50), (50, 10, 50), (50, 100, 500), (7, 3, 21)]
)
def test_default_synthetic_chunk_on_cpu(ipc, classes, expected):
  # At most 64 images per pass, or a tenth of them: never more than 10 unrolled passes.
  assert dm.resolve_syn_chunk(_settings(ipc=ipc), classes, CPU) == expected


def test_siamese_augmentation_is_shared_by_real_and_synthetic_images_of_a_class(digits):
  """The step applies one DSA draw per class to both sides: with identical real and synthetic
  images the DM term is exactly 0 under any augmentation."""
  sampler = data_lib.ClassSampler.from_dataset(digits)
  settings = dataclasses.replace(
    _settings(ipc=4, batch_real=4), weights=losses.ObjectiveWeights(cc=0.0, cm=0.0)
  )
  spec = base.DataSpec.of(digits)
  state = base.init_state(
    jnp.zeros((40, 8, 8, 1)),
    np.repeat(np.arange(10), 4),
    settings.image_optimizer(spec),
    jax.random.key(3),
  )
  step_key = keys_lib.step_key(state.key, state.step)
  real = data_lib.normalize(
    data_lib.sample_all_classes(sampler, keys_lib.stream(step_key, 'real'), 4), spec.mean, spec.std
  )
  state = state.replace(images=real.reshape(40, 8, 8, 1))
  step = dm.make_dm_step(models.get_network('ConvNetW32', 10), settings, spec, CPU)
  assert float(step(state, sampler)[1]['match']) == pytest.approx(0.0, abs=1e-8)

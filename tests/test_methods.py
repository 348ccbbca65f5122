"""The method-generic tier: every registered method, built through the `Method` interface only.

A method registered in `dd_jax.distill.methods` gets these checks without writing a test:
compile once, determinism, host/device key agreement, checkpoint resume, and the accelerator
lowering (run on CPU) against the CPU lowering. `LinearMMD` below is a method defined in this
file alone (no library edit): DM with its mean matching swapped for a linear-kernel MMD.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_POOL

from dd_jax import data as data_lib
from dd_jax import experiment, extractors, models
from dd_jax import keys as keys_lib
from dd_jax import lowering as lowering_lib
from dd_jax import pool as pool_lib
from dd_jax import run as run_lib
from dd_jax import train as train_lib
from dd_jax.checkpoint import Checkpointer
from dd_jax.distill import base, dm, methods


def linear_mmd(real_features, syn_features):
  """Biased MMD^2 with the linear kernel k(x, y) = x . y, from the Gram matrices.

  Equal to mean matching in exact arithmetic, computed differently (three Gram matrices).
  """
  real = jax.lax.stop_gradient(real_features)
  return (
    jnp.mean(real @ real.T)
    - 2.0 * jnp.mean(real @ syn_features.T)
    + jnp.mean(syn_features @ syn_features.T)
  )


class LinearMMD(dm.DM):
  """DM with a linear-kernel MMD as its matching term; DM's presets."""

  name = 'test_linear_mmd'

  def make_step(
    self, net, settings, spec, lowering, extractor=extractors.matching_net_extractor, mesh=None
  ):
    return dm.make_dm_step(net, settings, spec, lowering, extractor, mesh, match=linear_mmd)


@pytest.fixture(scope='module', autouse=True)
def registered_linear_mmd():
  methods.register(LinearMMD())
  yield
  methods.unregister(LinearMMD.name)


# Every method of the library's registry, the throwaway one, and variants that change what a
# step carries ('<method>+<variant>', settings in VARIANT_SETTINGS).
VARIANT_SETTINGS = {'sampling_net': {'ncfm.sampling_net': True}}
METHODS = (*methods.names(), LinearMMD.name, 'ncfm+sampling_net')
# Steps of each check: a step from each of the first states (IDM pushes at 0, restarts later).
STEPS = 3


@dataclasses.dataclass
class Built:
  """A method's (settings, state, step, sampler) on tiny digits, through the interface only."""

  settings: experiment.ExperimentSettings
  state: object
  step: base.Step
  sampler: data_lib.ClassSampler


# Small settings of the methods that need them: IDM's queue, the pool of DANCE's experts.
TINY_METHOD_SETTINGS = {
  'idm.queue_capacity': 4,
  'idm.train_steps': 2,
  'idm.train_batch_size': 32,
  'pool.model': 'ConvNetW32',
  'pool.size': 2,
  'pool.epochs': 1,
  'pool.parallel': 2,
  'family.pool_members': 2,
}
# A method's own small settings: NCFM's loss is scaled by 300, and the shared lr (1) makes its
# tiny run diverge, where rounding differences grow without bound.
TINY_SETTINGS_OF = {'ncfm': {'distill.lr': 0.01, 'ncfm.num_frequencies': 256}}
# Compared on one step across lowerings: NCFM's sampling network ascends the loss the images
# descend, which grows rounding differences step after step (measured on the tiny run: 7e-5
# after one step, 1.5e-2 after three).
ONE_STEP_COMPARED = ('ncfm+sampling_net',)


@pytest.fixture(scope='module', autouse=True)
def pool_cache(tmp_path_factory):
  """Pools (DANCE's experts) are built once per module in a temporary cache."""
  previous = os.environ.get('DD_JAX_CACHE')
  os.environ['DD_JAX_CACHE'] = str(tmp_path_factory.mktemp('cache'))
  yield
  if previous is None:
    del os.environ['DD_JAX_CACHE']
  else:
    os.environ['DD_JAX_CACHE'] = previous


def build(make_config, case, lowering=lowering_lib.CPU, extractor=None, **overrides):
  method, _, variant = case.partition('+')
  overrides = {
    **TINY_METHOD_SETTINGS,
    **TINY_SETTINGS_OF.get(method, {}),
    **VARIANT_SETTINGS.get(variant, {}),
    **overrides,
  }
  config = make_config(method=method, **overrides)
  settings = dataclasses.replace(experiment.validate_config(config), lowering=lowering)
  data = run_lib.prepare_data(settings)
  prepared = run_lib.build_method(settings, data)
  step = prepared.step
  if extractor is not None:
    method_ = settings.method
    net = method_.network(settings.distill, data.dataset.num_classes, lowering)
    pool = {'pool': run_lib.pool_of(settings, data)} if method_.uses_pool else {}
    step = method_.make_step(
      net, settings.distill, base.DataSpec.of(data.dataset), lowering, extractor, **pool
    )
  return Built(settings, prepared.state, step, data.sampler)


def take_steps(built, state=None, steps=STEPS):
  state = built.state if state is None else state
  history = []
  for _ in range(steps):
    state, metrics = built.step(state, built.sampler)
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


@pytest.fixture(scope='module')
def cpu_runs():
  """Each method's state and metrics after STEPS steps on the CPU lowering (shared)."""
  return {}


def cpu_run(cpu_runs, tiny_config, method):
  if method not in cpu_runs:
    built = build(tiny_config, method)
    cpu_runs[method] = (built, *take_steps(built))
  return cpu_runs[method]


@pytest.mark.parametrize('method', METHODS)
def test_step_compiles_once_and_moves_the_images(method, tiny_config, cpu_runs):
  built, state, history = cpu_run(cpu_runs, tiny_config, method)
  assert int(state.step) == STEPS
  assert built.step.jitted._cache_size() == 1  # traced once for all steps
  assert not np.allclose(state.images, built.state.images)
  for metrics in history:
    assert {'loss', 'match', 'cc', 'cm', 'grad_norm'} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize('method', METHODS)
def test_same_seed_same_images(method, tiny_config, cpu_runs):
  _, state, history = cpu_run(cpu_runs, tiny_config, method)
  again, again_history = take_steps(build(tiny_config, method))
  np.testing.assert_array_equal(again.images, state.images)
  assert again_history == history
  other, _ = take_steps(build(tiny_config, method, seed=1))
  assert not np.allclose(other.images, state.images)


@pytest.mark.parametrize('method', METHODS)
def test_resumed_steps_equal_uninterrupted_ones(method, tiny_config, cpu_runs, tmp_path):
  built, state, history = cpu_run(cpu_runs, tiny_config, method)
  partial, _ = take_steps(built, steps=1)
  checkpointer = Checkpointer(str(tmp_path / 'checkpoints'))
  checkpointer.save(1, partial)
  checkpointer.close()
  fresh = build(tiny_config, method)  # a new process would rebuild its initial state
  restored = Checkpointer(str(tmp_path / 'checkpoints')).restore_latest(fresh.state)
  resumed, resumed_history = take_steps(fresh, restored, steps=STEPS - 1)
  np.testing.assert_array_equal(resumed.images, state.images)
  assert resumed_history == history[1:]


@pytest.mark.parametrize('method', METHODS)
def test_the_host_draws_with_the_keys_the_step_derives(method, tiny_config, cpu_runs):
  """An extractor whose host-side `select` hands the step the CC keys it derived on the host:
  inside the step, features pass unchanged only where those keys equal the step's own."""

  def select(params, keys):
    del params
    return np.asarray(jax.random.key_data(keys))

  def features(selected, key, syn_images, matching_features):
    del syn_images
    same = jnp.all(jax.random.key_data(key) == selected)
    return jnp.where(same, 1.0, 0.0) * matching_features

  checking = extractors.Extractor('key_check', features, params=0, select=select)
  built, _, reference = cpu_run(cpu_runs, tiny_config, method)
  assert built.settings.distill.weights.cc_form == 'squared'  # CC on the features as they are
  checked = take_steps(build(tiny_config, method, extractor=checking))[1]
  assert all(m['cc'] > 0 for m in reference)
  for ours, theirs in zip(checked, reference):
    assert ours['cc'] == pytest.approx(theirs['cc'], rel=1e-5)


@pytest.mark.parametrize('method', METHODS)
def test_accelerator_lowering_equals_the_cpu_lowering(method, tiny_config, cpu_runs):
  """The GPU / TPU programs (XLA convolutions, vmapped networks and classes, whole batches),
  run on CPU: a different program (fewer convolutions rewritten as kernels) with the same
  numbers to float rounding."""
  built, state, history = cpu_run(cpu_runs, tiny_config, method)
  if method in ONE_STEP_COMPARED:
    state, history = take_steps(built, steps=1)
  accelerator = build(tiny_config, method, lowering=lowering_lib.ACCELERATOR)
  accelerated, accelerated_history = take_steps(accelerator, steps=len(history))
  np.testing.assert_allclose(accelerated.images, state.images, rtol=1e-4, atol=1e-4)
  for ours, theirs in zip(accelerated_history, history):
    for name, value in theirs.items():
      assert ours[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name

  def program(b):
    return str(jax.make_jaxpr(b.step.jitted)(*b.step.arguments(b.state, b.sampler)))

  assert program(accelerator) != program(built)  # the lowering is not ignored


def test_linear_mmd_is_mean_matching_computed_otherwise(tiny_config, cpu_runs):
  """The throwaway method's matching term equals DM's to float rounding: the seam passes the
  method's term through (its program has the Gram matrices' products, DM's has not)."""
  mmd, _, mmd_history = cpu_run(cpu_runs, tiny_config, LinearMMD.name)
  mean, _, mean_history = cpu_run(cpu_runs, tiny_config, 'dm')
  for ours, theirs in zip(mmd_history, mean_history):
    assert ours['match'] == pytest.approx(theirs['match'], rel=1e-3, abs=1e-5)

  def products(b):
    jaxpr = jax.make_jaxpr(b.step.jitted)(*b.step.arguments(b.state, b.sampler))
    return str(jaxpr).count('dot_general')

  assert products(mmd) > products(mean)


def test_a_registered_method_runs_resumably_with_its_presets(tmp_path, tiny_config):
  """The throwaway method through the whole run: workdir, export, a finished rerun."""
  config = tiny_config(method=LinearMMD.name)
  results = run_lib.run(config, str(tmp_path / 'run'))
  assert results['base_method'] == LinearMMD.name
  assert results['method'] == 'TEST_LINEAR_MMD + IID (reference)'
  assert run_lib.run(config, str(tmp_path / 'run')) == results


def test_an_incomplete_method_is_refused_at_registration():
  class NoPresets(dm.DM):
    name = 'test_no_presets'
    presets = base.Presets(image_lr=1.0, iid={'reference': dm.DM.presets.iid['reference']})

  with pytest.raises(ValueError, match=r"'test_no_presets' declares incomplete presets.*'default'"):
    methods.register(NoPresets())
  with pytest.raises(ValueError, match="'dm' is registered already"):
    methods.register(dm.DM())
  assert 'test_no_presets' not in methods.names()


def test_keys_come_from_named_run_streams(tiny_config):
  """The initial state's step key is the seed's 'distill' stream, whatever the method."""
  for method in METHODS:
    built = build(tiny_config, method)
    expected = jax.random.key_data(keys_lib.run_key(0, 'distill'))
    np.testing.assert_array_equal(built.state.key, expected)


def test_evaluation_with_the_accelerator_lowering_trains_the_same_networks(digits):
  """3 ConvNets trained together: XLA's convolutions under vmap, whole batches (accelerator)
  against Winograd / im2col with the folded norm, looped, in passes (CPU): the same networks."""
  images = jnp.asarray(digits.normalize(digits.train_images[:60]))
  labels = jnp.asarray(digits.train_labels[:60])
  settings = train_lib.TrainSettings(
    epochs=2,
    recipe=train_lib.OptimizerRecipe(batch_size=20),
    augment_strategy='color_crop_cutout_scale_rotate',
    schedule='reference',
  )
  keys = jax.random.split(jax.random.key(0), 3)
  trained, programs = [], []
  for low in (lowering_lib.CPU, lowering_lib.ACCELERATOR):
    net = models.get_network('ConvNetW32', 10, conv=low.train_conv)
    train = lambda k, net=net, low=low: train_lib.train_networks(
      k, images, labels, net, settings, low
    )
    trained.append(jax.jit(train)(keys))
    programs.append(str(jax.make_jaxpr(train)(keys)))
  for cpu, accelerator in zip(*map(jax.tree_util.tree_leaves, trained)):
    np.testing.assert_allclose(cpu, accelerator, rtol=1e-3, atol=1e-4)
  # Not the same program: the CPU one has no XLA convolution left, the accelerator one no loop
  # over the networks.
  assert 'conv_general_dilated' not in programs[0] and 'conv_general_dilated' in programs[1]


def test_a_pool_built_with_the_accelerator_lowering_has_the_same_members(tiny_dataset, pool):
  """Two members trained together under vmap with XLA's convolutions equal the CPU build's."""
  settings = dataclasses.replace(TINY_POOL, size=2, parallel=2)
  built = pool_lib.train_pool(tiny_dataset, settings, lowering_lib.ACCELERATOR, log=lambda _: None)
  assert built.net.conv == lowering_lib.ACCELERATOR.train_conv != pool.net.conv
  for cpu, accelerator in zip(
    jax.tree_util.tree_leaves(pool.variables), jax.tree_util.tree_leaves(built.variables)
  ):
    np.testing.assert_allclose(np.asarray(cpu)[:2], np.asarray(accelerator), rtol=1e-4, atol=1e-5)

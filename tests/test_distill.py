"""The DM step, the resumable run loop and the baselines table, on tiny digits configs."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dd_jax import compare
from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import losses
from dd_jax import models
from dd_jax.distill import dm
from dd_jax.distill import loop


def tiny_config(**overrides):
  config = config_lib.default_config()
  config.dataset.name = 'digits'
  config.ipc = 2
  config.model.name = 'ConvNetW32'
  config.augment.strategy = 'color_crop_cutout_scale_rotate'
  config.distill.iterations = 6
  config.distill.batch_real = 8
  config.distill.eval_every = 6
  config.distill.checkpoint_every = 2
  config.distill.log_every = 2
  config.eval.model = 'ConvNetW32'
  config.eval.num_eval = 2
  config.eval.epochs = 2
  config.eval.augment_strategy = 'color_crop_cutout_scale_rotate'
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope='module')
def digits():
  return data_lib.load_dataset('digits')


def _step_setup(digits, weights=losses.ObjectiveWeights(), num_nets=1, extractor=None):
  ipc = 2
  net = models.get_network('ConvNetW32', digits.num_classes)
  settings = dm.DMSettings(num_classes=digits.num_classes, ipc=ipc, batch_real=8,
                           num_nets=num_nets, strategy='color_crop_cutout_scale_rotate',
                           weights=weights, mean=digits.mean, std=digits.std)
  optimizer = optax.sgd(1.0, momentum=0.5)
  step = dm.make_dm_step(net, settings, optimizer, extractor or dm.matching_net_extractor)
  labels = np.repeat(np.arange(digits.num_classes), ipc)
  images = jax.random.normal(jax.random.key(0), (len(labels), 8, 8, 1))
  state = dm.init_state(images, labels, optimizer, jax.random.key(1))
  return step, state, data_lib.ClassSampler.from_dataset(digits)


def test_step_traces_once_and_updates_images(digits):
  traces = []

  def counting_features(params, key, syn_images, matching_features):
    traces.append(1)  # runs only while tracing
    return matching_features

  step, state, sampler = _step_setup(
      digits, extractor=dm.CentralizationExtractor('counting', counting_features))
  initial = state.images
  for _ in range(5):
    state, metrics = step(state, sampler)
  assert len(traces) == 1
  assert int(state.step) == 5
  assert not np.allclose(state.images, initial)
  for name in ('loss', 'dm', 'cc', 'cm', 'grad_norm'):
    assert np.isfinite(float(metrics[name])), name
  np.testing.assert_allclose(metrics['loss'],
                             metrics['dm'] + 0.05 * metrics['cc'] + 0.01 * metrics['cm'],
                             rtol=1e-5)


def test_cc_uses_the_pluggable_extractor(digits):
  outputs = {}
  # The params travel into the jitted step as an argument: 'scaled' reads its factor there.
  for name, extractor in [
      ('matching', dm.matching_net_extractor),
      ('scaled', dm.CentralizationExtractor('scaled', lambda p, k, x, f: p * f,
                                            jnp.asarray(2.0))),
      ('constant', dm.CentralizationExtractor('constant',
                                              lambda p, k, x, f: jnp.zeros_like(f)))]:
    step, state, sampler = _step_setup(digits, extractor=extractor)
    outputs[name] = step(state, sampler)[1]
  np.testing.assert_allclose(outputs['scaled']['cc'], 4.0 * outputs['matching']['cc'], rtol=1e-4)
  assert float(outputs['constant']['cc']) == 0.0
  np.testing.assert_allclose(outputs['constant']['dm'], outputs['matching']['dm'], rtol=1e-6)


def test_num_nets_averages_over_independent_networks(digits):
  step_one, state, sampler = _step_setup(digits, num_nets=1)
  step_three, _, _ = _step_setup(digits, num_nets=3)
  one = step_one(state, sampler)[1]
  three = step_three(state, sampler)[1]
  assert np.isfinite(float(three['loss']))
  assert not np.isclose(float(one['dm']), float(three['dm']))


def test_batchnorm_backbone_runs_all_classes_together(digits):
  net = models.get_network('ConvNetBN', digits.num_classes)
  assert net.has_batch_stats
  settings = dm.DMSettings(num_classes=digits.num_classes, ipc=2, batch_real=4, num_nets=1,
                           strategy='none', weights=losses.ObjectiveWeights(cc=0.0, cm=0.0),
                           mean=digits.mean, std=digits.std)
  optimizer = optax.sgd(1.0)
  step = dm.make_dm_step(net, settings, optimizer)
  images = jax.random.normal(jax.random.key(0), (20, 8, 8, 1))
  state = dm.init_state(images, np.repeat(np.arange(10), 2), optimizer, jax.random.key(1))
  _, metrics = step(state, data_lib.ClassSampler.from_dataset(digits))
  assert np.isfinite(float(metrics['dm'])) and float(metrics['dm']) > 0


def test_ipc1_constraints_vanish(digits):
  """SPEC 4.2: at IPC 1 the synthetic covariance is 0 and CC is 0, so DM + IID == DM."""
  net = models.get_network('ConvNetW32', digits.num_classes)
  results = []
  for weights in (losses.ObjectiveWeights(), losses.ObjectiveWeights(cc=0.0, cm=0.0)):
    settings = dm.DMSettings(num_classes=10, ipc=1, batch_real=8, num_nets=1, strategy='none',
                             weights=weights, mean=digits.mean, std=digits.std)
    optimizer = optax.sgd(1.0, momentum=0.5)
    step = dm.make_dm_step(net, settings, optimizer)
    state = dm.init_state(jax.random.normal(jax.random.key(0), (10, 8, 8, 1)), np.arange(10),
                          optimizer, jax.random.key(1))
    results.append(step(state, data_lib.ClassSampler.from_dataset(digits)))
  (with_iid, metrics), (plain, _) = results
  assert float(metrics['cc']) == 0.0
  np.testing.assert_allclose(with_iid.images, plain.images, rtol=1e-6, atol=1e-6)


def test_run_writes_workdir_and_resumes_to_the_same_synthetic_set(tmp_path, monkeypatch):
  config = tiny_config()
  reference = loop.run(config, str(tmp_path / 'uninterrupted'))
  assert set(reference['eval']) >= {'accuracies', 'mean', 'std'}
  workdir = tmp_path / 'uninterrupted'
  for name in ('config.json', 'metrics.jsonl', 'synthetic.npz', 'results.json',
               'images/step_000006.png'):
    assert (workdir / name).exists(), name
  exported = np.load(workdir / 'synthetic.npz')
  assert exported['images'].shape == (20, 8, 8, 1)
  assert 0.0 <= exported['images'].min() and exported['images'].max() <= 1.0
  np.testing.assert_array_equal(exported['labels'], np.repeat(np.arange(10), 2))
  assert list(exported['class_names']) == [str(i) for i in range(10)]

  # Crash after the checkpoint of step 4 (at step 5), then rerun the same command.
  real_make_step = dm.make_dm_step

  def crashing_make_step(*args, **kwargs):
    step = real_make_step(*args, **kwargs)

    def wrapped(state, sampler):
      if int(state.step) == 4:
        raise KeyboardInterrupt('simulated kill')
      return step(state, sampler)
    return wrapped

  monkeypatch.setattr(dm, 'make_dm_step', crashing_make_step)
  with pytest.raises(KeyboardInterrupt):
    loop.run(config, str(tmp_path / 'resumed'))
  assert not (tmp_path / 'resumed' / 'synthetic.npz').exists()
  monkeypatch.setattr(dm, 'make_dm_step', real_make_step)
  resumed = loop.run(config, str(tmp_path / 'resumed'))
  np.testing.assert_array_equal(np.load(tmp_path / 'resumed' / 'synthetic.npz')['images'],
                                exported['images'])
  assert resumed['eval']['accuracies'] == reference['eval']['accuracies']
  steps = [m['step'] for m in loop.workdir_lib.read_metrics(
      str(tmp_path / 'resumed' / 'metrics.jsonl')) if 'loss' in m]
  assert steps == [2, 4, 6]  # no duplicated lines after the resume

  # A finished run is not recomputed (also when only the tabulated baselines change); a
  # different config is refused.
  assert loop.run(config, str(workdir)) == reference
  assert loop.run(tiny_config(**{'compare.full_train_epochs': 3}), str(workdir)) == reference
  with pytest.raises(ValueError, match=r'different config[\s\S]*ipc: 2 -> 3'):
    loop.run(tiny_config(ipc=3), str(workdir))


def test_bad_batch_real_is_refused_before_work(tmp_path):
  with pytest.raises(ValueError, match=r'distill.batch_real=500.*smallest class'):
    loop.run(tiny_config(**{'distill.batch_real': 500}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_variants_and_labels():
  config = tiny_config()
  assert compare.method_label(config) == 'DM + IID'
  dm_only = compare.variant_config(config, 'dm')
  assert compare.method_label(dm_only) == 'DM'
  cm_only = compare.variant_config(config, 'dm_cm')
  assert (cm_only.constraints.cc.weight, cm_only.constraints.cm.weight) == (0.0, 0.01)
  # A variant of a plain-DM config takes the reference weights.
  iid = compare.variant_config(dm_only, 'dm_iid')
  assert (iid.constraints.cc.weight, iid.constraints.cm.weight) == (0.05, 0.01)
  with pytest.raises(ValueError, match=r"'idm' is not a variant of a method='dm' config"):
    compare.variant_config(config, 'idm')
  idm_config = tiny_config(method='idm', **{'constraints.cc.weight': 0.0,
                                            'constraints.cm.weight': 0.0})
  assert compare.method_label(idm_config) == 'IDM'
  idm_iid = compare.variant_config(idm_config, 'idm_iid')
  assert (idm_iid.constraints.cc.weight, idm_iid.constraints.cm.weight) == (0.01, 0.03)
  assert compare.method_label(idm_iid) == 'IDM + IID'
  pooled = tiny_config(**{'constraints.cc.extractor': 'pool'})
  assert compare.method_label(pooled).startswith('DM + IID (CC on pool: 1000 ResNet18')


def test_run_with_baselines_prints_table(tmp_path, capsys):
  config = tiny_config(**{'compare.variants': 'dm', 'compare.random_real': True,
                          'compare.full_train_epochs': 1, 'compare.full_train_num_eval': 1})
  comparison = compare.run_with_baselines(config, str(tmp_path))
  table = comparison['table']
  assert [row['label'] for row in comparison['rows']] == [
      'random real (ipc 2)', 'DM', 'DM + IID', 'full training set (1347 images, 1 epochs, 1 '
      'networks)']
  assert comparison['rows'][1]['mean'] == pytest.approx(np.mean(comparison['rows'][1][
      'accuracies']))
  for label in ('random real (ipc 2)', '| DM |', '| DM + IID |', 'full training set'):
    assert label in table
  assert table in capsys.readouterr().out
  assert (tmp_path / 'table.md').exists()
  assert os.path.exists(tmp_path / 'compare' / 'dm' / 'synthetic.npz')


def test_pool_extractor_is_what_cc_sees(tmp_path):
  """cc.extractor='pool' must route CC through the pool: a pool of all-zero networks has
  constant features and hence CC exactly 0, while the matching network's CC is positive."""
  config = tiny_config(**{'constraints.cc.extractor': 'pool', 'pool.model': 'ConvNetD1',
                          'pool.size': 2, 'pool.epochs': 1, 'pool.parallel': 2,
                          'pool.dir': str(tmp_path / 'pool')})
  data = loop.prepare_data(config)
  keys = loop.RunKeys.from_seed(0)
  trained = loop.build_method(config, data, keys)  # trains and saves the tiny pool
  assert (tmp_path / 'pool' / 'metadata.json').exists()
  pool = data.pools[str(tmp_path / 'pool')]
  data.pools[str(tmp_path / 'pool')] = dataclasses.replace(
      pool, variables=jax.tree_util.tree_map(jnp.zeros_like, pool.variables))
  zeroed = loop.build_method(config, data, keys)
  matching = loop.build_method(tiny_config(), data, keys)
  metrics = {name: method.step(method.state, data.sampler)[1]
             for name, method in [('trained', trained), ('zeroed', zeroed),
                                  ('matching', matching)]}
  assert float(metrics['zeroed']['cc']) == 0.0
  assert float(metrics['matching']['cc']) > 0.0
  assert float(metrics['trained']['cc']) > 0.0
  assert not np.isclose(float(metrics['trained']['cc']), float(metrics['matching']['cc']))
  # DM and CM still come from the random matching network.
  for name in ('dm', 'cm'):
    np.testing.assert_allclose(metrics['zeroed'][name], metrics['matching'][name], rtol=1e-6)
  # A run through the loop reuses the saved pool (no retraining; refuses another dataset).
  results = loop.run(config, str(tmp_path / 'run'))
  assert results['cc_extractor'] == 'pool'


def test_too_little_disk_is_refused_before_work(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(loop.shutil, 'disk_usage', lambda path: usage._replace(free=1000))
  with pytest.raises(OSError, match=r'has 0.0 MiB free, but checkpoints and the export of '
                                    r'this run need about'):
    loop.run(tiny_config(), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.parametrize('poison', ['loss_term', 'images'])
def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          poison):
  real_make_step = dm.make_dm_step

  def poisoned_make_step(*args, **kwargs):
    step = real_make_step(*args, **kwargs)

    def wrapped(state, sampler):
      state, metrics = step(state, sampler)
      # Checkpoints and log lines every 2 steps: step 5 or 6 goes bad, step 4 is the last good.
      if poison == 'loss_term' and int(state.step) == 5:
        metrics = {**metrics, 'cm': metrics['cm'] * jnp.nan}
        state = state.replace(images=state.images * jnp.nan)
      if poison == 'images' and int(state.step) == 6:  # only the images: the loss was finite
        state = state.replace(images=state.images * jnp.nan)
      return state, metrics
    return wrapped

  monkeypatch.setattr(dm, 'make_dm_step', poisoned_make_step)
  workdir = tmp_path / 'run'
  expected = (r'cm became non-finite at step 5 \(the synthetic images at step 6 are non-finite '
              r'too\)' if poison == 'loss_term' else
              r'synthetic images became non-finite between steps 5 and 6')
  with pytest.raises(FloatingPointError, match=expected + r'.*last checkpoint \(step 4\)'):
    loop.run(tiny_config(), str(workdir))
  assert not (workdir / 'synthetic.npz').exists()
  logged = loop.workdir_lib.read_metrics(str(workdir / 'metrics.jsonl'))
  assert [m['step'] for m in logged] == [2, 4]  # nothing non-finite was logged
  restored = loop.checkpoint_lib.Checkpointer(str(workdir / 'checkpoints')).restore_latest(
      loop.build_method(tiny_config(), loop.prepare_data(tiny_config()),
                        loop.RunKeys.from_seed(0)).state)
  assert int(restored.step) == 4 and np.all(np.isfinite(restored.images))


def test_unwritable_workdir_is_refused_before_work(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match=r'--workdir=.*a_file/run is not writable \(.*\); choose '
                                       'another directory'):
    loop.run(tiny_config(), str(blocker / 'run'))
  if os.geteuid() != 0:  # root writes regardless of permission bits
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match='locked is not writable'):
      loop.run(tiny_config(), str(locked))


def test_fast_real_embedding_equals_the_straightforward_one(digits):
  """XLA convolutions with the real batch in chunks of 4 == im2col one class at a time."""
  sampler = data_lib.ClassSampler.from_dataset(digits)
  weights = losses.ObjectiveWeights(cc=0.05, cm=0.01)
  outcomes = []
  for conv_impl, real_chunk in (('im2col', 0), ('xla', 4), ('xla', 16)):
    net = models.get_network('ConvNetW32', digits.num_classes, conv_impl=conv_impl)
    settings = dm.DMSettings(num_classes=digits.num_classes, ipc=2, batch_real=8, num_nets=1,
                             strategy='color_crop_cutout_scale_rotate', weights=weights,
                             mean=digits.mean, std=digits.std, real_chunk=real_chunk)
    optimizer = optax.sgd(1.0, momentum=0.5)
    step = dm.make_dm_step(net, settings, optimizer)
    labels = np.repeat(np.arange(digits.num_classes), 2)
    state = dm.init_state(jax.random.normal(jax.random.key(0), (20, 8, 8, 1)), labels, optimizer,
                          jax.random.key(1))
    for _ in range(2):
      state, metrics = step(state, sampler)
    outcomes.append((np.asarray(state.images), {k: float(v) for k, v in metrics.items()}))
  (images, metrics), *fast = outcomes
  for fast_images, fast_metrics in fast:
    np.testing.assert_allclose(fast_images, images, atol=2e-5)
    for name, value in metrics.items():
      assert fast_metrics[name] == pytest.approx(value, rel=2e-5), name
  with pytest.raises(ValueError, match='real_chunk=3 must divide the 10 x 8 real images'):
    dm.make_dm_step(models.get_network('ConvNetW32', 10), dataclasses.replace(
        settings, real_chunk=3), optax.sgd(1.0))

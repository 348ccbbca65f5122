"""The pretrained pool of class-centralization extractors: training, storage, reuse, drawing."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import losses
from dd_jax import pool as pool_lib
from dd_jax import train as train_lib

# One set of training settings everywhere, so every test reuses the same compiled epoch.
SETTINGS = pool_lib.PoolSettings(model='ConvNetD1', size=3, epochs=6, batch_size=6, lr=0.01,
                                 momentum=0.9, weight_decay=5e-4, parallel=3, seed=0)


def _tiny_dataset(name='tiny', num_classes=3, per_class=6, seed=0):
  """8x8 grey images; class c is a fixed random pattern plus noise (trivially separable)."""
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(40, 215, size=(num_classes, 8, 8, 1))

  def split(count):
    labels = np.repeat(np.arange(num_classes), count)
    images = patterns[labels] + rng.normal(0, 10, size=(len(labels), 8, 8, 1))
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels.astype(np.int32)

  train_images, train_labels = split(per_class)
  test_images, test_labels = split(4)
  return data_lib.Dataset(name=name, train_images=train_images, train_labels=train_labels,
                          test_images=test_images, test_labels=test_labels,
                          class_names=tuple(f'c{k}' for k in range(num_classes)),
                          mean=(0.5,), std=(0.25,))


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _quiet(_):
  pass


@pytest.fixture(scope='module')
def dataset():
  return _tiny_dataset()


@pytest.fixture(scope='module')
def pool(dataset):
  return pool_lib.train_pool(dataset, SETTINGS, log=_quiet)


def _config(cache_dir, pool_dir=''):
  config = config_lib.default_config()
  config.dataset.name = 'folder:/data/tiny'
  config.dataset.cache_dir = str(cache_dir)
  for field in ('model', 'size', 'epochs', 'batch_size', 'lr', 'momentum', 'weight_decay',
                'parallel', 'seed'):
    config.pool[field] = getattr(SETTINGS, field)
  config.pool.dir = pool_dir
  return config


def test_settings_from_config_and_train_settings():
  config = _config('/tmp')
  assert pool_lib.PoolSettings.from_config(config.pool) == SETTINGS
  train_settings = SETTINGS.train_settings()
  assert train_settings == train_lib.TrainSettings(epochs=6, batch_size=6, lr=0.01, momentum=0.9,
                                                   weight_decay=5e-4, augment_strategy='',
                                                   lr_drop=False)


def test_training_learns_and_records_accuracies(pool, dataset):
  assert pool.size == 3
  assert pool.net.name == 'ConvNetD1'
  metadata = pool.metadata
  assert {k: metadata[k] for k in pool_lib.IDENTITY_FIELDS} == pool_lib.pool_metadata(
      dataset, SETTINGS)
  assert len(metadata['test_accuracies']) == 3
  assert min(metadata['test_accuracies']) >= 90.0
  assert metadata['mean_test_accuracy'] == pytest.approx(np.mean(metadata['test_accuracies']))
  assert metadata['train_seconds'] > 0
  # The recorded accuracies are those of the returned members.
  recomputed = train_lib.accuracies(pool.variables, pool.net,
                                    dataset.normalize(dataset.test_images),
                                    jnp.asarray(dataset.test_labels))
  np.testing.assert_allclose(metadata['test_accuracies'], 100 * np.asarray(recomputed), atol=1e-4)
  # Members are distinct networks.
  kernel = jax.tree_util.tree_leaves(pool.variables['params'])[0]
  assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])


def test_training_is_deterministic_given_the_seed(pool, dataset):
  again = pool_lib.train_pool(dataset, SETTINGS, log=_quiet)
  _assert_trees_equal(pool.variables, again.variables)
  other_seed = pool_lib.train_pool(
      dataset, dataclasses.replace(SETTINGS, size=1, parallel=1, seed=1), log=_quiet)
  kernel = lambda p: np.asarray(jax.tree_util.tree_leaves(p.variables['params'])[0][0])
  assert not np.allclose(kernel(pool), kernel(other_seed))


def test_chunked_training_gives_the_same_members(pool, dataset):
  lines = []
  chunked = pool_lib.train_pool(
      dataset, dataclasses.replace(SETTINGS, parallel=2), log=lines.append)
  assert chunked.metadata['chunks'] == [[0, 2], [2, 3]]
  for a, b in zip(jax.tree_util.tree_leaves(pool.variables),
                  jax.tree_util.tree_leaves(chunked.variables)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # Progress: one line per epoch and chunk, naming the members and the epoch.
  assert len(lines) == 2 * SETTINGS.epochs
  assert lines[0].startswith('pool: members 1-2 of 3, epoch 1/6,') and 'ETA' in lines[0]
  assert lines[-1].startswith('pool: members 3-3 of 3, epoch 6/6,')


def test_save_load_round_trip_is_exact(pool, dataset, tmp_path):
  directory = str(tmp_path / 'pool')
  pool_lib.save_pool(directory, pool)
  assert os.path.isfile(os.path.join(directory, 'metadata.json'))
  loaded = pool_lib.load_pool(directory, pool_lib.pool_metadata(dataset, SETTINGS))
  assert loaded is not None
  _assert_trees_equal(pool.variables, loaded.variables)
  assert loaded.metadata == pool.metadata
  assert loaded.net == pool.net
  # Host arrays: a step sends only its drawn members to the device.
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(loaded.variables))


def test_load_pool_without_a_complete_pool_returns_none(pool, dataset, tmp_path):
  expected = pool_lib.pool_metadata(dataset, SETTINGS)
  assert pool_lib.load_pool(str(tmp_path / 'missing'), expected) is None
  (tmp_path / 'empty').mkdir()
  assert pool_lib.load_pool(str(tmp_path / 'empty'), expected) is None
  directory = str(tmp_path / 'unfinished')
  pool_lib.save_pool(directory, pool)
  os.remove(os.path.join(directory, 'metadata.json'))
  assert pool_lib.load_pool(directory, expected) is None


def test_a_pool_of_another_dataset_is_refused(pool, tmp_path):
  directory = str(tmp_path / 'pool')
  pool_lib.save_pool(directory, pool)
  other = _tiny_dataset(name='other', num_classes=4)
  with pytest.raises(ValueError) as error:
    pool_lib.load_pool(directory, pool_lib.pool_metadata(other, SETTINGS))
  message = str(error.value)
  assert "dataset: built for 'tiny', wanted 'other'" in message
  assert 'num_classes: built for 3, wanted 4' in message
  assert '--config.pool.dir' in message and 'delete' in message
  # A difference in training settings is named too; the matching fields are not.
  with pytest.raises(ValueError, match='epochs: built for 6, wanted 7') as error:
    pool_lib.load_pool(directory, pool_lib.pool_metadata(
        _tiny_dataset(), dataclasses.replace(SETTINGS, epochs=7)))
  assert 'num_classes' not in str(error.value)


def test_default_pool_dir(tmp_path):
  config = _config(tmp_path)
  directory = pool_lib.default_pool_dir(config)
  assert os.path.dirname(directory) == os.path.join(str(tmp_path), 'pools')
  name = os.path.basename(directory)
  assert name.startswith('tiny-') and name.endswith('_ConvNetD1_3x6_seed0')
  assert all(c.isalnum() or c in '._-' for c in name)
  config.dataset.name = 'folder:/elsewhere/tiny'  # same basename, another dataset
  assert pool_lib.default_pool_dir(config) != directory
  config.dataset.name = 'tfds:cifar10'
  assert os.path.basename(pool_lib.default_pool_dir(config)).startswith('cifar10-')


def test_get_or_train_pool_trains_once_then_reuses(pool, dataset, tmp_path, monkeypatch):
  config = _config(tmp_path)
  lines = []
  first = pool_lib.get_or_train_pool(config, dataset, log=lines.append)
  directory = pool_lib.default_pool_dir(config)
  assert os.path.isfile(os.path.join(directory, 'metadata.json'))
  assert any(f'saved 3 members to {directory}' in line for line in lines)
  _assert_trees_equal(first.variables, pool.variables)

  def no_training(*args, **kwargs):
    raise AssertionError('the pool was retrained')

  monkeypatch.setattr(pool_lib, 'train_pool', no_training)
  lines.clear()
  second = pool_lib.get_or_train_pool(config, dataset, log=lines.append)
  _assert_trees_equal(first.variables, second.variables)
  assert lines[0].startswith(f'pool: loaded 3 ConvNetD1 members from {directory}')
  assert 'mean test accuracy' in lines[0]
  # An explicit pool.dir holding another dataset's pool is refused.
  config = _config(tmp_path, pool_dir=directory)
  with pytest.raises(ValueError, match='num_classes: built for 3, wanted 4'):
    pool_lib.get_or_train_pool(config, _tiny_dataset(name='other', num_classes=4), log=_quiet)


def test_an_interrupted_build_resumes_from_its_completed_chunks(pool, dataset, tmp_path,
                                                                monkeypatch):
  config = _config(tmp_path, pool_dir=str(tmp_path / 'pool'))
  config.pool.parallel = 2
  pool_lib.get_or_train_pool(config, dataset, log=_quiet)
  # Interrupted before the last chunk finished: no metadata.json, no record of members 3-3.
  os.remove(str(tmp_path / 'pool' / 'metadata.json'))
  os.remove(str(tmp_path / 'pool' / 'members' / '000002-000003.json'))
  epochs_run = []  # members trained by each epoch call
  train_epoch = pool_lib._train_epoch

  def counting_train_epoch(carry, *args, **kwargs):
    epochs_run.append(len(jax.tree_util.tree_leaves(carry[0])[0]))
    return train_epoch(carry, *args, **kwargs)

  monkeypatch.setattr(pool_lib, '_train_epoch', counting_train_epoch)
  lines = []
  resumed = pool_lib.get_or_train_pool(config, dataset, log=lines.append)
  assert epochs_run == [1] * SETTINGS.epochs  # only the missing member was trained
  assert any('members 1-2 of 3 restored from' in line for line in lines)
  for a, b in zip(jax.tree_util.tree_leaves(pool.variables),
                  jax.tree_util.tree_leaves(resumed.variables)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_pool_extractor_draws_one_member_per_key(pool, dataset):
  extractor = pool_lib.pool_extractor(pool)
  assert extractor.name == 'pool'
  images = dataset.normalize(dataset.train_images[:5])
  matching = jnp.zeros((5, 7))
  features = jax.jit(extractor.features)  # the member is a traced argument

  def member(index):
    return jax.tree_util.tree_map(lambda x: x[index], pool.variables)

  keys = jnp.stack([jax.random.key(i) for i in range(12)])
  drawn = [int(jax.random.randint(key, (), 0, pool.size)) for key in keys]
  assert len(set(drawn)) >= 2
  # select runs on the host and hands over only the drawn members, one per key.
  selected = extractor.select(extractor.params, keys)
  assert all(leaf.shape[0] == len(keys) for leaf in jax.tree_util.tree_leaves(selected))
  outputs = [np.asarray(features(jax.tree_util.tree_map(lambda x, i=i: x[i], selected), key,
                                 images, matching)) for i, key in enumerate(keys)]
  for index, output in zip(drawn, outputs):
    expected = pool.net.embed(member(index), images, train=True)[0]
    np.testing.assert_allclose(output, np.asarray(expected), rtol=1e-5, atol=1e-5)
  by_member = {}
  for index, output in zip(drawn, outputs):
    if index in by_member:  # another key drawing the same member gives the same features
      np.testing.assert_allclose(output, by_member[index], rtol=1e-6, atol=1e-6)
    by_member[index] = output
  first, second = list(by_member)[:2]
  assert not np.allclose(by_member[first], by_member[second], atol=1e-3)


@pytest.mark.parametrize('method', ['dm', 'idm'])
def test_steps_receive_only_the_drawn_members_and_match_a_draw_inside_jit(pool, dataset, method):
  """The host-side draw picks the members a draw inside the step (from the step's CC keys)
  would: same CC terms and images over several steps, with only those members on the device."""
  # Imported here as in pool_extractor (dd_jax.distill imports the pool module).
  from dd_jax.distill import dm, idm  # pylint: disable=g-import-not-at-top

  def features_drawn_inside(params, key, syn_images, matching_features):
    del matching_features
    member = jax.tree_util.tree_map(lambda x: x[jax.random.randint(key, (), 0, pool.size)],
                                    params)
    return pool.net.embed(member, syn_images, train=True)[0]

  inside = dm.CentralizationExtractor('inside', features_drawn_inside,
                                      jax.tree_util.tree_map(jnp.asarray, pool.variables))
  host = pool_lib.pool_extractor(pool)
  weights = losses.ObjectiveWeights(cc=1.0)
  net = pool.net
  optimizer = optax.sgd(0.1, momentum=0.5)
  num_classes = dataset.num_classes
  ipc = 2 if method == 'dm' else 1  # CC needs two images of a class (IDM expands one to four)
  labels = np.repeat(np.arange(num_classes), ipc)
  images = jax.random.normal(jax.random.key(0), (num_classes * ipc, 8, 8, 1))
  sampler = data_lib.ClassSampler.from_dataset(dataset)
  if method == 'dm':
    num_drawn = 2
    settings = dm.DMSettings(num_classes=num_classes, ipc=ipc, batch_real=4, num_nets=num_drawn,
                             strategy='color_crop_cutout', weights=weights, mean=dataset.mean,
                             std=dataset.std)
    make = lambda extractor: dm.make_dm_step(net, settings, optimizer, extractor)
    state = dm.init_state(images, labels, optimizer, jax.random.key(1))
  else:
    num_drawn = 1
    settings = idm.IDMSettings(num_classes=num_classes, ipc=1, batch_real=4,
                               strategy='color_crop_cutout', weights=weights, mean=dataset.mean,
                               std=dataset.std, queue_capacity=3, train_steps=1, train_batch=4)
    make = lambda extractor: idm.make_idm_step(net, settings, optimizer, extractor)
    state = idm.init_idm_state(images, labels, optimizer, net, settings, jax.random.key(1),
                               jax.random.key(2))
  runs = {}
  for name, extractor in [('inside', inside), ('host', host)]:
    step, current, cc = make(extractor), state, []
    for _ in range(6):
      current, metrics = step(current, sampler)
      cc.append(float(metrics['cc']))
    runs[name] = (current.images, cc)
    if name == 'host':
      sent = step.arguments(current, sampler)[2]
      assert {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(sent)} == {num_drawn}
  assert len(set(np.round(runs['host'][1], 4))) > 1  # members (and images) change every step
  np.testing.assert_allclose(runs['host'][1], runs['inside'][1], rtol=1e-5)
  np.testing.assert_allclose(runs['host'][0], runs['inside'][0], rtol=1e-5, atol=1e-6)

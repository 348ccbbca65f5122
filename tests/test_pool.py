"""The pretrained pool of class centralization (dd_jax.pool): training, storage, reuse.

The tiny pool and its dataset are conftest fixtures (`pool`, `saved_pool`, `tiny_dataset`)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_POOL, make_tiny_dataset

from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import lowering
from dd_jax import pool as pool_lib
from dd_jax import train as train_lib


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _quiet(_):
  pass


@pytest.fixture
def dataset(tiny_dataset):
  return tiny_dataset


SETTINGS = TINY_POOL


def _config(cache_dir, pool_dir=''):
  config = config_lib.default_config()
  config.dataset.name = 'folder:/data/tiny'
  config.dataset.cache_dir = str(cache_dir)
  for field in ('model', 'size', 'epochs', 'parallel', 'seed'):
    config.pool[field] = getattr(SETTINGS, field)
  for field in ('batch_size', 'lr', 'momentum', 'weight_decay'):
    config.pool[field] = getattr(SETTINGS.recipe, field)
  config.pool.dir = pool_dir
  return config


def _settings(config):
  """The pool settings of `config`, their directory resolved as a run resolves it."""
  return pool_lib.PoolSettings.from_config(config, data_lib.DatasetSettings.from_config(config))


def _dataset_settings(cache_dir, **fields):
  return data_lib.DatasetSettings(name='folder:/data/tiny', cache_dir=str(cache_dir), **fields)


def test_settings_from_config_and_train_settings(tmp_path, monkeypatch):
  config = _config(tmp_path)
  default_dir = pool_lib.default_pool_dir(SETTINGS, _dataset_settings(tmp_path))
  assert _settings(config) == dataclasses.replace(SETTINGS, directory=default_dir)
  # An explicit pool.dir is taken as it is, made absolute.
  monkeypatch.chdir(tmp_path)
  assert _settings(_config(tmp_path, pool_dir='pools/mine')).directory == str(
    tmp_path / 'pools' / 'mine'
  )
  train_settings = SETTINGS.train_settings()
  assert train_settings == train_lib.TrainSettings(
    epochs=6, recipe=SETTINGS.recipe, augment_strategy='', schedule='constant'
  )


def test_training_learns_and_records_accuracies(pool, dataset):
  assert pool.size == 3
  assert pool.net.name == 'ConvNetD1'
  metadata = pool.metadata
  assert {k: metadata[k] for k in pool_lib.IDENTITY_FIELDS} == pool_lib.pool_metadata(
    dataset, SETTINGS
  )
  assert len(metadata['test_accuracies']) == 3
  assert min(metadata['test_accuracies']) >= 90.0
  assert metadata['mean_test_accuracy'] == pytest.approx(np.mean(metadata['test_accuracies']))
  assert metadata['train_seconds'] > 0
  # The recorded accuracies are those of the returned members.
  recomputed = train_lib.accuracies(
    pool.variables,
    pool.net,
    dataset.normalize(dataset.test_images),
    jnp.asarray(dataset.test_labels),
  )
  np.testing.assert_allclose(metadata['test_accuracies'], 100 * np.asarray(recomputed), atol=1e-4)
  # Members are distinct networks.
  kernel = jax.tree_util.tree_leaves(pool.variables['params'])[0]
  assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])


def test_training_is_deterministic_given_the_seed(pool, dataset):
  again = pool_lib.train_pool(dataset, SETTINGS, lowering.CPU, log=_quiet)
  _assert_trees_equal(pool.variables, again.variables)
  other_seed = pool_lib.train_pool(
    dataset, dataclasses.replace(SETTINGS, size=1, parallel=1, seed=1), lowering.CPU, log=_quiet
  )
  kernel = lambda p: np.asarray(jax.tree_util.tree_leaves(p.variables['params'])[0][0])
  assert not np.allclose(kernel(pool), kernel(other_seed))


def test_chunked_training_gives_the_same_members(pool, dataset):
  lines = []
  chunked = pool_lib.train_pool(
    dataset, dataclasses.replace(SETTINGS, parallel=2), lowering.CPU, log=lines.append
  )
  assert chunked.metadata['chunks'] == [[0, 2], [2, 3]]
  for a, b in zip(
    jax.tree_util.tree_leaves(pool.variables), jax.tree_util.tree_leaves(chunked.variables)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # Progress: one line per epoch and chunk, naming the members and the epoch.
  assert len(lines) == 2 * SETTINGS.epochs
  assert lines[0].startswith('pool: members 1-2 of 3, epoch 1/6,') and 'ETA' in lines[0]
  assert lines[-1].startswith('pool: members 3-3 of 3, epoch 6/6,')


def test_save_load_round_trip_is_exact(saved_pool, dataset):
  pool, directory = saved_pool
  assert os.path.isfile(os.path.join(directory, 'metadata.json'))
  loaded = pool_lib.load_pool(directory, pool_lib.pool_metadata(dataset, SETTINGS), lowering.CPU)
  assert loaded is not None
  _assert_trees_equal(pool.variables, loaded.variables)
  assert loaded.metadata == pool.metadata
  assert loaded.net == pool.net
  # Host arrays: a step sends only its drawn members to the device.
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(loaded.variables))


def test_load_pool_without_a_complete_pool_returns_none(saved_pool, dataset, tmp_path):
  expected = pool_lib.pool_metadata(dataset, SETTINGS)
  assert pool_lib.load_pool(str(tmp_path / 'missing'), expected, lowering.CPU) is None
  (tmp_path / 'empty').mkdir()
  assert pool_lib.load_pool(str(tmp_path / 'empty'), expected, lowering.CPU) is None
  directory = str(tmp_path / 'unfinished')
  shutil.copytree(saved_pool[1], directory)
  os.remove(os.path.join(directory, 'metadata.json'))
  assert pool_lib.load_pool(directory, expected, lowering.CPU) is None


def test_a_pool_of_another_dataset_is_refused(saved_pool):
  directory = saved_pool[1]
  other = make_tiny_dataset(name='other', num_classes=4)
  with pytest.raises(ValueError) as error:
    pool_lib.load_pool(directory, pool_lib.pool_metadata(other, SETTINGS), lowering.CPU)
  message = str(error.value)
  assert "dataset: built for 'tiny', wanted 'other'" in message
  assert 'num_classes: built for 3, wanted 4' in message
  assert '--config.pool.dir' in message and 'delete' in message
  # A difference in training settings is named too; the matching fields are not.
  with pytest.raises(ValueError, match='epochs: built for 6, wanted 7') as error:
    pool_lib.load_pool(
      directory,
      pool_lib.pool_metadata(make_tiny_dataset(), dataclasses.replace(SETTINGS, epochs=7)),
      lowering.CPU,
    )
  assert 'num_classes' not in str(error.value)


def test_default_pool_dir(tmp_path):
  dataset = _dataset_settings(tmp_path)
  directory = pool_lib.default_pool_dir(SETTINGS, dataset)
  assert os.path.dirname(directory) == os.path.join(str(tmp_path), 'pools')
  name = os.path.basename(directory)
  assert name.startswith('tiny-') and name.endswith('_ConvNetD1_3x6_seed0')
  assert all(c.isalnum() or c in '._-' for c in name)
  # Same basename, another dataset.
  elsewhere = dataclasses.replace(dataset, name='folder:/elsewhere/tiny')
  assert pool_lib.default_pool_dir(SETTINGS, elsewhere) != directory
  cifar10 = dataclasses.replace(dataset, name='tfds:cifar10')
  whole = pool_lib.default_pool_dir(SETTINGS, cifar10)
  assert os.path.basename(whole).startswith('cifar10-')
  # A pool trained without a validation split's images is another pool.
  held_out = dataclasses.replace(cifar10, validation_fraction=0.1)
  assert pool_lib.default_pool_dir(SETTINGS, held_out) == whole + '_val0.1s0'
  # The pool's settings in the name.
  other = dataclasses.replace(SETTINGS, model='ConvNet', size=5, epochs=2, seed=3)
  assert pool_lib.default_pool_dir(other, dataset).endswith('_ConvNet_5x2_seed3')


def test_get_or_train_pool_trains_once_then_reuses(pool, dataset, tmp_path, monkeypatch):
  settings = _settings(_config(tmp_path))
  lines = []
  first = pool_lib.get_or_train_pool(settings, dataset, lowering.CPU, log=lines.append)
  directory = pool_lib.default_pool_dir(SETTINGS, _dataset_settings(tmp_path))
  assert settings.directory == directory
  assert os.path.isfile(os.path.join(directory, 'metadata.json'))
  assert any(f'saved 3 members to {directory}' in line for line in lines)
  _assert_trees_equal(first.variables, pool.variables)

  def no_training(*args, **kwargs):
    raise AssertionError('the pool was retrained')

  monkeypatch.setattr(pool_lib, 'train_pool', no_training)
  lines.clear()
  second = pool_lib.get_or_train_pool(settings, dataset, lowering.CPU, log=lines.append)
  _assert_trees_equal(first.variables, second.variables)
  assert lines[0].startswith(f'pool: loaded 3 ConvNetD1 members from {directory}')
  assert 'mean test accuracy' in lines[0] and first.metadata['held_out'] == 'test'
  # A pool built beside a validation split measured its members there, and says so.
  summary = pool_lib._accuracy_summary({'mean_test_accuracy': 61.0, 'held_out': 'validation'})
  assert summary == "members' mean validation accuracy 61.00%"
  # An explicit pool.dir holding another dataset's pool is refused.
  settings = _settings(_config(tmp_path, pool_dir=directory))
  with pytest.raises(ValueError, match='num_classes: built for 3, wanted 4'):
    pool_lib.get_or_train_pool(
      settings, make_tiny_dataset(name='other', num_classes=4), lowering.CPU, log=_quiet
    )


def test_an_interrupted_build_resumes_from_its_completed_chunks(
  pool, dataset, tmp_path, monkeypatch
):
  config = _config(tmp_path, pool_dir=str(tmp_path / 'pool'))
  config.pool.parallel = 2
  settings = _settings(config)
  pool_lib.get_or_train_pool(settings, dataset, lowering.CPU, log=_quiet)
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
  resumed = pool_lib.get_or_train_pool(settings, dataset, lowering.CPU, log=lines.append)
  assert epochs_run == [1] * SETTINGS.epochs  # only the missing member was trained
  assert any('members 1-2 of 3 restored from' in line for line in lines)
  for a, b in zip(
    jax.tree_util.tree_leaves(pool.variables), jax.tree_util.tree_leaves(resumed.variables)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('lowering_name', ['cpu', 'accelerator'])
def test_every_epoch_of_a_pool_build_shows_progress_to_100_percent(
  dataset, recorded_bars, lowering_name
):
  settings = dataclasses.replace(
    SETTINGS, epochs=3, recipe=dataclasses.replace(SETTINGS.recipe, batch_size=4)
  )
  pool_lib.train_pool(dataset, settings, lowering.resolve(lowering_name), log=_quiet)
  chunks = pool_lib._chunks(settings.size, settings.parallel)
  expected = [
    f'pool: members {start + 1}-{end}, epoch {epoch + 1}/3'
    for start, end in chunks
    for epoch in range(3)
  ]
  assert [description for description, _, _ in recorded_bars] == expected
  assert all(total > 0 and bar.n == total for _, total, bar in recorded_bars)


def test_initial_variables_are_where_train_pool_started_its_members(pool, dataset, monkeypatch):
  image_shape = tuple(dataset.image_shape)
  initial = pool_lib.initial_variables(SETTINGS, pool.net, image_shape)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(initial))
  keys = pool_lib._member_keys(SETTINGS.seed, 0, SETTINGS.size)
  started = pool_lib._init_chunk(keys, pool.net, image_shape, SETTINGS.train_settings())
  _assert_trees_equal(initial, started[0])
  # A member's initial state does not depend on the range asked for.
  middle = pool_lib.initial_variables(SETTINGS, pool.net, image_shape, 1, 2)
  _assert_trees_equal(middle, jax.tree_util.tree_map(lambda x: x[1:2], initial))
  assert not np.allclose(
    jax.tree_util.tree_leaves(initial)[0], jax.tree_util.tree_leaves(pool.variables)[0]
  )
  # train_pool, made to start from `initial` (and recording what it drew itself), trains the
  # stored members bitwise.
  init_chunk, drawn = pool_lib._init_chunk, []

  def from_initial(*args, **kwargs):
    carry = init_chunk(*args, **kwargs)
    drawn.append(jax.tree_util.tree_map(np.array, carry[0]))
    return (jax.tree_util.tree_map(jnp.asarray, initial), *carry[1:])

  monkeypatch.setattr(pool_lib, '_init_chunk', from_initial)
  retrained = pool_lib.train_pool(dataset, SETTINGS, lowering.CPU, log=_quiet)
  assert len(drawn) == 1
  _assert_trees_equal(drawn[0], initial)
  _assert_trees_equal(retrained.variables, pool.variables)
  with pytest.raises(ValueError, match=r'members \[2, 4\)'):
    pool_lib.initial_variables(SETTINGS, pool.net, image_shape, 2, 4)


def _variables(seed, scale):
  """A small variables tree with conv, norm-affine and linear leaves (float32)."""
  rng = np.random.default_rng(seed)
  leaf = lambda *shape: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  return {
    'params': {
      'conv': {'kernel': leaf(3, 3, 1, 4), 'bias': leaf(4)},
      'norm': {'scale': leaf(4), 'bias': leaf(4)},
      'head': {'kernel': leaf(4, 3), 'bias': leaf(3)},
    }
  }


def test_interpolate_family_vectors_and_a_traced_lambda():
  initial, final = _variables(0, 1.0), _variables(1, 3.0)
  _assert_trees_equal(
    pool_lib.interpolate(initial, final, 0.0), final
  )  # lambda = 0: the final weights
  _assert_trees_equal(pool_lib.interpolate(initial, final, 1.0), initial)
  quarter = pool_lib.interpolate(initial, final, 0.25)
  expected = jax.tree_util.tree_map(
    lambda a, b: 0.25 * np.float64(a) + 0.75 * np.float64(b), initial, final
  )
  for got, want in zip(jax.tree_util.tree_leaves(quarter), jax.tree_util.tree_leaves(expected)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Norm affine parameters are interpolated too.
  np.testing.assert_allclose(
    quarter['params']['norm']['scale'],
    0.25 * initial['params']['norm']['scale'] + 0.75 * final['params']['norm']['scale'],
    rtol=1e-6,
  )
  # One compiled program serves every lambda.
  traces = []

  @jax.jit
  def mixed(lam):
    traces.append(lam)
    return pool_lib.interpolate(initial, final, lam)

  for lam in (0.0, 0.25, 1.0, 0.7):
    result = mixed(jnp.float32(lam))
    want = pool_lib.interpolate(initial, final, lam)
    for got, ref in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  assert len(traces) == 1
  _assert_trees_equal(mixed(jnp.float32(0.0)), final)
  _assert_trees_equal(mixed(jnp.float32(1.0)), initial)


def test_interpolate_refuses_mismatched_trees():
  initial, final = _variables(0, 1.0), _variables(1, 1.0)
  with pytest.raises(ValueError):
    pool_lib.interpolate(initial, {'params': final['params']['conv']}, 0.5)
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), final)
  with pytest.raises(ValueError, match=r"\['params'\]\['conv'\]\['bias'\] is float32\[4\]"):
    pool_lib.interpolate(initial, stacked, 0.5)
  counted = {'step': jnp.zeros((), jnp.int32)}
  with pytest.raises(ValueError, match='int32, not floating'):
    pool_lib.interpolate(counted, counted, 0.5)


def test_a_pool_saved_before_its_recipe_was_recorded_loads_with_the_default_recipe(
  saved_pool, dataset, tmp_path
):
  directory = str(tmp_path / 'old')
  shutil.copytree(saved_pool[1], directory)
  metadata = pool_lib.workdir_lib.read_json(os.path.join(directory, 'metadata.json'))
  del metadata['training']  # as written before the recipe was part of a pool's identity
  pool_lib.workdir_lib.write_json(os.path.join(directory, 'metadata.json'), metadata)
  expected = pool_lib.pool_metadata(dataset, SETTINGS)
  assert pool_lib.load_pool(directory, expected, lowering.CPU) is not None
  family = dataclasses.replace(SETTINGS, schedule='multistep', milestones=(0.5,), gamma=0.2)
  with pytest.raises(ValueError, match=r"training: built for \{'schedule': 'constant'"):
    pool_lib.load_pool(directory, pool_lib.pool_metadata(dataset, family), lowering.CPU)


def test_the_idc_family_recipe_trains_a_pool_of_its_own(dataset, tmp_path):
  family = dataclasses.replace(
    SETTINGS,
    size=2,
    parallel=2,
    epochs=3,
    schedule='multistep',
    milestones=(2 / 3, 5 / 6),
    gamma=0.2,
    augment_strategy='color_crop',
    augment_mode='idc',
    cutmix_probability=0.5,
  )
  trained = pool_lib.train_pool(dataset, family, lowering.CPU, log=_quiet)
  assert trained.metadata['training']['schedule'] == 'multistep'
  default = pool_lib.train_pool(
    dataset, dataclasses.replace(SETTINGS, size=2, parallel=2, epochs=3), lowering.CPU, log=_quiet
  )
  first = lambda pool: np.asarray(jax.tree_util.tree_leaves(pool.variables)[0])
  assert not np.allclose(first(trained), first(default))  # the recipe is not ignored
  dataset_settings = data_lib.DatasetSettings(name='folder:/data/tiny', cache_dir=str(tmp_path))
  directories = {pool_lib.default_pool_dir(s, dataset_settings) for s in (family, SETTINGS)}
  assert len(directories) == 2 and any('_multistep_' in d for d in directories)

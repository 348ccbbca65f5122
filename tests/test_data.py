"""Tests for dd_jax.data: sources, normalisation, errors and the class-balanced sampler."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dd_jax import config as config_lib
from dd_jax import data, keys
from dd_jax.data import ClassSampler, DataError, check_ipc, load_dataset, prepare_tfds
from dd_jax.data import folder as folder_lib


def _write_image(path, size=(6, 5), mode='RGB', seed=0):
  rng = np.random.default_rng(seed)
  channels = 3 if mode == 'RGB' else 1
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
  return pixels


def _make_image_folder(
  root, classes=('cat', 'ant', 'bee'), train_per_class=4, test_per_class=2, mode='RGB'
):
  """root/{train,test}/<class>/<i>.png; returns {(split, class, i): pixels [H, W, C]}."""
  pixels = {}
  for split, count in (('train', train_per_class), ('test', test_per_class)):
    for c_idx, class_name in enumerate(classes):
      for i in range(count):
        path = os.path.join(root, split, class_name, f'{i}.png')
        seed = (split == 'test') * 100 + c_idx * 10 + i
        pixels[split, class_name, i] = _write_image(path, mode=mode, seed=seed)
  return pixels


def _make_tiny_imagenet(root, wnids=('n02', 'n01'), train_per_class=3):
  for w_idx, wnid in enumerate(wnids):
    for i in range(train_per_class):
      path = os.path.join(root, 'train', wnid, 'images', f'{wnid}_{i}.JPEG')
      _write_image(path, seed=w_idx * 10 + i)
  lines = []
  for i, wnid in enumerate(list(wnids) * 2):
    _write_image(os.path.join(root, 'val', 'images', f'val_{i}.JPEG'), seed=100 + i)
    lines.append(f'val_{i}.JPEG\t{wnid}\t0\t0\t5\t4\n')
  with open(os.path.join(root, 'val', 'val_annotations.txt'), 'w') as f:
    f.writelines(lines)
  os.makedirs(os.path.join(root, 'test', 'images'))  # unlabelled, must be ignored
  _write_image(os.path.join(root, 'test', 'images', 'test_0.JPEG'), seed=999)


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_and_stratified_deterministic_split():
  ds = load_dataset('digits')
  assert ds.name == 'digits'
  assert ds.train_images.shape == (1347, 8, 8, 1) and ds.test_images.shape == (450, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.train_images.max() == 255  # 16 -> 255
  # Stratified: every class has ~75 % of its images in train.
  train_counts = np.bincount(ds.train_labels, minlength=10)
  test_counts = np.bincount(ds.test_labels, minlength=10)
  np.testing.assert_allclose(train_counts / (train_counts + test_counts), 0.75, atol=0.01)
  again = load_dataset('digits')
  np.testing.assert_array_equal(ds.train_images, again.train_images)
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)
  # No reference constants: mean/std are computed from the training split.
  np.testing.assert_allclose(ds.mean, [ds.train_images.mean() / 255], rtol=1e-6)


# ---------------------------------------------------------------------------- tfds


@pytest.mark.parametrize(
  'name, shape, mean, std',
  [
    ('mnist', (28, 28, 1), (0.1307,), (0.3081,)),
    ('cifar10', (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
  ],
)
def test_tfds_source_under_mock_data(name, shape, mean, std):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    ds = load_dataset(f'tfds:{name}')
  assert ds.name == name
  assert ds.train_images.shape == (12, *shape) and ds.test_images.shape == (12, *shape)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert len(ds.class_names) == 10
  assert ds.mean == mean and ds.std == std


def test_tfds_not_prepared_error_says_what_to_run(tmp_path, caplog):
  pytest.importorskip('tensorflow_datasets')
  (tmp_path / 'cifar10' / '3.0.2').mkdir(parents=True)  # a folder without dataset_info.json
  with caplog.at_level('WARNING', logger='absl'), pytest.raises(DataError) as excinfo:
    load_dataset('tfds:cifar10', data_dir=str(tmp_path))
  # TFDS's own warnings about that folder are not shown before our message.
  assert 'dataset_info.json' not in caplog.text
  message = str(excinfo.value)
  assert "pip install 'dd_jax[prepare]'" in message
  assert f'python -m dd_jax.data.prepare_tfds cifar10 --data_dir={tmp_path}' in message
  assert 'folder:' in message


def test_prepare_tfds_without_tensorflow_fails_clearly(monkeypatch, tmp_path):
  monkeypatch.setattr(prepare_tfds, '_tensorflow_available', lambda: False)
  with pytest.raises(SystemExit) as excinfo:
    prepare_tfds.main(['mnist', f'--data_dir={tmp_path}'])
  assert 'TensorFlow' in str(excinfo.value) and 'dd_jax[prepare]' in str(excinfo.value)


# ---------------------------------------------------------------------------- folder


def test_image_folder_source(tmp_path):
  pixels = _make_image_folder(tmp_path / 'toy')
  ds = load_dataset(f'folder:{tmp_path / "toy"}', cache_dir=str(tmp_path / 'cache'))
  assert ds.name == 'toy'
  assert ds.class_names == ('ant', 'bee', 'cat')  # sorted folder names
  assert ds.train_images.shape == (12, 5, 6, 3) and ds.test_images.shape == (6, 5, 6, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [4, 4, 4])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])
  # Labels follow the images: the bee test images are exactly the pixels written for 'bee'.
  bee_test = ds.test_images[ds.test_labels == 1]
  np.testing.assert_array_equal(bee_test, np.stack([pixels['test', 'bee', i] for i in range(2)]))
  # Unknown name -> computed stats, matching numpy.
  expected = ds.train_images.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, expected.mean(0), rtol=1e-6)
  np.testing.assert_allclose(ds.std, expected.std(0), rtol=1e-6)


def test_image_folder_grayscale_has_one_channel_and_known_name_uses_spec_stats(tmp_path):
  _make_image_folder(tmp_path / 'mnist', mode='L')
  ds = load_dataset(f'folder:{tmp_path / "mnist"}', cache_dir=str(tmp_path / 'cache'))
  assert ds.image_shape == (5, 6, 1)
  assert ds.mean == (0.1307,) and ds.std == (0.3081,)
  computed = load_dataset(
    f'folder:{tmp_path / "mnist"}', cache_dir=str(tmp_path / 'cache'), normalization='computed'
  )
  assert computed.mean != (0.1307,)


def test_tiny_imagenet_layout(tmp_path):
  root = tmp_path / 'tiny-imagenet-200'
  _make_tiny_imagenet(root)
  ds = load_dataset(f'folder:{root}', cache_dir=str(tmp_path / 'cache'))
  assert ds.class_names == ('n01', 'n02')
  assert ds.train_images.shape == (6, 5, 6, 3) and ds.test_images.shape == (4, 5, 6, 3)
  np.testing.assert_array_equal(ds.test_labels, [1, 0, 1, 0])  # val_0 is n02, val_1 is n01, ...
  assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)


def test_grayscale_images_among_rgb_are_replicated(tmp_path):
  root = tmp_path / 'tiny-imagenet-200'  # the real one has a few grayscale JPEGs
  _make_tiny_imagenet(root)
  gray = _write_image(str(root / 'train' / 'n01' / 'images' / 'n01_0.JPEG'), mode='L', seed=5)
  ds = load_dataset(f'folder:{root}', cache_dir=str(tmp_path / 'cache'))
  assert ds.image_shape == (5, 6, 3)
  first_n01 = ds.train_images[ds.train_labels == 0][0]  # n01_0.JPEG sorts first
  np.testing.assert_array_equal(first_n01, np.repeat(first_n01[..., :1], 3, axis=-1))
  assert np.abs(first_n01[..., 0].astype(int) - gray[..., 0]).mean() < 20  # JPEG is lossy


def test_folder_cache_is_used_on_second_load_and_invalidated_by_changes(tmp_path, monkeypatch):
  root, cache_dir = tmp_path / 'toy', tmp_path / 'cache'
  _make_image_folder(root)
  first = load_dataset(f'folder:{root}', cache_dir=str(cache_dir))
  assert len(list(cache_dir.glob('toy-*.npz'))) == 1

  def no_decoding(path):
    raise AssertionError(f'decoded {path} although the cache is valid')

  monkeypatch.setattr(folder_lib, '_decode', no_decoding)
  second = load_dataset(f'folder:{root}', cache_dir=str(cache_dir))
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.test_labels, second.test_labels)
  assert first.class_names == second.class_names

  _write_image(str(root / 'train' / 'ant' / 'extra.png'), seed=7)  # folder changed -> decode again
  with pytest.raises(AssertionError, match='decoded'):
    load_dataset(f'folder:{root}', cache_dir=str(cache_dir))


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
  monkeypatch.setenv('DD_JAX_CACHE', str(tmp_path / 'env_cache'))
  _make_image_folder(tmp_path / 'toy')
  load_dataset(f'folder:{tmp_path / "toy"}')
  assert len(list((tmp_path / 'env_cache').glob('toy-*.npz'))) == 1


# ---------------------------------------------------------------------------- npz


def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'mine.npz'
  np.savez(
    path,
    x_train=rng.integers(0, 256, (10, 4, 4), dtype=np.uint8),
    y_train=np.arange(10) % 2,
    x_test=rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),
    y_test=np.array([0, 1, 0, 1]),
    class_names=np.array(['even', 'odd']),
  )
  ds = load_dataset(f'npz:{path}')
  assert ds.name == 'mine' and ds.class_names == ('even', 'odd')
  assert ds.train_images.shape == (10, 4, 4, 1) and ds.train_labels.dtype == np.int32
  np.testing.assert_allclose(ds.mean, [ds.train_images.mean() / 255], rtol=1e-6)
  np.testing.assert_allclose(ds.std, [(ds.train_images / 255).std()], rtol=1e-6)

  np.savez(
    path,
    x_train=np.zeros((2, 4, 4, 3), np.uint8),
    y_train=[0, 1],
    x_test=np.zeros((2, 4, 4, 3), np.uint8),
    y_test=[1, 0],
    mean=[0.1, 0.2, 0.3],
    std=[0.5, 0.5, 0.5],
  )
  ds = load_dataset(f'npz:{path}')
  assert ds.class_names == ('0', '1')
  assert ds.mean == (0.1, 0.2, 0.3) and ds.std == (0.5, 0.5, 0.5)
  assert load_dataset(f'npz:{path}', normalization='cifar10').std == (0.2023, 0.1994, 0.2010)


def test_npz_missing_key(tmp_path):
  path = tmp_path / 'bad.npz'
  np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=[0, 1])
  with pytest.raises(DataError, match=r'bad\.npz lacks the array\(s\) x_test, y_test'):
    load_dataset(f'npz:{path}')


@pytest.mark.parametrize(
  'change, message',
  [
    (
      {'y_train': np.eye(2, dtype=np.int64)[[0, 1, 0, 1]]},
      r'bad\.npz: y_train has shape \(4, 2\).*class ids of shape \(4,\).*y\.argmax\(axis=1\)',
    ),
    (
      {'x_train': np.zeros((0, 4, 4), np.uint8), 'y_train': np.zeros((0,), np.int64)},
      r'bad\.npz: x_train holds no images',
    ),
    ({'y_test': np.array([0, -1])}, r'bad\.npz: labels must be class ids >= 0'),
    (
      {'y_train': np.zeros(4, np.int64), 'y_test': np.zeros(2, np.int64)},
      r'has 1 class \(0\); distillation and its evaluation need at least two classes',
    ),
  ],
)
def test_npz_inputs_are_refused_naming_the_file_and_the_array(tmp_path, change, message):
  path = tmp_path / 'bad.npz'
  arrays = dict(
    x_train=np.zeros((4, 4, 4), np.uint8),
    y_train=np.array([0, 1, 0, 1]),
    x_test=np.zeros((2, 4, 4), np.uint8),
    y_test=np.array([0, 1]),
  )
  np.savez(path, **{**arrays, **change})
  with pytest.raises(DataError, match=message):
    load_dataset(f'npz:{path}')


@pytest.mark.parametrize(
  'y_train, y_test, class_names, message',
  [
    # 1-based labels without class_names: class 0 would exist with no images.
    (
      [1, 2, 3, 1, 2, 3],
      [1, 2, 3],
      None,
      r'1 of the 4 classes have no images in y_train '
      r'\(classes \[0\]; the labels present are \[1, 2, 3\]\).*remap them',
    ),
    ([0, 1, 2, 0, 1, 2], [0, 1, 1], None, r'no images in y_test \(classes \[2\]'),
    ([0, 1, 0, 1, 0, 1], [0, 1, 0], ['a', 'b', 'c'], r'1 of the 3 classes .* y_train'),
    ([0, 1, 5, 0, 1, 5], [0, 1, 5], ['a', 'b'], r'labels in \[0, 5\] but there are 2 class_names'),
  ],
)
def test_npz_labels_must_cover_every_class(tmp_path, y_train, y_test, class_names, message):
  path = tmp_path / 'labels.npz'
  arrays = dict(
    x_train=np.zeros((6, 4, 4), np.uint8),
    y_train=np.array(y_train),
    x_test=np.zeros((3, 4, 4), np.uint8),
    y_test=np.array(y_test),
  )
  if class_names:
    arrays['class_names'] = np.array(class_names)
  np.savez(path, **arrays)
  with pytest.raises(DataError, match=message):
    load_dataset(f'npz:{path}')


# ---------------------------------------------------------------------------- normalisation


def test_normalize_and_denormalize_round_trip_under_jit():
  ds = load_dataset('digits')
  images = ds.train_images[:5]
  normalized = jax.jit(ds.normalize)(images)
  assert normalized.dtype == jnp.float32 and normalized.shape == images.shape
  expected = (images / 255.0 - ds.mean[0]) / ds.std[0]
  np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(ds.denormalize)(normalized), images, atol=1e-4)
  assert float(ds.denormalize(jnp.full((1,), 100.0), clip=True)[0]) == 255.0


def test_known_dataset_names():
  assert data.known_dataset_key('CIFAR-10') == 'cifar10'
  assert data.known_dataset_key('cifar100') == 'cifar100'
  assert data.known_dataset_key('tiny-imagenet-200') == 'tiny_imagenet'
  assert data.known_dataset_key('fashion_mnist:3.0.1') == 'fashion_mnist'
  assert data.known_dataset_key('my_data') is None


# ---------------------------------------------------------------------------- errors


def test_unknown_source_lists_valid_ones():
  with pytest.raises(DataError, match=r"dataset\.name='hf:cifar10'.*folder:<path>"):
    load_dataset('hf:cifar10')


def test_unknown_tfds_dataset_suggests_close_names():
  with pytest.raises(DataError, match=r"dataset\.name='tfds:cifar11'.*did you mean .*cifar10"):
    load_dataset('tfds:cifar11')


def test_unknown_normalization():
  with pytest.raises(DataError, match='unknown normalization'):
    load_dataset('digits', normalization='imagenet21k')


def test_normalization_channel_mismatch(tmp_path):
  _make_image_folder(tmp_path / 'toy')
  with pytest.raises(DataError, match='1 channel.*images have 3'):
    load_dataset(f'folder:{tmp_path / "toy"}', cache_dir=str(tmp_path / 'c'), normalization='mnist')


@pytest.mark.parametrize('source', ['folder', 'npz'])
def test_missing_path(tmp_path, source):
  with pytest.raises(DataError, match=f'{tmp_path / "nowhere"}.*does not exist'):
    load_dataset(f'{source}:{tmp_path / "nowhere"}')


def test_empty_class_folder(tmp_path):
  _make_image_folder(tmp_path / 'toy')
  os.makedirs(tmp_path / 'toy' / 'train' / 'dog')
  os.makedirs(tmp_path / 'toy' / 'test' / 'dog')
  with pytest.raises(DataError, match=r'train/dog contains no images'):
    load_dataset(f'folder:{tmp_path / "toy"}', cache_dir=str(tmp_path / 'c'))


def test_corrupt_image_is_named(tmp_path):
  _make_image_folder(tmp_path / 'toy')
  bad = tmp_path / 'toy' / 'test' / 'bee' / 'broken.png'
  bad.write_bytes(b'not a png at all')
  with pytest.raises(DataError, match=r'cannot decode image .*test/bee/broken\.png'):
    load_dataset(f'folder:{tmp_path / "toy"}', cache_dir=str(tmp_path / 'c'))


def test_inconsistent_sizes_name_an_example_of_each(tmp_path):
  _make_image_folder(tmp_path / 'toy')
  _write_image(str(tmp_path / 'toy' / 'train' / 'cat' / 'big.png'), size=(9, 9))
  expected = r'train/ant/0\.png is 6x5 \(WxH\) but .*train/cat/big\.png is 9x9'
  with pytest.raises(DataError, match=expected):
    load_dataset(f'folder:{tmp_path / "toy"}', cache_dir=str(tmp_path / 'c'))


def test_train_and_test_class_sets_differ(tmp_path):
  _make_image_folder(tmp_path / 'toy')
  _write_image(str(tmp_path / 'toy' / 'test' / 'dog' / '0.png'))
  with pytest.raises(DataError, match='class sets differ; only in train: -; only in test: dog'):
    load_dataset(f'folder:{tmp_path / "toy"}', cache_dir=str(tmp_path / 'c'))


def test_tiny_imagenet_val_class_missing_from_train(tmp_path):
  root = tmp_path / 'tiny-imagenet-200'
  _make_tiny_imagenet(root)
  with open(root / 'val' / 'val_annotations.txt', 'a') as f:
    f.write('val_0.JPEG\tn99\t0\t0\t1\t1\n')
  with pytest.raises(DataError, match='only in test: n99'):
    load_dataset(f'folder:{root}', cache_dir=str(tmp_path / 'c'))


def test_check_ipc():
  ds = load_dataset('digits')
  counts = ds.train_class_counts()
  smallest = int(np.argmin(counts))
  check_ipc(ds, 1)
  check_ipc(ds, int(counts.min()))
  with pytest.raises(DataError, match=f'class {smallest} .*{counts.min()}'):
    check_ipc(ds, int(counts.min()) + 1)
  for bad in (0, -3):
    with pytest.raises(DataError, match='positive integer'):
      check_ipc(ds, bad)
  no_class_9 = dataclasses.replace(
    ds,
    train_images=ds.train_images[ds.train_labels != 9],
    train_labels=ds.train_labels[ds.train_labels != 9],
  )
  with pytest.raises(DataError, match=r"class 9 \('9'\) of 'digits' has no training images"):
    check_ipc(no_class_9, 1)


# ---------------------------------------------------------------------------- validation split


def _indexed_dataset(train_counts=(5, 10, 20), test_per_class=3):
  """A Dataset whose every image's pixels hold its own index: train 0.., test 200.."""
  train_labels = np.repeat(np.arange(len(train_counts)), train_counts)
  np.random.default_rng(0).shuffle(train_labels)
  test_labels = np.repeat(np.arange(len(train_counts)), test_per_class)
  index_images = lambda first, n: np.broadcast_to(
    np.arange(first, first + n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1)
  )
  return data.Dataset(
    name='indexed',
    train_images=index_images(0, len(train_labels)),
    train_labels=train_labels,
    test_images=index_images(200, len(test_labels)),
    test_labels=test_labels,
    class_names=tuple(f'c{k}' for k in range(len(train_counts))),
    mean=(0.5,),
    std=(0.25,),
  )


def _ids(images):
  return images[:, 0, 0, 0].astype(int)


def test_validation_split_is_stratified_disjoint_from_train_and_test_and_deterministic():
  dataset = _indexed_dataset()
  split = data.hold_out_validation(dataset, 0.2, jax.random.key(0))
  assert split.held_out == 'validation' and 'validation=(7, 2, 2, 1)' in repr(split)
  train_ids, validation_ids = _ids(split.train_images), _ids(split.test_images)
  # Disjoint, together exactly the training split, and no test image anywhere.
  assert not set(train_ids) & set(validation_ids)
  assert sorted([*train_ids, *validation_ids]) == list(range(35))
  assert max(validation_ids) < 200 and max(train_ids) < 200
  # Labels travel with their images.
  np.testing.assert_array_equal(split.train_labels, dataset.train_labels[train_ids])
  np.testing.assert_array_equal(split.test_labels, dataset.train_labels[validation_ids])
  # Stratified: round(0.2 * n_k) of each class.
  np.testing.assert_array_equal(np.bincount(split.test_labels), [1, 2, 4])
  again = data.hold_out_validation(dataset, 0.2, jax.random.key(0))
  np.testing.assert_array_equal(_ids(again.test_images), validation_ids)
  other = data.hold_out_validation(dataset, 0.2, jax.random.key(1))
  assert set(_ids(other.test_images)) != set(validation_ids)


def test_validation_split_keeps_one_image_each_side_of_a_small_class():
  dataset = _indexed_dataset(train_counts=(2, 10))
  np.testing.assert_array_equal(
    np.bincount(data.hold_out_validation(dataset, 0.01, jax.random.key(0)).test_labels), [1, 1]
  )
  np.testing.assert_array_equal(
    np.bincount(data.hold_out_validation(dataset, 0.9, jax.random.key(0)).train_labels), [1, 1]
  )


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1])
def test_validation_fraction_outside_the_open_interval_is_refused(fraction):
  with pytest.raises(
    DataError, match=r'config.dataset.validation_fraction=.* must lie in \(0, 1\)'
  ):
    data.hold_out_validation(_indexed_dataset(), fraction, jax.random.key(0))


def test_a_class_of_one_image_cannot_give_validation_data():
  with pytest.raises(DataError, match=r"class 0 \('c0'\) has 1 training image"):
    data.hold_out_validation(_indexed_dataset(train_counts=(1, 4)), 0.5, jax.random.key(0))


def test_a_split_dataset_is_not_split_again():
  split = data.hold_out_validation(_indexed_dataset(), 0.2, jax.random.key(0))
  with pytest.raises(DataError, match='already held out'):
    data.hold_out_validation(split, 0.2, jax.random.key(0))


def test_dataset_settings_from_config_open_the_configured_split(digits):
  config = config_lib.default_config()
  assert data.DatasetSettings.from_config(config) == data.DatasetSettings()  # defaults agree
  config.dataset.name = 'digits'
  config.dataset.validation_fraction = 0.2
  config.dataset.validation_seed = 3
  settings = data.DatasetSettings.from_config(config)
  assert settings == data.DatasetSettings(name='digits', validation_fraction=0.2, validation_seed=3)
  # The split is held out with the key of its own seed's 'validation' stream.
  opened = data.open_dataset(settings)
  expected = data.hold_out_validation(digits, 0.2, keys.run_key(3, 'validation'))
  assert opened.held_out == 'validation'
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(opened, field), getattr(expected, field), err_msg=field)
  other_seed = data.open_dataset(dataclasses.replace(settings, validation_seed=4))
  assert not np.array_equal(other_seed.test_images, opened.test_images)
  # Without a fraction: the dataset as loaded, its test set the accuracies' data.
  whole = data.open_dataset(dataclasses.replace(settings, validation_fraction=0.0))
  assert whole.held_out == 'test'
  np.testing.assert_array_equal(whole.test_images, digits.test_images)
  config.dataset.validation_fraction = 1.0
  with pytest.raises(ValueError, match=r'^config\.dataset\.validation_fraction=1\.0 must lie'):
    data.DatasetSettings.from_config(config)


# ---------------------------------------------------------------------------- sampler


@pytest.fixture(name='sampler_data')
def _sampler_data():
  """30 images, class k has 5 + 5k images (5, 10, 15); pixel value = image index."""
  labels = np.repeat(np.arange(3), [5, 10, 15])
  np.random.default_rng(0).shuffle(labels)
  images = np.broadcast_to(np.arange(30, dtype=np.uint8)[:, None, None, None], (30, 2, 2, 1)).copy()
  return images, labels, ClassSampler.create(images, labels)


def test_sampler_layout(sampler_data):
  _, labels, sampler = sampler_data
  assert sampler.class_indices.shape == (3, 15)
  np.testing.assert_array_equal(sampler.class_counts, [5, 10, 15])
  assert sampler.smallest_count == 5 and sampler.smallest_class == 0
  for k in range(3):
    np.testing.assert_array_equal(
      sampler.class_indices[k, : 5 + 5 * k], np.flatnonzero(labels == k)
    )


def test_sample_class_without_replacement_and_only_that_class(sampler_data):
  _, labels, sampler = sampler_data
  for seed in range(20):
    indices = np.asarray(data.sample_class_indices(sampler, jax.random.key(seed), 2, 5))
    assert len(set(indices.tolist())) == 5
    assert (labels[indices] == 2).all()
  images = data.sample_class(sampler, jax.random.key(0), 1, 4)
  assert images.shape == (4, 2, 2, 1) and images.dtype == jnp.uint8
  assert (labels[np.asarray(images[:, 0, 0, 0])] == 1).all()  # pixel value = image index


def test_sample_uniform_draws_distinct_images_with_their_labels(sampler_data):
  _, labels, sampler = sampler_data
  counts = np.zeros(30)
  for seed in range(40):
    images, drawn_labels = data.sample_uniform(sampler, jax.random.key(seed), 12)
    indices = np.asarray(images[:, 0, 0, 0])  # pixel value = image index
    assert len(set(indices.tolist())) == 12
    np.testing.assert_array_equal(drawn_labels, labels[indices])
    counts[indices] += 1
  assert counts.min() > 0  # every image can be drawn (uniform over the set, not per class)
  with pytest.raises(DataError, match=r'n must be an integer in \[1, 30\]'):
    data.sample_uniform(sampler, jax.random.key(0), 31)


def test_sample_class_determinism(sampler_data):
  _, _, sampler = sampler_data
  a = data.sample_class_indices(sampler, jax.random.key(1), 2, 5)
  b = data.sample_class_indices(sampler, jax.random.key(1), 2, 5)
  c = data.sample_class_indices(sampler, jax.random.key(2), 2, 5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sample_whole_class_uses_every_image(sampler_data):
  _, labels, sampler = sampler_data
  for seed in range(3):  # class 0 has 5 images: n = 5 must return each of them once
    indices = data.sample_class_indices(sampler, jax.random.key(seed), 0, 5)
    np.testing.assert_array_equal(np.sort(indices), np.flatnonzero(labels == 0))


def test_sampler_jit_and_vmap_over_classes(sampler_data):
  _, labels, sampler = sampler_data

  @jax.jit
  def draw(sampler, key):
    keys = jax.random.split(key, 3)
    return jax.vmap(lambda k, c: data.sample_class_indices(sampler, k, c, 5))(keys, jnp.arange(3))

  indices = np.asarray(draw(sampler, jax.random.key(0)))
  assert indices.shape == (3, 5)
  for k in range(3):
    assert (labels[indices[k]] == k).all() and len(set(indices[k].tolist())) == 5

  batches = data.sample_all_classes(sampler, jax.random.key(0), 5)
  assert batches.shape == (3, 5, 2, 2, 1) and batches.dtype == jnp.uint8
  for k in range(3):
    assert (labels[np.asarray(batches[k, :, 0, 0, 0])] == k).all()
  assert not np.array_equal(batches, data.sample_all_classes(sampler, jax.random.key(1), 5))


def test_sampler_rejects_n_larger_than_smallest_class(sampler_data):
  _, _, sampler = sampler_data
  with pytest.raises(DataError, match='n=6 .*class 0 has only 5'):
    data.sample_class(sampler, jax.random.key(0), 2, 6)  # even for a class that has 15
  with pytest.raises(DataError, match='n=6'):
    data.sample_all_classes(sampler, jax.random.key(0), 6)
  with pytest.raises(DataError, match='positive'):
    data.sample_class(sampler, jax.random.key(0), 0, 0)


def test_sampler_from_dataset():
  ds = load_dataset('digits')
  sampler = ClassSampler.from_dataset(ds)
  assert sampler.num_classes == 10 and sampler.images.shape == ds.train_images.shape
  assert sampler.smallest_count == ds.train_class_counts().min()


def test_random_real_subset_is_class_blocked_and_distinct():
  labels = np.array([0, 1, 2] * 10)
  indices = data.random_real_subset(jax.random.key(0), labels, 4)
  np.testing.assert_array_equal(labels[indices], np.repeat(np.arange(3), 4))
  assert len(set(indices.tolist())) == 12
  again = data.random_real_subset(jax.random.key(0), labels, 4)
  np.testing.assert_array_equal(indices, again)

"""Shared fixtures, cheaper XLA compilation and a persistent compilation cache.

Test programs are tiny, so compile time dominates: optimisation level 0 halves it (measured:
7.1 s -> 3.5 s for a small evaluation program) without changing results beyond float rounding.
"""

import contextlib
import functools
import os

os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dd_jax import config as config_lib  # noqa: E402
from dd_jax import data as data_lib  # noqa: E402
from dd_jax import lowering as lowering_lib  # noqa: E402
from dd_jax import pool as pool_lib  # noqa: E402
from dd_jax import progress  # noqa: E402
from dd_jax import train as train_lib  # noqa: E402
from dd_jax.distill import base  # noqa: E402

# The image shape and class count of each dataset of configs/paper.py.
PAPER_SHAPES = {
  'mnist': ((28, 28, 1), 10),
  'fashion_mnist': ((28, 28, 1), 10),
  'svhn': ((32, 32, 3), 10),
  'cifar10': ((32, 32, 3), 10),
  'cifar100': ((32, 32, 3), 100),
  'tinyimagenet': ((64, 64, 3), 200),
}

# The tiny pool's settings: one set everywhere, so every test reuses the same compiled epoch.
TINY_POOL = pool_lib.PoolSettings(
  model='ConvNetD1',
  size=3,
  epochs=6,
  parallel=3,
  seed=0,
  recipe=train_lib.OptimizerRecipe(batch_size=6, lr=0.01, momentum=0.9, weight_decay=5e-4),
)


@contextlib.contextmanager
def float64():
  """Enables float64 inside the block (for finite-difference checks), on every jax version."""
  enable = getattr(jax, 'enable_x64', None)
  if enable is None:  # older jax
    from jax.experimental import enable_x64 as enable  # pylint: disable=g-import-not-at-top

    with enable():
      yield
  else:
    with enable(True):
      yield


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  # pytest-xdist's workers (`-n 2`) share one cache: the same programs compile once.
  root = tmp_path_factory.getbasetemp()
  in_worker = 'PYTEST_XDIST_WORKER' in os.environ
  directory = (root.parent if in_worker else root) / 'jax_cache'
  directory.mkdir(exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield


@pytest.fixture(scope='session')
def digits():
  """scikit-learn's 8x8 digits (1347 training, 450 test images, 10 classes)."""
  return data_lib.load_dataset('digits')


def make_tiny_config(**overrides):
  """A DM + IID config on digits that runs in seconds: ipc 2, 6 iterations, a small network,
  2 evaluation networks x 2 epochs. `overrides`: {'section.field': value} (or top-level)."""
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
    node = config
    for part in filter(None, section.split('.')):
      node = node[part]
    node[name] = value
  return config


@pytest.fixture
def tiny_config():
  """`make_tiny_config` as a fixture: tiny_config(**{'distill.lr': 2.0})."""
  return make_tiny_config


@pytest.fixture
def wrap_steps(monkeypatch):
  """Intercepts every distillation step (any method): `wrap_steps(wrapper)` makes a step call
  `wrapper(original_step, state, sampler)`; `wrap_steps(None)` restores the real steps.

  E.g. a simulated kill: wrap_steps(lambda step, state, sampler: raise_at(4) or step(...)).
  """
  original = base.Step.__call__

  def install(wrapper):
    if wrapper is None:
      monkeypatch.setattr(base.Step, '__call__', original)
    else:
      monkeypatch.setattr(
        base.Step,
        '__call__',
        lambda self, state, sampler: wrapper(functools.partial(original, self), state, sampler),
      )

  return install


def interrupt_at(step_number):
  """A `wrap_steps` wrapper that raises KeyboardInterrupt (a simulated kill) when the step from
  state `step_number` starts."""

  def wrapper(step, state, sampler):
    if int(state.step) == step_number:
      raise KeyboardInterrupt('simulated kill')
    return step(state, sampler)

  return wrapper


@pytest.fixture
def interrupt():
  """`interrupt_at` as a fixture."""
  return interrupt_at


def make_tiny_dataset(name='tiny', num_classes=3, per_class=6, seed=0):
  """8x8 grey images; class c is a fixed random pattern plus noise (trivially separable)."""
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(40, 215, size=(num_classes, 8, 8, 1))

  def split(count):
    labels = np.repeat(np.arange(num_classes), count)
    images = patterns[labels] + rng.normal(0, 10, size=(len(labels), 8, 8, 1))
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels.astype(np.int32)

  train_images, train_labels = split(per_class)
  test_images, test_labels = split(4)
  return data_lib.Dataset(
    name=name,
    train_images=train_images,
    train_labels=train_labels,
    test_images=test_images,
    test_labels=test_labels,
    class_names=tuple(f'c{k}' for k in range(num_classes)),
    mean=(0.5,),
    std=(0.25,),
  )


@pytest.fixture(scope='session')
def tiny_dataset():
  """`make_tiny_dataset()`: 3 classes x 6 training images of 8x8."""
  return make_tiny_dataset()


@pytest.fixture(scope='session')
def saved_pool(tiny_dataset, tmp_path_factory):
  """(pool, directory): TINY_POOL trained on `tiny_dataset` and saved in `directory` (treat
  both as read-only; copy the directory to change it)."""
  directory = str(tmp_path_factory.mktemp('pools') / 'tiny')
  return pool_lib.train_pool(
    tiny_dataset, TINY_POOL, lowering_lib.CPU, log=lambda _: None, directory=directory
  ), directory


@pytest.fixture(scope='session')
def pool(saved_pool):
  """The trained tiny pool (read-only)."""
  return saved_pool[0]


@pytest.fixture
def recorded_bars(monkeypatch):
  """dd_jax.progress's bars, recorded instead of shown: a list of (description, total, bar),
  each bar with its tick count `n`."""
  bars = []

  class Bar:
    def __init__(self, total, desc, **kwargs):
      self.n = 0
      bars.append((desc, total, self))

    def update(self, amount):
      self.n += amount

    def close(self):
      pass

  monkeypatch.setattr(progress, 'tqdm', Bar)
  return bars

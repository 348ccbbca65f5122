"""The evaluation protocol: it learns, settings from the config, the baseline set."""

import jax
import numpy as np
import pytest

from dd_jax import config as config_lib
from dd_jax import evaluate, lowering
from dd_jax import train as train_lib


def _separable_data(num_per_class=6):
  # Class c images are constant c-dependent patterns: trivially learnable.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), num_per_class)
  patterns = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  images = patterns[labels] + 0.1 * rng.normal(size=(len(labels), 8, 8, 1)).astype(np.float32)
  return images, labels


def test_evaluate_set_learns_a_separable_problem():
  images, labels = _separable_data()
  settings = evaluate.EvalSettings(
    model='ConvNetW32',
    num_eval=3,
    epochs=20,
    recipe=train_lib.OptimizerRecipe(batch_size=8),
    augment_strategy='none',
  )
  accuracies = evaluate.evaluate_set(
    jax.random.key(0), images, labels, images, labels, 3, settings, lowering.CPU
  ).last
  assert accuracies.shape == (3,)
  np.testing.assert_array_equal(accuracies, 100.0)
  # Untrained (zero epochs is not allowed; one tiny-lr epoch is near chance).
  weak = evaluate.evaluate_set(
    jax.random.key(0),
    images,
    labels,
    images,
    labels,
    3,
    evaluate.EvalSettings(
      model='ConvNetW32',
      num_eval=3,
      epochs=1,
      recipe=train_lib.OptimizerRecipe(lr=1e-6),
      augment_strategy='none',
    ),
    lowering.CPU,
  )
  assert weak.last.mean() < 90.0


def test_settings_from_config():
  config = config_lib.default_config()
  config.eval.batch_size, config.eval.lr, config.eval.schedule = 64, 0.05, 'halves'
  settings = evaluate.EvalSettings.from_config(config)
  assert settings.recipe == train_lib.OptimizerRecipe(
    batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4
  )
  assert (settings.schedule, settings.share_augment_op) == ('halves', False)
  assert settings.train_settings() == train_lib.TrainSettings(
    epochs=1000,
    recipe=settings.recipe,
    augment_strategy='color_crop_cutout_flip_scale_rotate',
    schedule='halves',
    share_augment_op=False,
  )
  # The defaults are the reference's schedule and per-network DSA ops.
  default = evaluate.EvalSettings.from_config(config_lib.default_config())
  assert default == evaluate.EvalSettings()
  assert (default.schedule, default.share_augment_op) == ('reference', False)


@pytest.mark.parametrize('lowering_name', ['cpu', 'accelerator'])
def test_evaluation_shows_progress_that_ends_at_100_percent(recorded_bars, lowering_name):
  images, labels = _separable_data()
  settings = evaluate.EvalSettings(
    model='ConvNetW32',
    num_eval=2,
    epochs=20,
    recipe=train_lib.OptimizerRecipe(batch_size=8),
    augment_strategy='none',
  )
  evaluate.evaluate_set(
    jax.random.key(0), images, labels, images, labels, 3, settings, lowering.resolve(lowering_name)
  )
  [(description, total, bar)] = recorded_bars
  assert description == f'training 2 networks (ConvNetW32) on {len(images)} images'
  # 21 epochs of full minibatches: about 50 ticks per network, once for both under vmap.
  steps = 21 * (len(images) // 8)
  per_network = steps // max(1, steps // 50)
  assert total == per_network * (2 if lowering_name == 'cpu' else 1)
  assert bar.n == total

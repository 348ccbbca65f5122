"""The evaluation protocol: vmapped training equals one-at-a-time, it learns, the baseline set."""

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import evaluate
from dd_jax import models
from dd_jax import train as train_lib


def _separable_data(num_per_class=6):
  # Class c images are constant c-dependent patterns: trivially learnable.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), num_per_class)
  patterns = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  images = patterns[labels] + 0.1 * rng.normal(size=(len(labels), 8, 8, 1)).astype(np.float32)
  return images, labels


def test_networks_trained_together_equal_one_at_a_time():
  images, labels = _separable_data()
  net = models.get_network('ConvNetW32', 3)
  settings = evaluate.EvalSettings(model='ConvNetW32', num_eval=2, epochs=2, batch_size=8,
                                   augment_strategy='color_crop')
  keys = jax.random.split(jax.random.key(0), 2)
  op_key = jax.random.key(1)
  train = jax.jit(lambda keys: train_lib.train_networks(
      keys, op_key, jnp.asarray(images), jnp.asarray(labels, jnp.int32), net,
      settings.train_settings()))
  together = train(keys)
  for i in range(2):
    alone = train(keys[i:i + 1])
    for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(a[i], b[0], rtol=2e-4, atol=2e-5)


def test_evaluate_set_learns_a_separable_problem():
  images, labels = _separable_data()
  settings = evaluate.EvalSettings(model='ConvNetW32', num_eval=3, epochs=20, batch_size=8,
                                   augment_strategy='none')
  accuracies = evaluate.evaluate_set(jax.random.key(0), images, labels, images, labels, 3,
                                     settings)
  assert accuracies.shape == (3,)
  np.testing.assert_array_equal(accuracies, 100.0)
  # Untrained (zero epochs is not allowed; one tiny-lr epoch is near chance).
  weak = evaluate.evaluate_set(jax.random.key(0), images, labels, images, labels, 3,
                               evaluate.EvalSettings(model='ConvNetW32', num_eval=3, epochs=1,
                                                     lr=1e-6, augment_strategy='none'))
  assert weak.mean() < 90.0


def test_random_real_subset_is_class_blocked_and_distinct():
  labels = np.array([0, 1, 2] * 10)
  indices = evaluate.random_real_subset(jax.random.key(0), labels, 4)
  np.testing.assert_array_equal(labels[indices], np.repeat(np.arange(3), 4))
  assert len(set(indices.tolist())) == 12
  again = evaluate.random_real_subset(jax.random.key(0), labels, 4)
  np.testing.assert_array_equal(indices, again)


def test_cross_architecture_reports_each_network_and_the_largest_drop():
  images, labels = _separable_data()
  settings = evaluate.EvalSettings(num_eval=2, epochs=3, batch_size=8, augment_strategy='none')
  report = evaluate.cross_architecture(jax.random.key(0), images, labels, images, labels, 3,
                                       ('ConvNetW32', 'MLP', 'ResNet18'), settings,
                                       reference='ConvNetW32')
  results = report['results']
  assert list(results) == ['ConvNetW32', 'MLP', 'ResNet18']
  assert len(results['ConvNetW32']['accuracies']) == 2
  assert 'too small' in results['ResNet18']['error']  # 8x8 inputs: reported, not fatal
  expected = results['ConvNetW32']['mean'] - results['MLP']['mean']
  assert report['largest_drop'] == {'model': 'MLP', 'drop': expected}

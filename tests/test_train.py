"""The trainer: PyTorch SGD semantics, the reference's epoch schedule, per-network DSA ops."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from dd_jax import augment as augment_lib
from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import evaluate, lowering, models
from dd_jax import pool as pool_lib
from dd_jax import train as train_lib


def _data(num_images=6, num_classes=3, seed=0):
  """[N, 8, 8, 1] class patterns plus noise, and [N] labels."""
  rng = np.random.default_rng(seed)
  labels = np.arange(num_images) % num_classes
  patterns = rng.normal(size=(num_classes, 8, 8, 1)).astype(np.float32)
  images = patterns[labels] + 0.3 * rng.normal(size=(num_images, 8, 8, 1)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def _torch_sgd_reference(net, variables, images, labels, recipe, epochs, schedule):
  """Full-batch training written as the reference's loop with torch.optim.SGD's update.

  'reference' is DatasetCondensation's evaluate_synset: `for ep in range(Epoch + 1)`, a new
  optimizer (zero momentum buffer) at 0.1 lr after epoch `Epoch // 2 + 1`.
  """
  params = variables['params']
  buffers = jax.tree_util.tree_map(jnp.zeros_like, params)
  lr = recipe.lr

  def loss(params):
    logits, _ = net.apply_train({**variables, 'params': params}, images)
    return train_lib.cross_entropy(logits, labels)

  def step(params, buffers, lr):
    grads = jax.grad(loss)(params)
    grads = jax.tree_util.tree_map(lambda g, p: g + recipe.weight_decay * p, grads, params)
    buffers = jax.tree_util.tree_map(lambda b, g: recipe.momentum * b + g, buffers, grads)
    return jax.tree_util.tree_map(lambda p, b: p - lr * b, params, buffers), buffers

  zero = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
  if schedule == 'reference':
    for ep in range(epochs + 1):
      params, buffers = step(params, buffers, lr)
      if ep == epochs // 2 + 1:
        lr, buffers = lr * 0.1, zero(buffers)
  elif schedule == 'halves':
    for ep in range(epochs):
      if ep == epochs // 2:
        lr, buffers = lr * 0.1, zero(buffers)
      params, buffers = step(params, buffers, lr)
  else:
    for _ in range(epochs):
      params, buffers = step(params, buffers, lr)
  return params


@pytest.mark.parametrize('schedule', train_lib.SCHEDULES)
def test_trainer_equals_torch_sgd_reference(schedule):
  images, labels = _data()
  net = models.get_network('MLP', 3)
  # One full batch per epoch: the data order changes only the rounding of the mean loss.
  recipe = train_lib.SGDRecipe(batch_size=6, lr=0.05, momentum=0.9, weight_decay=0.01)
  settings = train_lib.TrainSettings(epochs=6, recipe=recipe, schedule=schedule)
  keys = jax.random.split(jax.random.key(0), 1)
  trained = train_lib.train_networks(keys, images, labels, net, settings, lowering.CPU)
  initial, _, _ = train_lib.init_networks(keys, net, images.shape[1:], recipe.optimizer())
  first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
  expected = _torch_sgd_reference(net, first(initial), images, labels, recipe, 6, schedule)
  for got, want in zip(
    jax.tree_util.tree_leaves(first(trained)['params']), jax.tree_util.tree_leaves(expected)
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _one_step(net, images, labels, microbatch):
  """Parameters and logits after one momentum SGD step from fixed weights, jitted."""
  variables = net.init(jax.random.key(1), (1, *images.shape[1:]))
  variables = jax.tree_util.tree_map(lambda x: x.astype(images.dtype), variables)
  optimizer = train_lib.SGDRecipe(lr=0.1, momentum=0.9, weight_decay=0.01).optimizer()
  step = jax.jit(
    lambda v, s: train_lib.sgd_step(net, optimizer, v, s, images, labels, microbatch=microbatch)
  )
  new_variables, _, logits = step(variables, optimizer.init(variables['params']))
  return new_variables, logits


@pytest.mark.parametrize('precision', ['float64', 'float32'])
@pytest.mark.parametrize('microbatch', [3, 4])  # 2 full passes and a partial one; 2 full passes
def test_microbatched_step_equals_the_whole_batch_step(precision, microbatch):
  # Instance norm, ReLU and pooling act per image: the summed gradients are the whole batch's.
  net = models.get_network('ConvNet', 3, width=8, depth=2)
  images, labels = _data(num_images=8 if microbatch == 4 else 7)
  with float64() if precision == 'float64' else contextlib.nullcontext():
    if precision == 'float64':
      images = images.astype(jnp.float64)
    whole, whole_logits = _one_step(net, images, labels, microbatch=0)
    split, split_logits = _one_step(net, images, labels, microbatch=microbatch)
  tolerance = {'float64': 1e-12, 'float32': 2e-6}[precision]
  np.testing.assert_allclose(split_logits, whole_logits, rtol=tolerance, atol=tolerance)
  assert jax.tree_util.tree_structure(split) == jax.tree_util.tree_structure(whole)
  for got, want in zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(whole)):
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
  initial = jax.tree_util.tree_leaves(net.init(jax.random.key(1), (1, *images.shape[1:])))
  moved = [
    np.max(np.abs(np.asarray(a) - np.asarray(b)))
    for a, b in zip(jax.tree_util.tree_leaves(split), initial)
  ]
  assert min(moved) > 1e-4  # the step updated every parameter


def test_microbatch_of_each_lowering():
  cifar, digits = (256, 32, 32, 3), (256, 8, 8, 1)
  # CPU: as many images as hold 16 CIFAR-10 images' pixels; batch-norm networks whole batches.
  assert lowering.CPU.microbatch(cifar, False) == 16
  assert lowering.CPU.microbatch((100, 28, 28, 1), False) == 20
  assert lowering.CPU.microbatch(digits, False) == 256  # small images: whole batches of 256
  assert lowering.CPU.microbatch((16, 32, 32, 3), False) == 16
  assert lowering.CPU.microbatch(cifar, True) == 0
  assert lowering.CPU.microbatch(digits, True) == 0
  # At least one image, however large.
  assert lowering.CPU.microbatch((8, 256, 256, 3), False) == 1
  # Accelerators: whole batches (0).
  assert lowering.ACCELERATOR.microbatch(cifar, False) == 0
  assert lowering.ACCELERATOR.microbatch(digits, False) == 0
  assert lowering.ACCELERATOR.microbatch(cifar, True) == 0
  # Variants: the pixels of 5 digits per pass; none (the whole batch).
  five = dataclasses.replace(lowering.CPU, microbatch_pixels=5 * 8 * 8)
  assert five.microbatch(digits, False) == 5 and five.microbatch(digits, True) == 0
  assert dataclasses.replace(lowering.CPU, microbatch_pixels=0).microbatch(cifar, False) == 0


def test_sgd_step_microbatch_errors():
  net = models.get_network('ConvNet', 3, width=8, depth=2)
  batch_norm_net = models.get_network('ConvNet', 3, width=8, depth=2, norm='batchnorm')
  images, labels = _data(num_images=20)
  optimizer = train_lib.SGDRecipe().optimizer()

  def step_shapes(net, microbatch):
    """Traces the step (abstractly: no FLOPs) with `microbatch`."""

    def step():
      variables = net.init(jax.random.key(1), images.shape)
      return train_lib.sgd_step(
        net,
        optimizer,
        variables,
        optimizer.init(variables['params']),
        images,
        labels,
        microbatch=microbatch,
      )

    return jax.eval_shape(step)

  for microbatch in (0, 8, 20, 32):  # whole batch, 3 passes, one pass (20 and 32)
    _, _, logits = step_shapes(net, microbatch)
    assert logits.shape == (20, 3)
  for microbatch in (0, 20, 32):  # a batch-norm network takes whole batches only
    _, _, logits = step_shapes(batch_norm_net, microbatch)
    assert logits.shape == (20, 3)
  with pytest.raises(ValueError, match='microbatch=8 splits a batch of 20.*microbatch=0'):
    step_shapes(batch_norm_net, 8)
  with pytest.raises(ValueError, match='microbatch must be >= 0'):
    step_shapes(net, -1)


def test_epoch_plan_and_learning_rates():
  assert train_lib.epoch_plan(1000, 'reference') == (1001, 502)  # 502 epochs at lr, 499 at 0.1
  assert train_lib.epoch_plan(1000, 'halves') == (1000, 500)
  assert train_lib.epoch_plan(1000, 'constant') == (1000, 1000)
  recipe = train_lib.SGDRecipe(lr=0.01)

  def learning_rates(epochs, schedule):
    settings = train_lib.TrainSettings(epochs=epochs, recipe=recipe, schedule=schedule)
    epochs_trained, _ = train_lib.epoch_plan(epochs, schedule)
    return [float(train_lib.epoch_lr(settings, e)) for e in range(epochs_trained)]

  high, low = np.float32(0.01), np.float32(0.01 * 0.1)
  assert learning_rates(4, 'reference') == [high] * 4 + [low]
  assert learning_rates(4, 'halves') == [high] * 2 + [low] * 2
  assert learning_rates(4, 'constant') == [high] * 4
  # The reference's loop, for every small epoch count: the lr of each epoch it trains.
  for epochs in range(1, 12):
    lr, reference_lrs = np.float32(0.01), []
    for ep in range(epochs + 1):
      reference_lrs.append(lr)
      if ep in [epochs // 2 + 1]:
        lr = np.float32(lr * np.float32(0.1))
    assert learning_rates(epochs, 'reference') == pytest.approx(reference_lrs, rel=1e-6)


def _eval_train_settings(share_augment_op):
  return evaluate.EvalSettings(
    model='MLP',
    num_eval=2,
    epochs=2,
    recipe=train_lib.SGDRecipe(batch_size=4),
    augment_strategy='color_crop_cutout_flip_scale_rotate',
    share_augment_op=share_augment_op,
  ).train_settings()


@pytest.mark.parametrize('loop_networks', [True, False])  # lax.map (CPU) or vmap
def test_networks_trained_together_equal_one_at_a_time(loop_networks):
  images, labels = _data(num_images=10)
  net = models.get_network('MLP', 3)
  settings = _eval_train_settings(share_augment_op=False)
  keys = jax.random.split(jax.random.key(0), 2)
  together_lowering = dataclasses.replace(lowering.CPU, loop_networks=loop_networks)
  train = jax.jit(
    lambda keys: train_lib.train_networks(keys, images, labels, net, settings, together_lowering)
  )
  together = train(keys)
  for i in range(2):
    alone = train(keys[i : i + 1])
    for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(a[i], b[0], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('share_augment_op', [False, True])
def test_each_network_draws_its_own_ops_unless_shared(monkeypatch, share_augment_op):
  images, labels = _data(num_images=10)  # 3 minibatches of at most 4, 3 epochs: 9 ops each
  net = models.get_network('MLP', 3)
  settings = _eval_train_settings(share_augment_op)
  drawn = {0: [], 1: []}  # network -> op indices, in draw order
  tracing = {}
  apply_random_op = augment_lib.apply_random_op

  def recording(op_key, param_key, batch, strategy, *, siamese):
    op_index = jax.random.randint(op_key, (), 0, len(augment_lib.parse_strategy(strategy)))
    jax.debug.callback(lambda n, i: drawn[int(n)].append(int(i)), tracing['network'], op_index)
    return apply_random_op(op_key, param_key, batch, strategy, siamese=siamese)

  def train_one(network_and_key, shared_op_key):
    tracing['network'], key = network_and_key
    return train_lib.train_networks(
      key[None], images, labels, net, settings, lowering.CPU, shared_op_key=shared_op_key
    )

  monkeypatch.setattr(augment_lib, 'apply_random_op', recording)
  keys = jax.random.split(jax.random.key(0), 2)
  jax.block_until_ready(
    jax.jit(train_lib.over_networks(train_one, loop=True))((jnp.arange(2), keys), jax.random.key(1))
  )
  jax.effects_barrier()
  assert len(drawn[0]) == len(drawn[1]) == 9
  assert (drawn[0] == drawn[1]) == share_augment_op
  assert len(set(drawn[0] + drawn[1])) > 1


@pytest.mark.parametrize(
  'settings_class, section, field, value',
  [
    (evaluate.EvalSettings, 'eval', 'lr', -1.0),
    (evaluate.EvalSettings, 'eval', 'batch_size', 0),
    (evaluate.EvalSettings, 'eval', 'num_eval', 0),
    (evaluate.EvalSettings, 'eval', 'schedule', 'cosine'),
    (evaluate.EvalSettings, 'eval', 'augment_strategy', 'color_blur'),
    (pool_lib.PoolSettings, 'pool', 'batch_size', 0),
    (pool_lib.PoolSettings, 'pool', 'weight_decay', -1e-4),
    (pool_lib.PoolSettings, 'pool', 'model', 'ResNet7'),
  ],
)
def test_settings_from_config_name_the_bad_config_field(settings_class, section, field, value):
  def from_config(config):
    if settings_class is pool_lib.PoolSettings:  # its directory defaults to the dataset's
      settings = settings_class.from_config(config, data_lib.DatasetSettings.from_config(config))
      assert settings.directory
      return dataclasses.replace(settings, directory='')
    return settings_class.from_config(config)

  config = config_lib.default_config()
  assert from_config(config) == settings_class()  # the defaults agree
  config[section][field] = value
  with pytest.raises(ValueError, match=rf'^config\.{section}\.{field}={value!r} '):
    from_config(config)


def test_train_settings_check_their_fields():
  with pytest.raises(ValueError, match='epochs=0 must be > 0'):
    train_lib.TrainSettings(epochs=0)
  with pytest.raises(ValueError, match="augment_strategy='crop_blur' names unknown DSA op"):
    train_lib.TrainSettings(epochs=1, augment_strategy='crop_blur')
  with pytest.raises(ValueError, match='momentum=-0.1 must be >= 0'):
    train_lib.SGDRecipe(momentum=-0.1)

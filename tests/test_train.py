"""The trainer: PyTorch SGD semantics, the reference's epoch schedule, per-network DSA ops."""

import contextlib
import dataclasses
import fractions as fractions_lib
import functools

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
from dd_jax.augment import idc as idc_lib


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
  recipe = train_lib.OptimizerRecipe(batch_size=6, lr=0.05, momentum=0.9, weight_decay=0.01)
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
  optimizer = train_lib.OptimizerRecipe(lr=0.1, momentum=0.9, weight_decay=0.01).optimizer()
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
  optimizer = train_lib.OptimizerRecipe().optimizer()

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
  recipe = train_lib.OptimizerRecipe(lr=0.01)

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
    recipe=train_lib.OptimizerRecipe(batch_size=4),
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
    train_lib.OptimizerRecipe(momentum=-0.1)


# The training recipes of the IDC family (multistep schedule, CutMix, IDC augmentation): options
# of TrainSettings; at their defaults the programs are those of before (the main job's synthetic
# sets and accuracies are bitwise unchanged, measured).


def _multistep_reference(epochs, fractions, gamma, lr=0.01):
  """The lr of every epoch under PyTorch's MultiStepLR(milestones, gamma), stepped per epoch.

  Milestones in exact integer arithmetic, as IDC writes 2 * E // 3: numerator * E // denominator
  of each fraction. The scheduler's constructor takes step 0 and every `scheduler.step()` after
  an epoch advances `last_epoch`; at a milestone the lr is multiplied by gamma ** (its count).
  """
  exact = [fractions_lib.Fraction(f).limit_denominator(100) for f in fractions]
  milestones = [f.numerator * epochs // f.denominator for f in exact]
  lrs, lr = [], lr * gamma ** milestones.count(0)
  for last_epoch in range(1, epochs + 1):
    lrs.append(np.float32(lr))
    lr *= gamma ** milestones.count(last_epoch)
  return lrs


def test_multistep_milestones_and_learning_rates():
  idc, ncfm = (2 / 3, 5 / 6), (1 / 5, 2 / 5, 3 / 5, 4 / 5)
  assert train_lib.milestone_epochs(60, idc) == (40, 50)  # DANCE's pool: epochs 40 and 50 of 60
  assert train_lib.milestone_epochs(1000, idc) == (666, 833)  # IDC: 2E // 3, 5E // 6
  assert train_lib.milestone_epochs(1500, idc) == (1000, 1250)
  assert train_lib.milestone_epochs(2000, ncfm) == (400, 800, 1200, 1600)
  assert train_lib.milestone_epochs(100, (0.29,)) == (29,)  # 0.29 * 100 = 28.999999999999996
  for epochs in range(1, 3001):
    assert train_lib.milestone_epochs(epochs, idc) == (2 * epochs // 3, 5 * epochs // 6)
  assert train_lib.epoch_plan(60, 'multistep', idc) == (60, 40)
  assert train_lib.epoch_plan(1000, 'multistep', idc) == (1000, 666)

  def learning_rates(epochs, fractions, gamma):
    settings = train_lib.TrainSettings(
      epochs=epochs,
      recipe=train_lib.OptimizerRecipe(lr=0.01),
      schedule='multistep',
      milestones=fractions,
      gamma=gamma,
    )
    return [float(train_lib.epoch_lr(settings, e)) for e in range(epochs)]

  # The pool recipe: 40 epochs at 0.01, 10 at 0.002, 10 at 0.0004.
  assert (
    learning_rates(60, idc, 0.2)
    == [np.float32(0.01)] * 40 + [np.float32(0.01 * 0.2)] * 10 + [np.float32(0.01 * 0.2 * 0.2)] * 10
  )
  # PyTorch's scheduler for every small epoch count, milestones sharing an epoch (E < 6) included.
  for epochs in range(1, 25):
    for fractions, gamma in ((idc, 0.2), (ncfm, 0.5)):
      assert learning_rates(epochs, fractions, gamma) == _multistep_reference(
        epochs, fractions, gamma
      ), (epochs, fractions)
  # Traced epoch indices (inside the scanned epochs) give the same rates.
  settings = train_lib.TrainSettings(
    epochs=60, schedule='multistep', milestones=idc, gamma=0.2, recipe=train_lib.OptimizerRecipe()
  )
  traced = jax.jit(jax.vmap(lambda e: train_lib.epoch_lr(settings, e)))(jnp.arange(60))
  assert list(np.asarray(traced)) == learning_rates(60, idc, 0.2)


def _torch_multistep_reference(
  net, variables, images, labels, recipe, epochs, milestones, gamma, reset_momentum=False
):
  """Full-batch torch.optim.SGD with MultiStepLR: the momentum buffer survives the milestones
  (`reset_momentum`: a fresh optimizer there instead, the 'reference' schedule's way)."""
  params = variables['params']
  buffers = jax.tree_util.tree_map(jnp.zeros_like, params)
  lr = recipe.lr

  def loss(params):
    logits, _ = net.apply_train({**variables, 'params': params}, images)
    return train_lib.cross_entropy(logits, labels)

  for epoch in range(epochs):
    if epoch in milestones:
      lr *= gamma
      if reset_momentum:
        buffers = jax.tree_util.tree_map(jnp.zeros_like, buffers)
    grads = jax.grad(loss)(params)
    grads = jax.tree_util.tree_map(lambda g, p: g + recipe.weight_decay * p, grads, params)
    buffers = jax.tree_util.tree_map(lambda b, g: recipe.momentum * b + g, buffers, grads)
    params = jax.tree_util.tree_map(lambda p, b: p - lr * b, params, buffers)
  return params


def test_multistep_equals_torch_sgd_with_multisteplr_keeping_momentum():
  images, labels = _data()
  net = models.get_network('MLP', 3)
  recipe = train_lib.OptimizerRecipe(batch_size=6, lr=0.05, momentum=0.9, weight_decay=0.01)
  settings = train_lib.TrainSettings(
    epochs=6, recipe=recipe, schedule='multistep', milestones=(1 / 3, 2 / 3), gamma=0.2
  )
  keys = jax.random.split(jax.random.key(0), 1)
  trained = train_lib.train_networks(keys, images, labels, net, settings, lowering.CPU)
  initial, _, _ = train_lib.init_networks(keys, net, images.shape[1:], recipe.optimizer())
  first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
  got = jax.tree_util.tree_leaves(first(trained)['params'])
  reference = functools.partial(
    _torch_multistep_reference, net, first(initial), images, labels, recipe, 6, (2, 4), 0.2
  )
  for a, b in zip(got, jax.tree_util.tree_leaves(reference())):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Resetting the buffer at the milestones would be measurably different.
  reset = jax.tree_util.tree_leaves(reference(reset_momentum=True))
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, reset)) > 1e-3


def test_recipe_settings_check_their_fields():
  base = dict(epochs=10)
  # No milestone: PyTorch's MultiStepLR([]), a constant lr.
  assert train_lib.TrainSettings(**base, schedule='multistep').milestones == ()
  assert train_lib.epoch_plan(10, 'multistep') == (10, 10)
  with pytest.raises(ValueError, match=r"milestones=\(0.5,\) is only for schedule='multistep'"):
    train_lib.TrainSettings(**base, schedule='reference', milestones=(0.5,))
  with pytest.raises(ValueError, match=r"gamma=0.2 is only for schedule='multistep'; use 0.1"):
    train_lib.TrainSettings(**base, gamma=0.2)
  for bad in ((0.8, 0.5), (0.5, 0.5), (0.0, 0.5), (0.5, 1.0)):
    with pytest.raises(ValueError, match='must be increasing fractions of the epochs'):
      train_lib.TrainSettings(**base, schedule='multistep', milestones=bad)
  with pytest.raises(ValueError, match='gamma=0.0 must be > 0'):
    train_lib.TrainSettings(**base, schedule='multistep', milestones=(0.5,), gamma=0.0)
  with pytest.raises(ValueError, match='cutmix_probability=1.5 must be <= 1'):
    train_lib.TrainSettings(**base, cutmix_probability=1.5)
  with pytest.raises(ValueError, match='cutmix_probability=-0.1 must be >= 0'):
    train_lib.TrainSettings(**base, cutmix_probability=-0.1)
  with pytest.raises(ValueError, match="augment_mode='autoaugment' is not valid"):
    train_lib.TrainSettings(**base, augment_mode='autoaugment')
  # Each mode checks the strategy with its own op names.
  with pytest.raises(ValueError, match="augment_strategy='brightness' names unknown IDC DiffAug"):
    train_lib.TrainSettings(**base, augment_mode='idc', augment_strategy='brightness')
  with pytest.raises(ValueError, match="augment_strategy='translate' names unknown DSA op"):
    train_lib.TrainSettings(**base, augment_strategy='translate')
  train_lib.TrainSettings(**base, augment_mode='idc', augment_strategy='translate')
  # A config's list becomes a tuple: settings are hashable static arguments of jit.
  settings = train_lib.TrainSettings(**base, schedule='multistep', milestones=[2 / 3, 5 / 6])
  assert settings.milestones == (2 / 3, 5 / 6) and hash(settings) is not None


@pytest.mark.parametrize(
  'height, width, lam, centre, box, ratio',
  [
    (8, 8, 0.75, (3, 5), (1, 5, 3, 7), 0.75),  # sides 8 * 0.5 = 4: rows 3 -+ 2, cols 5 -+ 2
    (8, 8, 0.4375, (0, 7), (0, 3, 4, 8), 0.8125),  # sides 6, clipped at the top-right corner
    (8, 8, 0.609375, (4, 4), (2, 6, 2, 6), 0.75),  # sides int(8 * 0.625) = 5: 2 * (5 // 2) = 4
    (8, 6, 0.75, (2, 5), (0, 4, 4, 6), 1 - 8 / 48),  # sides 4 and int(6 * 0.5) = 3 -> 2, clipped
    (8, 8, 0.0, (4, 4), (0, 8, 0, 8), 0.0),  # the whole image
    (8, 8, 1.0, (4, 4), (4, 4, 4, 4), 1.0),  # an empty box
  ],
)
def test_cutmix_box_and_ratio_hand_computed(height, width, lam, centre, box, ratio):
  assert tuple(int(b) for b in train_lib.cutmix_box(lam, *centre, height, width)) == box
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, height, width, 2)).astype(np.float32)
  partner = np.array([2, 0, 1])
  draw = train_lib.CutMixDraw(
    apply=jnp.asarray(True),
    lam=jnp.asarray(lam),
    partner=jnp.asarray(partner),
    centre_row=jnp.asarray(centre[0]),
    centre_col=jnp.asarray(centre[1]),
  )
  mixed, got_ratio = jax.jit(train_lib.cutmix)(jnp.asarray(images), draw)
  expected = images.copy()
  rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
  expected[:, rows, cols] = images[partner, rows, cols]
  np.testing.assert_array_equal(mixed, expected)
  assert float(got_ratio) == pytest.approx(ratio, rel=1e-7)


def test_cutmix_loss_hand_computed():
  logits = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
  labels, partner_labels = np.array([1, 2]), np.array([0, 0])
  # CE = logsumexp(row) - logit of the label, by hand:
  lse = np.log(np.exp(logits).sum(-1))  # [log(1 + e + e^2), log(2 + e^3)] = [2.4076060, 3.0949230]
  own = np.mean(lse - logits[[0, 1], labels])  # (0.4076060 + 0.0949230) / 2
  partner = np.mean(lse - logits[[0, 1], partner_labels])  # (1.4076060 + 3.0949230) / 2
  assert own == pytest.approx(0.2512645, abs=1e-7) and partner == pytest.approx(2.2512645, abs=1e-7)
  got = train_lib.cutmix_loss(jnp.asarray(logits), labels, partner_labels, 0.75)
  np.testing.assert_allclose(got, 0.75 * own + 0.25 * partner, rtol=1e-6)
  assert float(got) == pytest.approx(0.7512645, abs=1e-6)
  # Ratio 1 (a minibatch the coin left unmixed) is the plain cross-entropy, bitwise.
  logits32 = jnp.asarray(logits, jnp.float32)
  assert train_lib.cutmix_loss(logits32, labels, partner_labels, jnp.float32(1.0)) == (
    train_lib.cross_entropy(logits32, labels)
  )


def test_cutmix_draw_is_one_box_and_lambda_per_minibatch():
  height, width, batch = 8, 8, 6
  draws = jax.vmap(lambda k: train_lib.sample_cutmix(k, batch, height, width, 0.5))(
    jax.random.split(jax.random.key(0), 400)
  )
  # One lambda, one centre per minibatch; a permutation of the batch.
  assert draws.lam.shape == draws.centre_row.shape == draws.apply.shape == (400,)
  assert draws.partner.shape == (400, batch)
  np.testing.assert_array_equal(np.sort(draws.partner, axis=1), np.tile(np.arange(batch), (400, 1)))
  assert 0.42 < float(np.mean(draws.apply)) < 0.58  # p = 0.5 (400 draws: 3.2 sigma)
  assert 0.45 < float(np.mean(draws.lam)) < 0.55  # Beta(1, 1) is uniform: mean 1/2
  assert set(np.asarray(draws.centre_row)) == set(range(height))
  # p = 1: always; p = 0: never.
  assert bool(train_lib.sample_cutmix(jax.random.key(1), batch, height, width, 1.0).apply)
  never = jax.vmap(lambda k: train_lib.sample_cutmix(k, batch, height, width, 0.0).apply)(
    jax.random.split(jax.random.key(0), 400)
  )
  assert not np.any(never)
  # Every image of a mixed minibatch changes inside the same box only.
  images = jnp.arange(batch, dtype=jnp.float32)[:, None, None, None] * jnp.ones((1, 8, 8, 1))
  draw = train_lib.sample_cutmix(jax.random.key(5), batch, height, width, 1.0)
  draw = draw._replace(lam=jnp.float32(0.5))
  mixed, ratio = train_lib.cutmix(images, draw)
  changed = np.asarray(mixed != images)[..., 0]  # [N, H, W]
  moved = np.asarray(draw.partner) != np.arange(batch)
  assert moved.any()
  np.testing.assert_array_equal(
    changed[moved], np.broadcast_to(changed[moved][0], changed[moved].shape)
  )
  assert 1 - changed[moved][0].sum() / 64 == pytest.approx(float(ratio))
  assert not changed[~moved].any()


def test_cutmix_off_or_not_drawn_leaves_the_batch_and_the_step():
  images, labels = _data(num_images=6)
  draw = train_lib.sample_cutmix(jax.random.key(0), 6, 8, 8, 0.0)
  assert not bool(draw.apply)
  mixed, ratio = train_lib.cutmix(images, draw)
  np.testing.assert_array_equal(mixed, images)
  assert float(ratio) == 1.0
  # The step with the unmixed minibatch's (partner labels, ratio 1) is the plain step, bitwise.
  net = models.get_network('MLP', 3)
  optimizer = train_lib.OptimizerRecipe().optimizer()
  variables = net.init(jax.random.key(1), (1, 8, 8, 1))
  state = optimizer.init(variables['params'])
  plain = jax.jit(lambda: train_lib.sgd_step(net, optimizer, variables, state, images, labels))()
  unmixed = jax.jit(
    lambda: train_lib.sgd_step(
      net, optimizer, variables, state, mixed, labels, mix=(labels[draw.partner], ratio)
    )
  )()
  for a, b in zip(jax.tree_util.tree_leaves(unmixed), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('microbatch', [0, 2])
def test_cutmix_step_minimises_the_mixed_loss(microbatch):
  # The step's gradient is that of cutmix_loss, whole batch or summed over microbatches.
  net = models.get_network('ConvNet', 3, width=8, depth=2)
  images, labels = _data(num_images=5)
  partner_labels, ratio = labels[jnp.array([3, 0, 4, 1, 2])], jnp.float32(0.6875)
  variables = net.init(jax.random.key(1), (1, 8, 8, 1))
  optimizer = train_lib.OptimizerRecipe(lr=0.1, momentum=0.0, weight_decay=0.0).optimizer()

  def loss(params):
    logits, _ = net.apply_train({**variables, 'params': params}, images)
    return train_lib.cutmix_loss(logits, labels, partner_labels, ratio)

  expected = jax.tree_util.tree_map(
    lambda p, g: p - 0.1 * g, variables['params'], jax.grad(loss)(variables['params'])
  )
  got, _, _ = jax.jit(
    lambda: train_lib.sgd_step(
      net,
      optimizer,
      variables,
      optimizer.init(variables['params']),
      images,
      labels,
      microbatch=microbatch,
      mix=(partner_labels, ratio),
    )
  )()
  for a, b in zip(jax.tree_util.tree_leaves(got['params']), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_training_cutmixes_each_minibatch_with_its_own_draw(monkeypatch):
  images, labels = _data(num_images=10)  # 3 minibatches of at most 4, 2 epochs: 6 draws
  net = models.get_network('MLP', 3)
  settings = train_lib.TrainSettings(
    epochs=2, recipe=train_lib.OptimizerRecipe(batch_size=4), cutmix_probability=1.0
  )
  drawn = []
  cutmix = train_lib.cutmix

  def recording(batch, draw):
    mixed, ratio = cutmix(batch, draw)
    jax.debug.callback(
      lambda lam, ratio, size: drawn.append((float(lam), float(ratio), int(size))),
      draw.lam,
      ratio,
      draw.partner.shape[0],
    )
    return mixed, ratio

  monkeypatch.setattr(train_lib, 'cutmix', recording)
  jax.block_until_ready(
    jax.jit(
      lambda keys: train_lib.train_networks(keys, images, labels, net, settings, lowering.CPU)
    )(jax.random.split(jax.random.key(0), 1))
  )
  jax.effects_barrier()
  assert [size for _, _, size in drawn] == [4, 4, 2] * 2  # the partial batch mixed as well
  assert len({lam for lam, _, _ in drawn}) == 6  # a new lambda per minibatch
  assert all(0.0 <= ratio <= 1.0 for _, ratio, _ in drawn)


def test_idc_minibatch_augmentation_draws_per_image_parameters():
  strategy = 'color_crop_flip_scale_rotate'
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(6, 8, 8, 3)).astype(np.float32))
  key = jax.random.key(4)
  got = train_lib.augment_minibatch(key, key, images, strategy, 'idc')
  # One key for both: IDC's DiffAug with batch=False.
  np.testing.assert_array_equal(got, idc_lib.augment(key, images, strategy, batch=False))
  # The geometric op comes from the op key, everything else from the parameter key.
  op_key, param_key = jax.random.key(5), jax.random.key(6)
  params = idc_lib.sample_params(param_key, strategy, 8, 8, 6)
  params = params._replace(geometric=idc_lib.sample_params(op_key, strategy, 8, 8).geometric)
  np.testing.assert_array_equal(
    train_lib.augment_minibatch(op_key, param_key, images, strategy, 'idc'),
    idc_lib.apply(images, params, strategy),
  )


@pytest.mark.parametrize('share_augment_op', [False, True])
def test_idc_training_shares_the_geometric_op_and_draws_parameters_per_image(
  monkeypatch, share_augment_op
):
  images, labels = _data(num_images=10)  # 3 minibatches of at most 4, 3 epochs: 9 draws each
  net = models.get_network('MLP', 3)
  settings = train_lib.TrainSettings(
    epochs=3,
    recipe=train_lib.OptimizerRecipe(batch_size=4),
    augment_mode='idc',
    augment_strategy='color_crop_flip_scale_rotate',
    share_augment_op=share_augment_op,
  )
  drawn = {0: [], 1: []}  # network -> (geometric op, per-image brightness), in draw order
  tracing = {}
  apply = idc_lib.apply

  def recording(batch, params, strategy):
    record = lambda n, g, b: drawn[int(n)].append((int(g), tuple(np.asarray(b).tolist())))
    jax.debug.callback(record, tracing['network'], params.geometric, params.brightness)
    return apply(batch, params, strategy)

  def train_one(network_and_key, shared_op_key):
    tracing['network'], key = network_and_key
    return train_lib.train_networks(
      key[None], images, labels, net, settings, lowering.CPU, shared_op_key=shared_op_key
    )

  monkeypatch.setattr(idc_lib, 'apply', recording)
  keys = jax.random.split(jax.random.key(0), 2)
  jax.block_until_ready(
    jax.jit(train_lib.over_networks(train_one, loop=True))((jnp.arange(2), keys), jax.random.key(1))
  )
  jax.effects_barrier()
  assert len(drawn[0]) == len(drawn[1]) == 9
  for network in (0, 1):
    sizes = [len(brightness) for _, brightness in drawn[network]]
    assert sizes == [4, 4, 2] * 3  # a parameter per image of the minibatch
    # Per-image parameters differ within every minibatch; one geometric op per minibatch.
    assert all(len(set(brightness)) == len(brightness) for _, brightness in drawn[network])
    assert len({op for op, _ in drawn[network]}) > 1  # ... drawn anew per minibatch
  ops = lambda network: [op for op, _ in drawn[network]]
  assert (ops(0) == ops(1)) == share_augment_op
  assert all(a[1] != b[1] for a, b in zip(drawn[0], drawn[1]))  # parameters per network


@pytest.mark.parametrize('loop_networks', [True, False])  # lax.map (CPU) or vmap
def test_recipes_trained_together_equal_one_at_a_time(loop_networks):
  images, labels = _data(num_images=10)
  net = models.get_network('MLP', 3)
  settings = train_lib.TrainSettings(
    epochs=3,
    recipe=train_lib.OptimizerRecipe(batch_size=4),
    schedule='multistep',
    milestones=(1 / 3, 2 / 3),
    gamma=0.2,
    augment_mode='idc',
    augment_strategy='color_crop_flip',
    cutmix_probability=0.5,
  )
  together_lowering = dataclasses.replace(lowering.CPU, loop_networks=loop_networks)
  train = jax.jit(
    lambda keys: train_lib.train_networks(keys, images, labels, net, settings, together_lowering)
  )
  keys = jax.random.split(jax.random.key(0), 2)
  together = train(keys)
  for i in range(2):
    alone = train(keys[i : i + 1])
    for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(a[i], b[0], rtol=2e-4, atol=2e-5)


def test_idc_recipe_learns_a_separable_problem():
  # The IDC family's recipe in small: multistep (2/3, 5/6) x0.2, IDC DiffAug per image,
  # CutMix p 0.5; 3 networks, 30 training images of 3 noisy class patterns, 60 test images.
  def data(num_images, seed):
    patterns = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    labels = np.arange(num_images) % 3
    noise = np.random.default_rng(seed).normal(size=(num_images, 8, 8, 3)).astype(np.float32)
    return jnp.asarray(patterns[labels] + 0.3 * noise), jnp.asarray(labels, jnp.int32)

  images, labels = data(30, 1)
  test_images, test_labels = data(60, 2)
  net = models.get_network('MLP', 3)
  settings = train_lib.TrainSettings(
    epochs=12,
    recipe=train_lib.OptimizerRecipe(batch_size=8, lr=0.01),
    schedule='multistep',
    milestones=(2 / 3, 5 / 6),
    gamma=0.2,
    augment_mode='idc',
    augment_strategy='color_crop_flip_scale_rotate',
    cutmix_probability=0.5,
  )
  accuracies = jax.jit(
    lambda keys: train_lib.accuracies(
      train_lib.train_networks(keys, images, labels, net, settings, lowering.CPU),
      net,
      test_images,
      test_labels,
    )
  )(jax.random.split(jax.random.key(0), 3))
  assert accuracies.shape == (3,)
  assert np.all(np.asarray(accuracies) >= 0.9)  # chance: 1/3


def _torch_adamw_reference(net, variables, images, labels, recipe, epochs):
  """Full-batch training with torch.optim.AdamW's update written out (its defaults: betas
  (0.9, 0.999), eps 1e-8): p <- p * (1 - lr * wd), then the bias-corrected Adam step."""
  params = variables['params']
  zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
  first, second = zeros(), zeros()
  lr, decay, (b1, b2), eps = recipe.lr, recipe.weight_decay, (0.9, 0.999), 1e-8

  def loss(params):
    logits, _ = net.apply_train({**variables, 'params': params}, images)
    return train_lib.cross_entropy(logits, labels)

  for t in range(1, epochs + 1):
    grads = jax.grad(loss)(params)
    first = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, first, grads)
    second = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, second, grads)

    def update(p, m, v, t=t):
      p = p * (1 - lr * decay)
      return p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)

    params = jax.tree_util.tree_map(update, params, first, second)
  return params


def test_adamw_recipe_equals_torch_adamw():
  with float64():
    images, labels = _data()
    images = images.astype(jnp.float64)
    net = models.get_network('MLP', 3)
    recipe = train_lib.OptimizerRecipe(batch_size=6, lr=0.01, weight_decay=0.1, algorithm='adamw')
    settings = train_lib.TrainSettings(epochs=5, recipe=recipe)
    keys = jax.random.split(jax.random.key(0), 1)
    initial, _, _ = train_lib.init_networks(keys, net, images.shape[1:], recipe.optimizer())
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    trained = train_lib.train_networks(keys, images, labels, net, settings, lowering.CPU)
    expected = _torch_adamw_reference(net, first(initial), images, labels, recipe, 5)
  moved = 0.0
  for got, want, start in zip(
    jax.tree_util.tree_leaves(first(trained)['params']),
    jax.tree_util.tree_leaves(expected),
    jax.tree_util.tree_leaves(first(initial)['params']),
  ):
    # Float32 weights: where a gradient is ~0, m / sqrt(v) amplifies rounding to ~1e-5; a wrong
    # update (no bias correction, coupled decay) is off by ~lr = 1e-2.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5)
    moved = max(moved, float(np.max(np.abs(np.asarray(want) - np.asarray(start)))))
  assert moved > 0.04  # Adam moves every weight by about lr per step: not a no-op


def test_evaluation_epochs():
  assert train_lib.evaluation_epochs(10, 3) == (3, 6, 9, 10)
  assert train_lib.evaluation_epochs(10, 5) == (5, 10)
  assert train_lib.evaluation_epochs(10, 0) == (10,)
  assert train_lib.evaluation_epochs(10, 10) == (10,)
  assert train_lib.evaluation_epochs(1001, 100)[-2:] == (1000, 1001)


@pytest.mark.parametrize('loop_networks', [True, False])  # lax.map (CPU) or vmap
def test_testing_every_k_epochs_trains_the_same_networks(loop_networks):
  images, labels = _data(num_images=12)
  test_images, test_labels = _data(num_images=30, seed=1)
  net = models.get_network('MLP', 3)
  settings = dataclasses.replace(
    _eval_train_settings(share_augment_op=False), epochs=7, schedule='multistep',
    milestones=(0.5,), gamma=0.2, augment_strategy='crop',
  )  # fmt: skip
  keys = jax.random.split(jax.random.key(0), 2)
  low = dataclasses.replace(lowering.CPU, loop_networks=loop_networks)
  curve = jax.jit(
    lambda keys: train_lib.train_and_test_networks(
      keys, images, labels, net, settings, low, test_images, test_labels, every=3
    )
  )(keys)
  assert curve.shape == (3, 2)  # after epochs 3, 6 and 7
  # The networks after 3 epochs (before the milestone at epoch 3: a constant lr) and after all 7
  # (the remainder segment) are `train_networks`' networks.
  first = dataclasses.replace(
    settings, epochs=3, schedule='constant', milestones=(), gamma=train_lib.MULTISTEP_GAMMA
  )
  for row, shorter in ((curve[0], first), (curve[2], settings)):
    variables = train_lib.train_networks(keys, images, labels, net, shorter, low)
    expected = train_lib.accuracies(variables, net, test_images, test_labels)
    np.testing.assert_allclose(row, expected, atol=1e-6)


def test_soft_targets_hand_computed():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 0])  # row 0 right, row 1 wrong (argmax 1)
  targets = train_lib.soft_targets(logits, labels)
  e = np.e
  expected = [
    np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum(),  # softmax of the teacher's logits
    [e / (e + 2), 1 / (e + 2), 1 / (e + 2)],  # softmax of the one-hot row
  ]
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  # NCFM's figure for 10 classes: a misclassified sample keeps 0.232 on its class.
  ten = train_lib.soft_targets(jnp.eye(10)[::-1], jnp.zeros(10, jnp.int32))
  assert float(ten[0, 0]) == pytest.approx(e / (e + 9), rel=1e-6) == pytest.approx(0.232, abs=5e-4)


@pytest.mark.parametrize('lowering_name', ['cpu', 'accelerator'])
def test_soft_labels_train_until_the_last_hard_label_epochs(lowering_name):
  images, labels = _data(num_images=12)
  net = models.get_network('MLP', 3)
  settings = dataclasses.replace(
    _eval_train_settings(share_augment_op=False), epochs=4, schedule='constant'
  )
  keys = jax.random.split(jax.random.key(0), 2)
  train = lambda settings, soft: train_lib.train_networks(
    keys, images, labels, net, settings, lowering.resolve(lowering_name), soft_labels=soft
  )
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  hard = train(settings, None)
  # One-hot targets are the labels: the same networks, to float rounding.
  for a, b in zip(leaves(hard), leaves(train(settings, jax.nn.one_hot(labels, 3)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  soft = jnp.full((12, 3), 1 / 3)  # uniform targets: nothing to learn from them
  # Every epoch on the hard labels (hard_label_epochs >= epochs): the soft targets are unused.
  all_hard = dataclasses.replace(settings, hard_label_epochs=4)
  for a, b in zip(leaves(hard), leaves(train(all_hard, soft))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The first two epochs on the soft targets: other networks.
  half = dataclasses.replace(settings, hard_label_epochs=2)
  moved = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(hard), leaves(train(half, soft)))
  )
  assert moved > 1e-3


def test_soft_cutmix_loss_mixes_the_targets():
  logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
  targets = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
  log_p = jax.nn.log_softmax(logits)
  ratio = 0.3
  mixed = ratio * targets + (1 - ratio) * targets[::-1]
  expected = -jnp.mean(jnp.sum(mixed * log_p, axis=-1))
  got = train_lib.cutmix_loss(logits, targets, targets[::-1], ratio)
  np.testing.assert_allclose(got, expected, rtol=1e-6)

"""IDM: partition and expansion, the model queue, per-class steps, the class-aware CE, the run."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import data as data_lib
from dd_jax import extractors, losses, models
from dd_jax import run as run_lib
from dd_jax import train as train_lib
from dd_jax.distill import base, idm
from dd_jax.lowering import CPU

RECIPE = train_lib.OptimizerRecipe(batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _quadrant_image():
  """A 4x4 one-channel image whose 2x2 quadrants are constant: TL 1, BL 2, TR 3, BR 4."""
  image = np.zeros((1, 4, 4, 1), np.float32)
  image[0, :2, :2], image[0, 2:, :2], image[0, :2, 2:], image[0, 2:, 2:] = 1, 2, 3, 4
  return image


def test_quadrant_order_and_expansion_of_a_hand_built_image():
  image = _quadrant_image()
  quadrants = idm.split_quadrants(image)
  assert quadrants.shape == (4, 1, 2, 2, 1)
  np.testing.assert_array_equal(quadrants[:, 0, 0, 0, 0], [1, 2, 3, 4])
  np.testing.assert_array_equal(idm.assemble_quadrants(quadrants), image)
  expanded = idm.expand(image)
  assert expanded.shape == (4, 4, 4, 1)
  for q, value in enumerate([1, 2, 3, 4]):  # constant quadrants stay constant
    np.testing.assert_allclose(expanded[q], value)
  # Quadrant-major order over several images: all top-left quadrants first.
  two = np.concatenate([image, 10 * image])
  np.testing.assert_allclose(idm.expand(two)[:, 0, 0, 0], [1, 10, 2, 20, 3, 30, 4, 40])


def test_bilinear_upsampling_matches_half_pixel_centres():
  # A 2x2 top-left quadrant [[a, b], [c, d]] upsampled x2 with align_corners=False: each output
  # row/column mixes its two nearest inputs 3:1, the border repeats the edge pixel.
  a, b, c, d = 1.0, 5.0, 3.0, 11.0
  image = np.zeros((1, 4, 4, 1), np.float32)
  image[0, :2, :2, 0] = [[a, b], [c, d]]
  weights = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  expected = weights @ np.array([[a, b], [c, d]]) @ weights.T
  np.testing.assert_allclose(idm.expand(image)[0, :, :, 0], expected, rtol=1e-6)


def test_downscale_is_2x2_average_pooling_and_init_fills_quadrants():
  images = jax.random.normal(jax.random.key(0), (3, 6, 8, 2))
  expected = np.asarray(images).reshape(3, 3, 2, 4, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(idm.downscale(images), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(idm.downscale(np.arange(4.0).reshape(1, 2, 2, 1)), [[[[1.5]]]])
  real = jax.random.normal(jax.random.key(1), (4, 3, 8, 8, 1))
  stored = idm.partitioned_init(real)
  assert stored.shape == (3, 8, 8, 1)
  for q in range(4):
    np.testing.assert_allclose(idm.split_quadrants(stored)[q], idm.downscale(real[q]), rtol=1e-6)


def test_expanded_set_stays_class_blocked():
  images = jnp.arange(3 * 2, dtype=jnp.float32).reshape(6, 1, 1, 1) * jnp.ones((6, 4, 4, 1))
  labels = jnp.repeat(jnp.arange(3), 2)
  expanded, expanded_labels = idm.expanded_set(images, labels, 3)
  assert expanded.shape == (24, 4, 4, 1)
  np.testing.assert_array_equal(expanded_labels, np.repeat(np.arange(3), 8))
  np.testing.assert_allclose(expanded[:8, 0, 0, 0], [0, 1] * 4)
  np.testing.assert_allclose(expanded[16:, 0, 0, 0], [4, 5] * 4)


def _queue(capacity=3, initial=2):
  net = models.get_network('ConvNetD1', 2, width=8)
  optimizer = RECIPE.optimizer()
  return (
    net,
    optimizer,
    idm.init_queue(jax.random.key(0), net, (8, 8, 1), capacity, initial, optimizer),
  )


def test_queue_push_pop_and_capacity():
  net, optimizer, queue = _queue(capacity=3, initial=2)
  np.testing.assert_array_equal(queue.valid, [True, True, False])
  assert int(queue.size()) == 2 and int(queue.next_slot) == 2
  first = idm.member(queue, 0)
  queue = idm.push(queue, jax.random.key(1), net, (8, 8, 1), optimizer)
  assert int(queue.size()) == 3 and int(queue.next_slot) == 0
  third = idm.member(queue, 2)
  # Full: the next push replaces the oldest network (slot 0), the others stay.
  queue = idm.push(queue, jax.random.key(2), net, (8, 8, 1), optimizer)
  assert int(queue.size()) == 3 and int(queue.next_slot) == 1
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  assert not np.allclose(leaves(idm.member(queue, 0))[0], leaves(first)[0])
  np.testing.assert_array_equal(leaves(idm.member(queue, 2))[0], leaves(third)[0])
  # Sampling only ever draws valid slots, and all of them.
  _, _, partial = _queue(capacity=5, initial=2)
  drawn = {int(idm.sample_member(partial, jax.random.key(i))) for i in range(60)}
  assert drawn == {0, 1}
  slots, mask = idm.pick_for_training(partial, jax.random.key(0), 3)
  assert len(set(np.asarray(slots).tolist())) == 3
  assert sorted(np.asarray(slots)[np.asarray(mask)].tolist()) == [0, 1]


def _train_members(queue, slots, mask, sampler, net, digits, lowering=CPU):
  """Three SGD steps of the picked queue members on the digits (key 1)."""
  return idm.train_members(
    queue,
    slots,
    mask,
    jax.random.key(1),
    sampler,
    net,
    RECIPE,
    lowering,
    steps=3,
    mean=digits.mean,
    std=digits.std,
  )


def test_train_members_trains_only_the_picked_valid_networks(digits):
  net = models.get_network('ConvNetD1', 10, width=8)
  queue = idm.init_queue(jax.random.key(0), net, (8, 8, 1), 4, 3, RECIPE.optimizer())
  sampler = data_lib.ClassSampler.from_dataset(digits)
  slots, mask = jnp.array([2, 0, 3]), jnp.array([True, True, False])
  trained = _train_members(queue, slots, mask, sampler, net, digits)
  kernel = lambda q, s: np.asarray(jax.tree_util.tree_leaves(idm.member(q, s))[0])
  for slot in (0, 2):
    assert not np.allclose(kernel(trained, slot), kernel(queue, slot))
  for slot in (1, 3):
    np.testing.assert_array_equal(kernel(trained, slot), kernel(queue, slot))
  np.testing.assert_array_equal(trained.seen, [48, 0, 48, 0])
  assert 0 <= float(trained.correct[0]) <= 48
  assert float(idm.training_accuracy(trained, 1)) == 0.0  # never trained: weight 0


def test_train_members_trains_the_same_networks_looped_and_batched(digits):
  net = models.get_network('ConvNetD1', 10, width=8)
  queue = idm.init_queue(jax.random.key(0), net, (8, 8, 1), 4, 3, RECIPE.optimizer())
  sampler = data_lib.ClassSampler.from_dataset(digits)
  slots, mask = jnp.array([2, 0]), jnp.array([True, True])
  trained = [
    _train_members(
      queue, slots, mask, sampler, net, digits, dataclasses.replace(CPU, loop_networks=loop)
    )
    for loop in (True, False)
  ]
  for looped, vmapped in zip(*(jax.tree.leaves(q.variables) for q in trained)):
    np.testing.assert_allclose(looped, vmapped, rtol=1e-5, atol=1e-6)
  # Trained at all, and the accuracy counts agree (argmax can only flip on a tie).
  assert not np.allclose(
    jax.tree.leaves(trained[0].variables)[0], jax.tree.leaves(queue.variables)[0]
  )
  np.testing.assert_array_equal(trained[0].correct, trained[1].correct)


def _idm_setup(
  digits,
  weights=losses.ObjectiveWeights(cc=0.0, cm=0.0),
  extractor=extractors.matching_net_extractor,
  **overrides,
):
  net = models.get_network('ConvNetW32', 10)
  settings = idm.IDMSettings(
    ipc=1,
    batch_real=8,
    strategy='color_crop_cutout_scale_rotate',
    model='ConvNetW32',
    lr=0.2,
    momentum=0.5,
    weights=weights,
    **{
      'queue_capacity': 4,
      'push_every': 2,
      'train_steps': 2,
      'queue_recipe': train_lib.OptimizerRecipe(batch_size=16),
      **overrides,
    },
  )
  labels = np.arange(10)
  images = jax.random.normal(jax.random.key(0), (10, 8, 8, 1))
  spec = base.DataSpec.of(digits)
  state = idm.init_idm_state(images, labels, net, settings, spec, seed=1)
  step = idm.make_idm_step(net, settings, spec, CPU, extractor)
  return step, state, data_lib.ClassSampler.from_dataset(digits)


def test_idm_step_compiles_once_while_the_queue_grows(digits):
  chex.clear_trace_counter()

  # Called once per trace of the step (inside the per-class scan's body).
  @chex.assert_max_traces(n=1)
  def features(params, key, syn_images, matching_features):
    del params, key, syn_images
    return matching_features

  step, state, sampler = _idm_setup(digits, extractor=extractors.Extractor('counting', features))
  sizes = []
  for _ in range(5):
    state, metrics = step(state, sampler)
    sizes.append(int(metrics['queue_size']))
  assert sizes == [4, 4, 4, 4, 4]  # pushes at steps 0, 2, 4 fill capacity 4 and then rotate
  assert int(state.queue.next_slot) == (3 + 3) % 4
  for name in ('loss', 'match', 'ce', 'net_accuracy', 'grad_norm'):
    assert np.isfinite(float(metrics[name])), name
  # Queue networks were trained: some running accuracy has been counted.
  assert float(jnp.sum(state.queue.seen)) > 0


def test_ce_weight_uses_the_accuracy_in_percent(digits):
  step, state, sampler = _idm_setup(
    digits, ce_weight=0.5, push_every=1000, queue_init=1, train_steps=0
  )
  queue = state.queue.replace(
    correct=state.queue.correct.at[0].set(30.0), seen=state.queue.seen.at[0].set(40.0)
  )  # 75 %
  state = state.replace(step=jnp.asarray(1, jnp.int32))  # no push at this step
  _, metrics = step(state.replace(queue=queue), sampler)
  assert float(metrics['net_accuracy']) == pytest.approx(75.0)
  # loss = dm + 0.5 * 75 * ce, summed over classes (CC and CM are off).
  assert float(metrics['ce']) > 0
  np.testing.assert_allclose(metrics['loss'], metrics['match'] + 37.5 * metrics['ce'], rtol=1e-5)
  # An untrained network (no counts) gives the CE weight 0.
  _, untrained = step(state, sampler)
  np.testing.assert_allclose(untrained['loss'], untrained['match'], rtol=1e-6)


def test_accuracy_restarts_at_the_listed_steps_or_every_window():
  listed = idm.IDMSettings(accuracy_restarts=(2, 5))
  assert [bool(listed.restarts_accuracies(jnp.asarray(t))) for t in range(7)] == [
    False,
    False,
    True,
    False,
    False,
    True,
    False,
  ]
  windowed = idm.IDMSettings(accuracy_window=3)
  assert [bool(windowed.restarts_accuracies(jnp.asarray(t))) for t in range(7)] == [
    False,
    False,
    False,
    True,
    False,
    False,
    True,
  ]


def test_idm_run_exports_the_expanded_set_and_resumes(tmp_path, tiny_config, wrap_steps, interrupt):
  config = tiny_config(
    method='idm',
    ipc=1,
    **{
      'distill.lr': 0.2,
      'idm.push_every': 2,
      'idm.queue_capacity': 4,
      'idm.train_steps': 2,
      'idm.train_batch_size': 16,
      'constraints.cc.weight': 0.01,
      'constraints.cm.weight': 0.03,
    },
  )
  reference = run_lib.run(config, str(tmp_path / 'uninterrupted'))
  exported = np.load(tmp_path / 'uninterrupted' / 'synthetic.npz')
  assert exported['images'].shape == (40, 8, 8, 1)
  assert exported['stored_images'].shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(exported['labels'], np.repeat(np.arange(10), 4))

  assert (reference['method'], reference['base_method']) == ('IDM + IID (reference)', 'idm')
  wrap_steps(interrupt(3))
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, str(tmp_path / 'resumed'))
  wrap_steps(None)
  resumed = run_lib.run(config, str(tmp_path / 'resumed'))
  np.testing.assert_array_equal(
    np.load(tmp_path / 'resumed' / 'synthetic.npz')['images'], exported['images']
  )
  assert resumed['eval']['accuracies'] == reference['eval']['accuracies']


def test_idm_input_checks(tmp_path, tiny_config):
  with pytest.raises(ValueError, match=r'ipc=50 needs 200 per class'):
    run_lib.run(tiny_config(method='idm', ipc=50), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r'config.distill.num_nets=2.*IDM'):
    run_lib.run(tiny_config(method='idm', **{'distill.num_nets': 2}), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match=r"config.model.name='ConvNetBN'.*batch"):
    run_lib.run(tiny_config(method='idm', **{'model.name': 'ConvNetBN'}), str(tmp_path / 'c'))

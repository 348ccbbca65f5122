"""Class centralization's extractors (dd_jax.extractors): the pool's draw, host against device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import data as data_lib
from dd_jax import extractors, losses, lowering
from dd_jax import train as train_lib
from dd_jax.distill import base, dm, idm


def test_matching_net_extractor_returns_the_matching_features():
  features = jnp.arange(6.0).reshape(2, 3)
  out = extractors.matching_net_extractor.features(
    None, jax.random.key(0), jnp.zeros((2, 4)), features
  )
  np.testing.assert_array_equal(out, features)
  assert (
    extractors.matching_net_extractor.step_params(jax.random.key_data(jax.random.key(0)), 3, 2)
    is None
  )


def test_pool_extractor_draws_one_member_per_key(pool, tiny_dataset):
  extractor = extractors.pool_extractor(pool)
  assert extractor.name == 'pool'
  dataset = tiny_dataset
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
  outputs = [
    np.asarray(
      features(jax.tree_util.tree_map(lambda x, i=i: x[i], selected), key, images, matching)
    )
    for i, key in enumerate(keys)
  ]
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
def test_steps_receive_only_the_drawn_members_and_match_a_draw_inside_jit(
  pool, tiny_dataset, method
):
  """The host-side draw picks the members a draw inside the step (from the step's CC keys)
  would: same CC terms and images over several steps, with only those members on the device.
  Fails if the host and the step derive their class-centralization keys differently."""
  dataset = tiny_dataset

  def features_drawn_inside(params, key, syn_images, matching_features):
    del matching_features
    member = jax.tree_util.tree_map(lambda x: x[jax.random.randint(key, (), 0, pool.size)], params)
    return pool.net.embed(member, syn_images, train=True)[0]

  inside = extractors.Extractor(
    'inside', features_drawn_inside, jax.tree_util.tree_map(jnp.asarray, pool.variables)
  )
  host = extractors.pool_extractor(pool)
  weights = losses.ObjectiveWeights(cc=1.0)
  net = pool.net
  spec = base.DataSpec.of(dataset)
  num_classes = dataset.num_classes
  ipc = 2 if method == 'dm' else 1  # CC needs two images of a class (IDM expands one to four)
  labels = np.repeat(np.arange(num_classes), ipc)
  images = jax.random.normal(jax.random.key(0), (num_classes * ipc, 8, 8, 1))
  sampler = data_lib.ClassSampler.from_dataset(dataset)
  common = dict(
    ipc=ipc,
    batch_real=4,
    strategy='color_crop_cutout',
    weights=weights,
    model=net.name,
    lr=0.1,
    momentum=0.5,
  )
  if method == 'dm':
    num_drawn = 2
    settings = base.DistillSettings(num_nets=num_drawn, **common)
    make = lambda extractor: dm.make_dm_step(net, settings, spec, lowering.CPU, extractor)
    state = base.init_state(images, labels, settings.image_optimizer(spec), jax.random.key(1))
  else:
    num_drawn = 1
    settings = idm.IDMSettings(
      queue_capacity=3,
      train_steps=1,
      queue_recipe=train_lib.OptimizerRecipe(batch_size=4),
      **common,
    )
    make = lambda extractor: idm.make_idm_step(net, settings, spec, lowering.CPU, extractor)
    state = idm.init_idm_state(images, labels, net, settings, spec, seed=1)
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


@pytest.mark.parametrize('method', ['dm', 'idm'])
def test_scale_free_forms_take_the_real_spread_under_the_cc_extractor(pool, tiny_dataset, method):
  """A pool extractor whose features are scaled by 10 leaves a 'relative' run unchanged (the
  real batch goes through the same drawn member) and changes a 'squared' one. Fails if the unit
  came from another feature space (e.g. the matching network's real features)."""
  dataset = tiny_dataset
  host = extractors.pool_extractor(pool)
  scaled = dataclasses.replace(host, features=lambda *args: 10.0 * host.features(*args))
  net, spec, num_classes = pool.net, base.DataSpec.of(dataset), dataset.num_classes
  ipc = 2 if method == 'dm' else 1
  labels = np.repeat(np.arange(num_classes), ipc)
  images = jax.random.normal(jax.random.key(0), (num_classes * ipc, 8, 8, 1))
  sampler = data_lib.ClassSampler.from_dataset(dataset)

  def final_images(form, extractor):
    common = dict(
      ipc=ipc,
      batch_real=4,
      strategy='color_crop_cutout',
      weights=losses.ObjectiveWeights(cc=1.0, cc_form=form),
      model=net.name,
      lr=0.1,
    )
    if method == 'dm':
      settings = base.DistillSettings(**common)
      step = dm.make_dm_step(net, settings, spec, lowering.CPU, extractor)
      state = base.init_state(images, labels, settings.image_optimizer(spec), jax.random.key(1))
    else:
      settings = idm.IDMSettings(
        queue_capacity=3,
        train_steps=1,
        queue_recipe=train_lib.OptimizerRecipe(batch_size=4),
        **common,
      )
      step = idm.make_idm_step(net, settings, spec, lowering.CPU, extractor)
      state = idm.init_idm_state(images, labels, net, settings, spec, seed=1)
    for _ in range(3):
      state, metrics = step(state, sampler)
      assert np.isfinite(float(metrics['cc'])) and float(metrics['cc']) > 0
    return np.asarray(state.images)

  np.testing.assert_allclose(
    final_images('relative', scaled), final_images('relative', host), rtol=1e-4, atol=1e-5
  )
  assert not np.allclose(final_images('squared', scaled), final_images('squared', host), atol=1e-3)

"""Losses against hand-computed values, their definitions, and float64 finite differences."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import losses


@contextlib.contextmanager
def float64():
  enable = getattr(jax, 'enable_x64', None)
  if enable is None:  # older jax
    from jax.experimental import enable_x64 as enable  # pylint: disable=g-import-not-at-top

    with enable():
      yield
  else:
    with enable(True):
      yield


def test_mean_matching_hand_computed():
  real = jnp.array([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3)
  syn = jnp.array([[0.0, 1.0]])
  # (2 - 0)^2 + (3 - 1)^2 = 8
  np.testing.assert_allclose(losses.mean_matching(real, syn), 8.0, atol=1e-6)


def test_local_covariance_hand_computed():
  # Two samples, one 1x2 map of 2 channels each (N=2, H=1, W=2, C=2).
  fmap = jnp.array([[[[1.0, 0.0], [2.0, 1.0]]], [[[3.0, 2.0], [0.0, 1.0]]]])
  # Centred over the batch per (position, channel): position 0: means (2, 1) -> sample 0
  # (-1, -1), sample 1 (1, 1); position 1: means (1, 1) -> sample 0 (1, 0), sample 1 (-1, 0).
  # Sigma = 1/2 * sum over samples and positions of g g^T
  #       = 1/2 * ([[1,1],[1,1]] + [[1,0],[0,0]] + [[1,1],[1,1]] + [[1,0],[0,0]]) = [[2,1],[1,1]].
  np.testing.assert_allclose(losses.local_covariance(fmap), [[2.0, 1.0], [1.0, 1.0]], atol=1e-6)


def test_local_covariance_is_sum_of_per_position_biased_covariances():
  fmap = np.random.default_rng(0).normal(size=(7, 3, 2, 5))
  expected = sum(
    np.cov(fmap[:, h, w, :], rowvar=False, bias=True) for h in range(3) for w in range(2)
  )
  np.testing.assert_allclose(
    losses.local_covariance(jnp.asarray(fmap)), expected, rtol=1e-5, atol=1e-5
  )


def test_local_covariance_channel_row_grouping():
  fmap = np.random.default_rng(1).normal(size=(4, 3, 2, 5))  # N, H, W, C
  # Rows (c, h), columns are the W positions: vectors of size C*H, one per column.
  vectors = np.transpose(fmap, (0, 2, 3, 1)).reshape(4, 2, 15)
  expected = sum(np.cov(vectors[:, w, :], rowvar=False, bias=True) for w in range(2))
  result = losses.local_covariance(jnp.asarray(fmap), 'channel_row')
  chex.assert_shape(result, (15, 15))
  np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='grouping'):
    losses.local_covariance(jnp.asarray(fmap), 'rows')


def test_covariance_matching_hand_computed_and_ipc1_constant():
  real = jnp.array([[[[1.0, 0.0], [2.0, 1.0]]], [[[3.0, 2.0], [0.0, 1.0]]]])
  syn = jnp.zeros((2, 1, 2, 2))  # covariance 0
  # || [[2,1],[1,1]] ||_F^2 = 4 + 1 + 1 + 1 = 7
  np.testing.assert_allclose(losses.covariance_matching(real, syn), 7.0, atol=1e-6)
  # One synthetic sample: its covariance is identically 0 and the gradient vanishes.
  single = jax.random.normal(jax.random.key(0), (1, 1, 2, 2))
  np.testing.assert_allclose(losses.covariance_matching(real, single), 7.0, atol=1e-6)
  grad = jax.grad(lambda s: losses.covariance_matching(real, s))(single)
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_class_centralization_hand_computed():
  features = jnp.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])  # mean (1, 1)
  # squared distances: 1+1=2, 1+1=2, 0+4=4 -> sum 8
  np.testing.assert_allclose(losses.class_centralization(features), 8.0, atol=1e-6)
  expected_exp = sum(max(0.0, np.exp(0.1 * d) - 1.1) for d in (2.0, 2.0, 4.0))
  np.testing.assert_allclose(
    losses.class_centralization(features, 'exp', alpha=0.1, beta=1.1), expected_exp, atol=1e-6
  )
  # beta above every exp(...) makes the paper form vanish.
  np.testing.assert_allclose(
    losses.class_centralization(features, 'exp', alpha=0.1, beta=10.0), 0.0, atol=1e-7
  )
  with pytest.raises(ValueError, match='form'):
    losses.class_centralization(features, 'cubic')


def test_class_objective_weights_terms():
  rng = np.random.default_rng(2)
  real_map = jnp.asarray(rng.normal(size=(6, 2, 2, 3)))
  syn_map = jnp.asarray(rng.normal(size=(3, 2, 2, 3)))
  cc_features = jnp.asarray(rng.normal(size=(3, 4)))
  weights = losses.ObjectiveWeights(cc=0.5, cm=0.25)
  terms = losses.class_objective(
    real_map.reshape(6, -1), real_map, syn_map.reshape(3, -1), syn_map, cc_features, weights
  )
  np.testing.assert_allclose(
    terms.dm, losses.mean_matching(real_map.reshape(6, -1), syn_map.reshape(3, -1)), rtol=1e-6
  )
  np.testing.assert_allclose(terms.cm, losses.covariance_matching(real_map, syn_map), rtol=1e-6)
  np.testing.assert_allclose(terms.cc, losses.class_centralization(cc_features), rtol=1e-6)
  np.testing.assert_allclose(terms.total, terms.dm + 0.5 * terms.cc + 0.25 * terms.cm, rtol=1e-6)
  zero = losses.class_objective(
    real_map.reshape(6, -1),
    real_map,
    syn_map.reshape(3, -1),
    syn_map,
    cc_features,
    losses.ObjectiveWeights(cc=0.0, cm=0.0),
  )
  np.testing.assert_allclose(zero.total, terms.dm, rtol=1e-6)


def test_classwise_objective_sums_per_class_objectives():
  rng = np.random.default_rng(3)
  real_map = jnp.asarray(rng.normal(size=(4, 5, 2, 2, 3)), jnp.float32)
  syn_map = jnp.asarray(rng.normal(size=(4, 2, 2, 2, 3)), jnp.float32)
  cc_features = jnp.asarray(rng.normal(size=(4, 2, 6)), jnp.float32)
  real_features = real_map.reshape(4, 5, -1)
  syn_features = syn_map.reshape(4, 2, -1)
  weights = losses.ObjectiveWeights()
  batched = jax.jit(lambda *a: losses.classwise_objective(*a, weights))(
    real_features, real_map, syn_features, syn_map, cc_features
  )
  looped = [
    losses.class_objective(
      real_features[c], real_map[c], syn_features[c], syn_map[c], cc_features[c], weights
    )
    for c in range(4)
  ]
  for name in ('total', 'dm', 'cc', 'cm'):
    np.testing.assert_allclose(
      getattr(batched, name), sum(getattr(t, name) for t in looped), rtol=1e-5
    )


def test_real_side_gets_no_gradient():
  rng = np.random.default_rng(4)
  real_map = jnp.asarray(rng.normal(size=(5, 2, 2, 3)), jnp.float32)
  syn_map = jnp.asarray(rng.normal(size=(3, 2, 2, 3)), jnp.float32)

  def total(real_map, syn_map):
    return losses.class_objective(
      real_map.reshape(5, -1), real_map, syn_map.reshape(3, -1), syn_map, syn_map.reshape(3, -1)
    ).total

  real_grad, syn_grad = jax.grad(total, argnums=(0, 1))(real_map, syn_map)
  np.testing.assert_array_equal(real_grad, np.zeros_like(real_grad))
  assert float(jnp.abs(syn_grad).max()) > 0


def _finite_difference_check(fn, x, eps=1e-6, num_directions=4):
  """Compares directional derivatives of fn at x with central differences (float64)."""
  grad = jax.grad(fn)(x)
  rng = np.random.default_rng(5)
  for _ in range(num_directions):
    direction = jnp.asarray(rng.normal(size=x.shape))
    numeric = (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)
    analytic = jnp.vdot(grad, direction)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
  'name',
  ['mean_matching', 'covariance_matching', 'covariance_row', 'cc_squared', 'cc_exp', 'objective'],
)
def test_gradients_match_finite_differences_in_float64(name):
  with float64():
    rng = np.random.default_rng(6)
    real_map = jnp.asarray(rng.normal(size=(6, 2, 3, 4)))
    syn_map = jnp.asarray(rng.normal(size=(3, 2, 3, 4)))
    assert syn_map.dtype == jnp.float64
    fns = {
      'mean_matching': lambda s: losses.mean_matching(real_map.reshape(6, -1), s.reshape(3, -1)),
      'covariance_matching': lambda s: losses.covariance_matching(real_map, s),
      'covariance_row': lambda s: losses.covariance_matching(real_map, s, 'channel_row'),
      'cc_squared': lambda s: losses.class_centralization(s.reshape(3, -1)),
      'cc_exp': lambda s: losses.class_centralization(s.reshape(3, -1), 'exp', 0.02, 1.0),
      'objective': lambda s: (
        losses.class_objective(
          real_map.reshape(6, -1),
          real_map,
          s.reshape(3, -1),
          s,
          s.reshape(3, -1) ** 2,
          losses.ObjectiveWeights(cc=0.3, cm=0.7),
        ).total
      ),
    }
    _finite_difference_check(fns[name], syn_map)

"""Losses against hand-computed values, their definitions, and float64 finite differences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from dd_jax import losses


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
    real_map.reshape(6, -1), real_map, syn_map.reshape(3, -1), syn_map, weights, cc_features
  )
  np.testing.assert_allclose(
    terms.match, losses.mean_matching(real_map.reshape(6, -1), syn_map.reshape(3, -1)), rtol=1e-6
  )
  np.testing.assert_allclose(terms.cm, losses.covariance_matching(real_map, syn_map), rtol=1e-6)
  np.testing.assert_allclose(terms.cc, losses.class_centralization(cc_features), rtol=1e-6)
  np.testing.assert_allclose(terms.total, terms.match + 0.5 * terms.cc + 0.25 * terms.cm, rtol=1e-6)
  zero = losses.class_objective(
    real_map.reshape(6, -1),
    real_map,
    syn_map.reshape(3, -1),
    syn_map,
    losses.ObjectiveWeights(cc=0.0, cm=0.0),
    cc_features,
  )
  np.testing.assert_allclose(zero.total, terms.match, rtol=1e-6)
  # The matching term is an argument (a `MatchFn`); the constraints act on top of it.
  custom = losses.class_objective(
    real_map.reshape(6, -1),
    real_map,
    syn_map.reshape(3, -1),
    syn_map,
    weights,
    cc_features,
    match=_mean_distance,
  )
  np.testing.assert_allclose(
    custom.match, _mean_distance(real_map.reshape(6, -1), syn_map.reshape(3, -1)), rtol=1e-6
  )
  assert not np.allclose(custom.match, terms.match, rtol=1e-2)
  np.testing.assert_allclose((custom.cc, custom.cm), (terms.cc, terms.cm), rtol=1e-6)
  np.testing.assert_allclose(
    custom.total, custom.match + 0.5 * custom.cc + 0.25 * custom.cm, rtol=1e-6
  )


def _mean_distance(real_features, syn_features):
  """A matching term other than DM's: the L1 distance of the feature means."""
  return jnp.sum(jnp.abs(jnp.mean(real_features, 0) - jnp.mean(syn_features, 0)))


def test_classwise_objective_sums_per_class_objectives():
  rng = np.random.default_rng(3)
  real_map = jnp.asarray(rng.normal(size=(4, 5, 2, 2, 3)), jnp.float32)
  syn_map = jnp.asarray(rng.normal(size=(4, 2, 2, 2, 3)), jnp.float32)
  cc_features = jnp.asarray(rng.normal(size=(4, 2, 6)), jnp.float32)
  real_features = real_map.reshape(4, 5, -1)
  syn_features = syn_map.reshape(4, 2, -1)
  weights = losses.ObjectiveWeights.reference_iid()
  batched = jax.jit(lambda *a: losses.classwise_objective(*a[:4], weights, a[4]))(
    real_features, real_map, syn_features, syn_map, cc_features
  )
  looped = [
    losses.class_objective(
      real_features[c], real_map[c], syn_features[c], syn_map[c], weights, cc_features[c]
    )
    for c in range(4)
  ]
  for name in ('total', 'match', 'cc', 'cm'):
    np.testing.assert_allclose(
      getattr(batched, name), sum(getattr(t, name) for t in looped), rtol=1e-5
    )
  # The matching term reaches every class.
  custom = losses.classwise_objective(
    real_features, real_map, syn_features, syn_map, weights, cc_features, match=_mean_distance
  )
  expected = sum(_mean_distance(real_features[c], syn_features[c]) for c in range(4))
  np.testing.assert_allclose(custom.match, expected, rtol=1e-5)


def test_real_side_gets_no_gradient():
  rng = np.random.default_rng(4)
  real_map = jnp.asarray(rng.normal(size=(5, 2, 2, 3)), jnp.float32)
  syn_map = jnp.asarray(rng.normal(size=(3, 2, 2, 3)), jnp.float32)

  def total(real_map, syn_map):
    return losses.class_objective(
      real_map.reshape(5, -1),
      real_map,
      syn_map.reshape(3, -1),
      syn_map,
      losses.ObjectiveWeights(cc=0.5, cm=0.5, cc_form='relative'),
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
          losses.ObjectiveWeights(cc=0.3, cm=0.7),
          s.reshape(3, -1) ** 2,
        ).total
      ),
    }
    _finite_difference_check(fns[name], syn_map)


# Three synthetic features of one class (mean (1, 1), squared distances 2, 2, 4) and a real batch
# whose within-class spread is (2 + 2) / 2 = 2 (mean (1, 1), both points at squared distance 2).
_SYN = [[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]]
_REAL = [[0.0, 0.0], [2.0, 2.0]]


def test_within_class_spread_hand_computed():
  np.testing.assert_allclose(losses.within_class_spread(jnp.array(_REAL)), 2.0, atol=1e-6)
  grad = jax.grad(lambda r: losses.within_class_spread(r))(jnp.array(_REAL))
  np.testing.assert_array_equal(grad, np.zeros((2, 2)))  # real data: no gradient


def test_scale_free_forms_hand_computed():
  syn, real = jnp.array(_SYN), jnp.array(_REAL)
  relative = losses.class_centralization(syn, 'relative', real_features=real)
  np.testing.assert_allclose(relative, (2 + 2 + 4) / 2, atol=1e-6)
  # d^2 / s = 1, 1, 2: tau 1.5 penalises only the third sample, by 0.5.
  threshold = losses.class_centralization(syn, 'threshold', real_features=real, tau=1.5)
  np.testing.assert_allclose(threshold, 0.5, atol=1e-6)
  np.testing.assert_allclose(
    losses.class_centralization(syn, 'threshold', real_features=real, tau=0.5), 0.5 + 0.5 + 1.5
  )
  np.testing.assert_allclose(
    losses.class_centralization(syn, 'threshold', real_features=real, tau=3.0), 0.0
  )
  with pytest.raises(ValueError, match='real_features'):
    losses.class_centralization(syn, 'relative')


def test_calibrated_form_contributes_rho_times_dm_with_a_stop_gradient_weight():
  syn, real = jnp.array(_SYN), jnp.array(_REAL)
  real_map, syn_map = real.reshape(2, 1, 1, 2), syn.reshape(3, 1, 1, 2)
  weights = losses.ObjectiveWeights(cc=0.25, cc_form='calibrated')
  # Both batches have mean (1, 1), so DM would be 0: shift the real batch by (1, 0), DM = 1.
  shifted = real + jnp.array([1.0, 0.0])
  terms = losses.class_objective(shifted, real_map, syn, syn_map, weights)
  np.testing.assert_allclose(terms.match, 1.0, atol=1e-6)
  np.testing.assert_allclose(terms.cc, 8.0, atol=1e-6)  # the 'squared' value is reported
  np.testing.assert_allclose(terms.total, 1.0 + 0.25 * 1.0, atol=1e-6)
  # Gradient: d DM + rho * (DM / CC) d CC, the ratio held fixed.
  grad = jax.grad(lambda s: losses.class_objective(shifted, real_map, s, syn_map, weights).total)(
    syn
  )
  expected = jax.grad(
    lambda s: losses.mean_matching(shifted, s) + 0.25 * (1.0 / 8.0) * losses.class_centralization(s)
  )(syn)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  # One synthetic sample per class: CC = 0, and the weight stays finite.
  single = losses.class_objective(shifted, real_map, syn[:1], syn_map[:1], weights)
  assert np.isfinite(float(single.total))


@pytest.mark.parametrize('form', ['relative', 'threshold', 'calibrated', 'squared'])
def test_scale_free_forms_ignore_the_extractor_scale(form):
  """Features x10: relative / threshold values and the calibrated contribution are unchanged; the
  reference 'squared' value grows 100-fold (this test fails for a form that is not scale-free)."""
  rng = np.random.default_rng(7)
  real_map = jnp.asarray(rng.normal(size=(8, 2, 2, 3)), jnp.float32)
  syn_map = jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32)
  real_features, syn_features = real_map.reshape(8, -1), syn_map.reshape(4, -1)
  cc_syn = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  cc_real = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  weights = losses.ObjectiveWeights(cc=0.3, cc_form=form, cc_tau=0.5)

  def contribution(scale):
    terms = losses.class_objective(
      real_features, real_map, syn_features, syn_map, weights, scale * cc_syn, scale * cc_real
    )
    return float(terms.cc), float(terms.total - terms.match)

  (value, weighted), (value10, weighted10) = contribution(1.0), contribution(10.0)
  assert weighted > 0
  if form == 'squared':
    np.testing.assert_allclose(weighted10, 100 * weighted, rtol=1e-4)
  elif form == 'calibrated':
    np.testing.assert_allclose(weighted10, weighted, rtol=1e-5)
    np.testing.assert_allclose(value10, 100 * value, rtol=1e-4)  # the raw value does scale
  else:
    np.testing.assert_allclose(value10, value, rtol=1e-5)
    np.testing.assert_allclose(weighted10, weighted, rtol=1e-5)


@pytest.mark.parametrize('form', ['relative', 'threshold'])
def test_scale_free_form_gradients_match_finite_differences_in_float64(form):
  with float64():
    rng = np.random.default_rng(8)
    real = jnp.asarray(rng.normal(size=(6, 5)))
    syn = jnp.asarray(rng.normal(size=(4, 5)))
    fn = lambda s: losses.class_centralization(s, form, real_features=real, tau=0.8)
    distances = np.sum(np.square(syn - syn.mean(0)), -1) / losses.within_class_spread(real)
    assert np.min(np.abs(distances - 0.8)) > 0.05  # away from the threshold's kink
    assert float(fn(syn)) > 0
    _finite_difference_check(fn, syn)
    # The real batch is data: its gradient is zero.
    real_grad = jax.grad(
      lambda r: losses.class_centralization(syn, form, real_features=r, tau=0.8)
    )(real)
    np.testing.assert_array_equal(real_grad, np.zeros_like(real_grad))


def test_calibrated_gradient_matches_finite_differences_of_the_fixed_ratio_objective_in_float64():
  with float64():
    rng = np.random.default_rng(9)
    real_map = jnp.asarray(rng.normal(size=(6, 2, 3, 4)))
    syn_map = jnp.asarray(rng.normal(size=(3, 2, 3, 4)))
    real, syn = real_map.reshape(6, -1), syn_map.reshape(3, -1)
    weights = losses.ObjectiveWeights(cc=0.4, cm=0.1, cc_form='calibrated')
    terms = losses.class_objective(real, real_map, syn, syn_map, weights)
    ratio = terms.match / terms.cc  # the stop-gradient weight at this point

    def fixed(s):
      return (
        losses.mean_matching(real, s.reshape(3, -1))
        + 0.4 * ratio * losses.class_centralization(s.reshape(3, -1))
        + 0.1 * losses.covariance_matching(real_map, s)
      )

    grad = jax.grad(
      lambda s: losses.class_objective(real, real_map, s.reshape(3, -1), s, weights).total
    )(syn_map)
    np.testing.assert_allclose(grad, jax.grad(fixed)(syn_map), rtol=1e-10)
    _finite_difference_check(fixed, syn_map)


def test_objective_weights_defaults_are_plain_dm():
  assert losses.ObjectiveWeights().cc == 0 and losses.ObjectiveWeights().cm == 0
  reference = losses.ObjectiveWeights.reference_iid()
  assert (reference.cc, reference.cm, reference.cc_form) == (0.05, 0.01, 'squared')
  assert losses.ObjectiveWeights(cc=1.0, cc_form='relative').needs_real_cc_features
  assert not losses.ObjectiveWeights(cc=0.0, cc_form='relative').needs_real_cc_features
  assert not losses.ObjectiveWeights(cc=1.0, cc_form='calibrated').needs_real_cc_features


def test_by_class_splits_a_class_blocked_batch():
  x = jnp.arange(12.0).reshape(6, 2)  # classes 0, 1, 2 with two rows each
  np.testing.assert_array_equal(losses.by_class(x, 3)[1], [[4.0, 5.0], [6.0, 7.0]])
  with pytest.raises(ValueError, match='leading axis of 6 does not split into 4'):
    losses.by_class(x, 4)


def test_dance_match_term_is_dm_mean_matching_family_vector():
  """DANCE's inner-class term is DM's ||mu_r - mu_s||^2 = 0.5 here."""
  with float64():
    real, syn = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[1.0, 0.0]])
    np.testing.assert_allclose(losses.mean_matching(real, syn), 0.5, rtol=1e-6)


# M3D's kernel MMD (Zhang et al., AAAI 2024).


@pytest.mark.parametrize(
  'syn, real, bandwidth, mmd',
  [
    # Hand-computed, 1-D: joint set (0, 1, 0, 2), distinct-pair distances sum 22 over 12 pairs.
    ([[0.0], [1.0]], [[0.0], [2.0]], 1.8333333, 1.1689244),
    ([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], 1.2, 1.7951326),
  ],
)
def test_mmd_matching_family_vectors(syn, real, bandwidth, mmd):
  with float64():
    real, syn = jnp.array(real), jnp.array(syn)
    assert syn.dtype == jnp.float64
    np.testing.assert_allclose(losses.mmd_bandwidth(real, syn), bandwidth, rtol=1e-6)
    np.testing.assert_allclose(losses.mmd_matching(real, syn), mmd, rtol=1e-6)
    np.testing.assert_allclose(losses.mmd_match_fn('gaussian')(real, syn), mmd, rtol=1e-6)


def test_mmd_pairwise_squared_distances_match_direct_differences_with_an_exact_zero_diagonal():
  with float64():
    z = np.random.default_rng(10).normal(size=(12, 7)) * 3.0 + 1.0
    distances = np.asarray(losses.pairwise_squared_distances(jnp.asarray(z)))
    direct = np.sum(np.square(z[:, None] - z[None, :]), axis=-1)
    off_diagonal = ~np.eye(12, dtype=bool)
    np.testing.assert_allclose(distances[off_diagonal], direct[off_diagonal], rtol=1e-10)
    np.testing.assert_array_equal(np.diag(distances), np.zeros(12))
  # float32 features far from the origin (ReLU features are positive), rows 8-15 duplicating
  # rows 0-7: ||a||^2 + ||b||^2 - 2 a.b leaves residues of order eps * ||z||^2 (here up to ~4,
  # of either sign) where the distance is 0. The diagonal is exactly 0 and nothing is negative.
  z32 = np.random.default_rng(11).normal(size=(8, 2048)) + 50.0
  z32 = jnp.asarray(np.concatenate([z32, z32]), jnp.float32)
  distances32 = np.asarray(losses.pairwise_squared_distances(z32))
  np.testing.assert_array_equal(np.diag(distances32), np.zeros(16, np.float32))
  assert distances32.min() >= 0.0
  direct32 = np.sum(np.square(np.float64(z32)[:, None] - np.float64(z32)[None, :]), axis=-1)
  distinct = direct32 > 0
  np.testing.assert_allclose(distances32[distinct], direct32[distinct], rtol=1e-3)


def test_mmd_gram_matmul_runs_at_full_precision_whatever_the_default():
  """The distances' matmul asks for HIGHEST even under the accelerator lowering's TF32 default."""
  z = jnp.ones((4, 3))
  with jax.default_matmul_precision('tensorfloat32'):
    jaxpr = jax.make_jaxpr(lambda a, b: losses.mmd_matching(a, b))(z, z)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  assert dots
  for eqn in dots:
    assert eqn.params['precision'] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def _hand_gaussian_mmd_grad(real, syn, bandwidth):
  """d MMD^2 / d syn with the bandwidth b a constant (NumPy). For k(d) = sum_m exp(-d / (m b)):
  grad_a = 4 / Ns^2 sum_j k'(|s_a - s_j|^2) (s_a - s_j)
           - 4 / (Ns Nr) sum_j k'(|s_a - r_j|^2) (s_a - r_j).
  """

  def k_prime(d):
    return -sum(np.exp(-d / (m * bandwidth)) / (m * bandwidth) for m in (0.25, 0.5, 1, 2, 4))

  ns, nr = len(syn), len(real)
  diff_ss = syn[:, None] - syn[None, :]
  diff_sr = syn[:, None] - real[None, :]
  w_ss = k_prime(np.sum(diff_ss**2, -1))[..., None]
  w_sr = k_prime(np.sum(diff_sr**2, -1))[..., None]
  return 4 / ns**2 * np.sum(w_ss * diff_ss, 1) - 4 / (ns * nr) * np.sum(w_sr * diff_sr, 1)


def test_mmd_bandwidth_carries_no_gradient():
  with float64():
    rng = np.random.default_rng(12)
    real, syn = rng.normal(size=(6, 5)), rng.normal(size=(3, 5)) + 0.3
    joint = np.concatenate([syn, real])
    bandwidth = np.sum(np.square(joint[:, None] - joint[None, :])) / (9 * 9 - 9)
    np.testing.assert_allclose(
      losses.mmd_bandwidth(jnp.asarray(real), jnp.asarray(syn)), bandwidth, rtol=1e-12
    )
    grad = jax.grad(lambda s: losses.mmd_matching(jnp.asarray(real), s))(jnp.asarray(syn))
    hand = _hand_gaussian_mmd_grad(real, syn, bandwidth)
    np.testing.assert_allclose(grad, hand, rtol=1e-10, atol=1e-14)
    fixed = jax.grad(lambda s: losses.mmd_matching(jnp.asarray(real), s, bandwidth=bandwidth))
    np.testing.assert_allclose(grad, fixed(jnp.asarray(syn)), rtol=1e-10, atol=1e-14)

    def undetached(s):  # b a function of the synthetic features: another gradient
      z = jnp.concatenate([s, jnp.asarray(real)])
      d2 = jnp.sum(jnp.square(z[:, None] - z[None, :]), -1)
      b = jnp.sum(d2) / (9 * 9 - 9)
      k = sum(jnp.exp(-d2 / (m * b)) for m in (0.25, 0.5, 1, 2, 4))
      return jnp.mean(k[:3, :3]) - 2 * jnp.mean(k[:3, 3:]) + jnp.mean(k[3:, 3:])

    np.testing.assert_allclose(undetached(jnp.asarray(syn)), losses.mmd_matching(real, syn))
    other = jax.grad(undetached)(jnp.asarray(syn))
    assert np.linalg.norm(other - hand) > 0.05 * np.linalg.norm(hand)


@pytest.mark.parametrize('kernel', losses.MMD_KERNELS)
def test_mmd_gradients_match_finite_differences_in_float64(kernel):
  with float64():
    rng = np.random.default_rng(13)
    real, syn = jnp.asarray(rng.normal(size=(7, 4))), jnp.asarray(rng.normal(size=(3, 4)))
    # Finite differences see the bandwidth move with the features; the gradient does not
    # (detached): difference the loss at this point's bandwidth, held fixed.
    bandwidth = losses.mmd_bandwidth(real, syn)
    fn = lambda s: losses.mmd_matching(real, s, kernel, bandwidth)
    grad = jax.grad(lambda s: losses.mmd_matching(real, s, kernel))(syn)
    np.testing.assert_allclose(grad, jax.grad(fn)(syn), rtol=1e-12, atol=1e-15)
    assert float(jnp.abs(grad).max()) > 1e-3
    _finite_difference_check(fn, syn)


@pytest.mark.parametrize('kernel', losses.MMD_KERNELS)
def test_mmd_real_side_gets_no_gradient(kernel):
  rng = np.random.default_rng(14)
  real = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  syn = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  real_grad, syn_grad = jax.grad(
    lambda r, s: losses.mmd_matching(r, s, kernel=kernel), argnums=(0, 1)
  )(real, syn)
  np.testing.assert_array_equal(real_grad, np.zeros_like(real_grad))
  assert float(jnp.abs(syn_grad).max()) > 0


def test_mmd_linear_kernel_is_dm_mean_matching():
  with float64():
    rng = np.random.default_rng(15)
    real = jnp.asarray(rng.normal(size=(9, 6)) + 1.0)
    syn = jnp.asarray(rng.normal(size=(4, 6)))
    linear = lambda s: losses.mmd_matching(real, s, 'linear')
    dm = lambda s: losses.mean_matching(real, s)
    assert float(dm(syn)) > 1.0
    np.testing.assert_allclose(linear(syn), dm(syn), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(linear)(syn), jax.grad(dm)(syn), rtol=1e-10, atol=1e-14)


def test_mmd_polynomial_kernel_hand_computed():
  with float64():
    real, syn = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]])
    # K = (x.y + 1)^2: K_ss = 9; K_sr = 4, 4; K_rr = [[4, 1], [1, 4]] -> 9 - 2 * 4 + 10 / 4.
    value = losses.mmd_matching(jnp.asarray(real), jnp.asarray(syn), 'polynomial')
    np.testing.assert_allclose(value, 3.5, rtol=1e-12)


def test_mmd_unknown_kernel_and_identical_features():
  z = jnp.ones((3, 2))
  for make in (lambda: losses.mmd_matching(z, z, 'laplace'), lambda: losses.mmd_match_fn('rbf')):
    with pytest.raises(ValueError, match="'gaussian', 'linear', 'polynomial'"):
      make()
  # Identical rows: b = 0, every kernel entry 5, MMD^2 0 with a zero gradient (not NaN).
  np.testing.assert_array_equal(losses.mmd_matching(z, z[:2]), 0.0)
  np.testing.assert_array_equal(jax.grad(lambda s: losses.mmd_matching(z, s))(z[:2]), 0.0)


def test_mmd_match_fn_under_jit_and_in_the_classwise_objective():
  rng = np.random.default_rng(16)
  real = jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32)
  syn = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)
  match = losses.mmd_match_fn('gaussian')
  eager = [float(losses.mmd_matching(real[c], syn[c])) for c in range(3)]
  np.testing.assert_allclose(jax.jit(match)(real[0], syn[0]), eager[0], rtol=1e-6)
  np.testing.assert_allclose(
    jax.jit(losses.mmd_matching, static_argnames='kernel')(real[0], syn[0], kernel='gaussian'),
    eager[0],
    rtol=1e-6,
  )
  maps = lambda x: x.reshape(*x.shape[:2], 1, 1, 5)
  terms = jax.jit(lambda r, s: losses.classwise_objective(r, maps(r), s, maps(s), match=match))(
    real, syn
  )
  np.testing.assert_allclose(terms.match, sum(eager), rtol=1e-5)
  np.testing.assert_allclose(terms.total, sum(eager), rtol=1e-5)


# NCFM's characteristic-function loss (Wang et al., CVPR 2025).


@pytest.mark.parametrize(
  'syn, frequencies, amplitude, phase, cf',
  [
    ([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [0.0149860] * 2, [0.2148628] * 2, 0.3390050),
    (
      [[0.6, 0.8], [0.8, 0.6]],
      [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
      [0.0137878, 0.0137878, 0.0],
      [0.0348117, 0.0348117, 0.1578780],
      0.1975761,
    ),
    ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [0.0] * 2, [1e-12] * 2, 7.0710678e-7),
  ],
  ids=['one_syn', 'three_frequencies', 'identical_sets_clamp'],
)
def test_characteristic_function_loss_family_vectors(syn, frequencies, amplitude, phase, cf):
  with float64():
    real, syn, frequencies = jnp.eye(2), jnp.array(syn), jnp.array(frequencies)
    assert syn.dtype == jnp.float64
    a, p = losses.characteristic_function_terms(real, syn, frequencies)
    # The vectors are printed to 1e-7 (the terms) and 7 significant digits (the loss).
    np.testing.assert_allclose(a, amplitude, atol=5e-8)
    np.testing.assert_allclose(p, phase, rtol=1e-6, atol=5e-8)
    loss = losses.characteristic_function_matching(real, syn, frequencies)
    np.testing.assert_allclose(loss, 300.0 * cf, rtol=1e-6)
    scale_one = losses.characteristic_function_matching(real, syn, frequencies, scale=1.0)
    np.testing.assert_allclose(scale_one, cf, rtol=1e-6)


def test_amplitude_plus_phase_is_the_squared_distance_of_the_characteristic_functions():
  with float64():
    rng = np.random.default_rng(7)
    real, syn = jnp.asarray(rng.normal(size=(9, 5))), jnp.asarray(rng.normal(size=(4, 5)))
    frequencies = jnp.asarray(rng.normal(size=(16, 5)))
    a, p = losses.characteristic_function_terms(real, syn, frequencies)
    unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    phi = lambda x: jnp.mean(jnp.exp(1j * (unit(x) @ frequencies.T)), axis=0)
    np.testing.assert_allclose(a + p, jnp.abs(phi(real) - phi(syn)) ** 2, rtol=1e-9)
    # Rows are normalised: scaling a feature changes nothing.
    scaled = syn * jnp.array([[2.0], [0.5], [3.0], [1.0]])
    np.testing.assert_allclose(
      losses.characteristic_function_matching(real, scaled, frequencies),
      losses.characteristic_function_matching(real, syn, frequencies),
      rtol=1e-12,
    )


# DSDM's loss (Li et al., ACM MM 2024).


def test_dsdm_loss_family_vector_and_the_prototype_term():
  with float64():
    real = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    syn = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    prototype = jnp.array([0.5, 0.5])
    total = losses.dsdm_matching(real, syn, prototype)
    np.testing.assert_allclose(total, 5.3583333, rtol=1e-6)
    without = losses.dsdm_matching(real, syn)  # before smooth_iter: no prototype term
    np.testing.assert_allclose(without, 0.4722222 + 4.8611111, rtol=1e-6)
    np.testing.assert_allclose(total - without, 0.025, rtol=1e-5)
    means_only = losses.dsdm_matching(real, syn, covariance_weight=0.0)
    np.testing.assert_allclose(means_only, 0.4722222, rtol=1e-6)
  with pytest.raises(ValueError, match='at least 2 synthetic images per class'):
    losses.dsdm_matching(real, syn[:1])


def test_dsdm_covariance_is_numpys_unbiased_covariance():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(7, 3))
  np.testing.assert_allclose(losses.covariance(jnp.asarray(x), ddof=1), np.cov(x.T), rtol=1e-5)
  np.testing.assert_allclose(losses.covariance(jnp.asarray(x)), np.cov(x.T, bias=True), rtol=1e-5)


@pytest.mark.parametrize('ddof', [0, 1])
def test_covariance_distance_with_few_rows_forms_no_feature_square_and_equals_the_direct(ddof):
  with float64():
    rng = np.random.default_rng(10)
    x, y = jnp.asarray(rng.normal(size=(6, 40))), jnp.asarray(rng.normal(size=(9, 40)))
    direct = lambda x: jnp.sum(jnp.square(losses.covariance(x, ddof) - losses.covariance(y, ddof)))
    cheap = lambda x: losses.covariance_distance(x, y, ddof)
    shapes = {v.aval.shape for e in jax.make_jaxpr(cheap)(x).jaxpr.eqns for v in e.outvars}
    assert (40, 40) not in shapes  # the [D, D] covariances are never formed
    np.testing.assert_allclose(cheap(x), direct(x), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(cheap)(x), jax.grad(direct)(x), rtol=1e-9, atol=1e-12)
    # More rows than features: the direct form, the same number.
    wide = jnp.asarray(rng.normal(size=(50, 4)))
    np.testing.assert_allclose(
      losses.covariance_distance(wide, wide[::-1] * 2, ddof),
      jnp.sum(jnp.square(losses.covariance(wide, ddof) - losses.covariance(2 * wide, ddof))),
      rtol=1e-10,
    )


@pytest.mark.parametrize('name', ['characteristic_function', 'dsdm'])
def test_family_losses_gradients_match_finite_differences_in_float64(name):
  with float64():
    rng = np.random.default_rng(9)
    real = jnp.asarray(rng.normal(size=(8, 5)))
    syn = jnp.asarray(rng.normal(size=(4, 5)))
    frequencies = jnp.asarray(rng.normal(size=(6, 5)))
    prototype = jnp.asarray(rng.normal(size=(5,)))
    fns = {
      'characteristic_function': lambda s: losses.characteristic_function_matching(
        real, s, frequencies
      ),
      'dsdm': lambda s: losses.dsdm_matching(real, s, prototype),
    }
    _finite_difference_check(fns[name], syn)
    assert jnp.all(jnp.isfinite(jax.grad(fns[name])(syn)))

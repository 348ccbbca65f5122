"""Distribution-matching losses: the matching terms (DM's mean matching, M3D's kernel MMD) and
the IID constraints (Deng et al., CVPR 2024).

Pure functions of arrays, safe under `jax.jit`, `jax.vmap` and `jax.grad`. Every loss is a *sum*
(over feature dimensions, matrix entries and samples), never a mean, unless its reference's
formula is a mean (M3D's MMD: means over kernel entries), so the reference learning rates apply
unchanged. Real-side inputs are wrapped in `stop_gradient`: the real images are data, only the
synthetic images are optimised.

Matching terms (`MatchFn`): DM's `mean_matching`; M3D's `mmd_matching` (`mmd_match_fn(kernel)`
binds its kernel). NCFM's `characteristic_function_matching` and DSDM's `dsdm_matching` take
more than the two feature sets (frequencies; a prototype).

Per-class functions take one class's arrays; `classwise_objective` vmaps the combined objective
over a leading class axis and sums the classes. The objective's distribution term is an argument
(a `MatchFn`: DM's `mean_matching` by default); the constraints act on top of any of them.

Shapes: N real or synthetic samples of one class, D flattened feature size, NHWC feature maps
[N, H, W, C] (C channels at P = H * W spatial positions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# A matching term of one class: (real_features [N_real, D], syn_features [N_syn, D]) -> scalar,
# with no gradient into the real features.
MatchFn = Callable[[jax.Array, jax.Array], jax.Array]

GROUPINGS = ('channel', 'channel_row')
CC_FORMS = ('squared', 'exp', 'relative', 'threshold', 'calibrated')
# The forms measured in units of the real batch's within-class spread under the CC extractor.
REAL_SPREAD_FORMS = ('relative', 'threshold')


def mean_matching(real_features: jax.Array, syn_features: jax.Array) -> jax.Array:
  """DM loss of one class: || mean_n f(real_n) - mean_m f(syn_m) ||^2, summed over features.

  Args:
    real_features: [N_real, D]; no gradient flows into it.
    syn_features: [N_syn, D].

  Returns:
    A scalar.
  """
  real_mean = jnp.mean(jax.lax.stop_gradient(real_features), axis=0)
  return jnp.sum(jnp.square(real_mean - jnp.mean(syn_features, axis=0)))


# M3D's kernels (Zhang et al., AAAI 2024, `m3dloss.py`): the multi-bandwidth Gaussian is the
# method's; the linear and polynomial kernels are the same file's ablation options.
MMD_KERNELS = ('gaussian', 'linear', 'polynomial')
# The Gaussian kernel's bandwidth multipliers 2^(k - 2), k = 0..4, of the base bandwidth.
GAUSSIAN_BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _gram(z: jax.Array) -> jax.Array:
  # HIGHEST: a TF32 / bfloat16 pass (the accelerator lowering's default) would leave errors of
  # order 1e-3 * |z_i| |z_j| in the Gram matrix, as large as the distances of nearby features.
  return jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)


def pairwise_squared_distances(z: jax.Array) -> jax.Array:
  """D2_ij = || z_i - z_j ||^2 of one set of rows (PyTorch's `cdist(z, z) ** 2`).

  Computed as ||z_i||^2 + ||z_j||^2 - 2 z_i . z_j with one matmul (at full float32 precision),
  clamped at 0 (cancellation leaves residues of order eps * ||z||^2, of either sign, where rows
  nearly coincide). The diagonal is set to exactly 0: the formula leaves such a residue there
  (up to ~4 in float32 for 2048-d features near 50), which would enter the Gaussian kernel's
  bandwidth and its diagonal terms; the mask also gives the diagonal a zero gradient, its true
  derivative.

  Args:
    z: [n, D].

  Returns:
    [n, n], non-negative, with a zero diagonal.
  """
  norms = jnp.sum(jnp.square(z), axis=-1)
  distances = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * _gram(z), 0.0)
  return jnp.where(jnp.eye(z.shape[0], dtype=bool), 0.0, distances)


def _bandwidth(distances: jax.Array) -> jax.Array:
  """M3D's base bandwidth of [n, n] squared distances: their sum / (n^2 - n), detached."""
  n = distances.shape[0]
  return jax.lax.stop_gradient(jnp.sum(distances) / (n * n - n))


def mmd_bandwidth(real_features: jax.Array, syn_features: jax.Array) -> jax.Array:
  """The base bandwidth b of `mmd_matching`'s Gaussian kernel (no gradient).

  b = sum_ij D2_ij / (n^2 - n) over the joint set Z = [syn; real] of n = N_syn + N_real rows:
  the mean squared distance of distinct pairs.

  Args:
    real_features: [N_real, D].
    syn_features: [N_syn, D]; N_real + N_syn >= 2.

  Returns:
    A scalar.
  """
  return _bandwidth(pairwise_squared_distances(jnp.concatenate([syn_features, real_features])))


def mmd_matching(
  real_features: jax.Array,
  syn_features: jax.Array,
  kernel: str = 'gaussian',
  bandwidth: float | jax.Array | None = None,
) -> jax.Array:
  """M3D loss of one class: the biased (V-statistic) squared MMD of the two feature sets.

  MMD^2 = mean(K_ss) - 2 mean(K_sr) + mean(K_rr), diagonals included, where K is the kernel
  matrix of the joint set Z = [syn; real] and s, r its synthetic and real blocks. Kernels:

    'gaussian' (M3D): K = sum over m in {1/4, 1/2, 1, 2, 4} of exp(-D2 / (m b)), D2 the squared
      distances (`pairwise_squared_distances`) and b the base bandwidth (`mmd_bandwidth`), which
      carries no gradient. K_rr then only shifts the value.
    'linear' (ablation): K = Z Z^T. The V-statistic is then || mean_r - mean_s ||^2, exactly DM's
      `mean_matching`.
    'polynomial' (ablation): K = (Z Z^T + 1)^2.

  Means over kernel entries, as the reference: the Gaussian value lies in [0, 10] whatever the
  feature dimension, and its gradients are small (hence M3D's large learning rates).

  Args:
    real_features: [N_real, D]; no gradient flows into it.
    syn_features: [N_syn, D].
    kernel: one of MMD_KERNELS.
    bandwidth: the Gaussian's base bandwidth b; None (M3D): `mmd_bandwidth` of these features.
      A value fixes it (tests, ablations). Ignored by the other kernels.

  Returns:
    A scalar.

  Raises:
    ValueError: an unknown kernel.
  """
  if kernel not in MMD_KERNELS:
    raise ValueError(f'Unknown MMD kernel {kernel!r}; choose one of {MMD_KERNELS}.')
  num_syn = syn_features.shape[0]
  z = jnp.concatenate([syn_features, jax.lax.stop_gradient(real_features)])
  if kernel == 'gaussian':
    distances = pairwise_squared_distances(z)
    if bandwidth is None:
      bandwidth = _bandwidth(distances)
    # Only identical rows give b = 0: then D2 = 0 too, and any b > 0 gives K = 5 everywhere and
    # MMD^2 = 0 (not 0 / 0 = NaN).
    base = jnp.where(bandwidth > 0, bandwidth, 1.0)
    k = sum(jnp.exp(-distances / (m * base)) for m in GAUSSIAN_BANDWIDTH_MULTIPLIERS)
  elif kernel == 'linear':
    k = _gram(z)
  else:
    k = jnp.square(_gram(z) + 1.0)
  return (
    jnp.mean(k[:num_syn, :num_syn])
    - 2.0 * jnp.mean(k[:num_syn, num_syn:])
    + jnp.mean(k[num_syn:, num_syn:])
  )


def mmd_match_fn(kernel: str = 'gaussian') -> MatchFn:
  """`mmd_matching` with its kernel bound: a `MatchFn` for `class_objective(match=...)`.

  Args:
    kernel: one of MMD_KERNELS.

  Returns:
    (real_features [N_real, D], syn_features [N_syn, D]) -> scalar.

  Raises:
    ValueError: an unknown kernel (here, not at the first step).
  """
  if kernel not in MMD_KERNELS:
    raise ValueError(f'Unknown MMD kernel {kernel!r}; choose one of {MMD_KERNELS}.')
  return functools.partial(mmd_matching, kernel=kernel)


# NCFM's clamp of the phase term (NCFM.py): keeps the square root's gradient finite when two
# characteristic functions coincide.
CF_PHASE_FLOOR = 1e-12
# NCFM's scale of the characteristic-function distance (`match_loss`).
CF_SCALE = 300.0


def _unit_rows(features: jax.Array) -> jax.Array:
  """Rows divided by max(||row||, 1e-12), PyTorch's `F.normalize(dim=1)`."""
  norms = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
  return features / jnp.maximum(norms, 1e-12)


def characteristic_function_terms(
  real_features: jax.Array, syn_features: jax.Array, frequencies: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """NCFM's amplitude and phase terms at each frequency (Wang et al., CVPR 2025, as coded).

  Both feature sets are L2-normalised per row; the empirical characteristic function of a set X
  at frequency t is Phi_X(t) = mean_i exp(i t . x_i) = Re + i Im.
  amplitude a = (|Phi_r| - |Phi_s|)^2; phase p = max(2 (|Phi_r| |Phi_s| - Re_r Re_s - Im_r Im_s),
  1e-12). Without the clamp a + p = |Phi_r - Phi_s|^2.

  Args:
    real_features: [N_real, D]; no gradient flows into it.
    syn_features: [N_syn, D].
    frequencies: [M, D] the frequencies t (one matrix product per set: [N, D] x [D, M]).

  Returns:
    ([M] amplitude terms, [M] phase terms).
  """

  def phi(features):
    projections = _unit_rows(features) @ frequencies.T
    return jnp.mean(jnp.cos(projections), axis=0), jnp.mean(jnp.sin(projections), axis=0)

  re_r, im_r = phi(jax.lax.stop_gradient(real_features))
  re_s, im_s = phi(syn_features)
  mod_r = jnp.sqrt(jnp.square(re_r) + jnp.square(im_r))
  mod_s = jnp.sqrt(jnp.square(re_s) + jnp.square(im_s))
  amplitude = jnp.square(mod_r - mod_s)
  phase = jnp.maximum(2.0 * (mod_r * mod_s - re_r * re_s - im_r * im_s), CF_PHASE_FLOOR)
  return amplitude, phase


def characteristic_function_matching(
  real_features: jax.Array,
  syn_features: jax.Array,
  frequencies: jax.Array,
  amplitude_weight: float = 0.5,
  phase_weight: float = 0.5,
  scale: float = CF_SCALE,
) -> jax.Array:
  """NCFM's matching loss of one class: scale * mean_m sqrt(alpha a_m + beta p_m).

  With alpha = beta = 0.5 (NCFM's configs) this is scale / sqrt(2) * mean_m |Phi_r - Phi_s|
  wherever the phase clamp does not bite. (The paper writes alpha and 1 - alpha; the code has
  two weights, as here.)

  Args:
    real_features, syn_features, frequencies: as `characteristic_function_terms`.
    amplitude_weight: alpha.
    phase_weight: beta.
    scale: NCFM's 300.

  Returns:
    A scalar.
  """
  amplitude, phase = characteristic_function_terms(real_features, syn_features, frequencies)
  return scale * jnp.mean(jnp.sqrt(amplitude_weight * amplitude + phase_weight * phase))


def dsdm_matching(
  real_features: jax.Array,
  syn_features: jax.Array,
  prototype: jax.Array | None = None,
  covariance_weight: float = 50.0,
  prototype_weight: float = 0.2,
) -> jax.Array:
  """DSDM's loss of one class (Li et al., ACM MM 2024, as coded): mean, covariance, prototype.

  || mu_r - mu_s ||^2 + covariance_weight * || Sigma_s - Sigma_r ||_F^2 / D
  + prototype_weight * || mu_s - h ||^2 / D, with unbiased (N - 1) covariances (`covariance`)
  and h the class's historical prototype (a constant; None: no prototype term, as before
  DSDM's `smooth_iter`).

  Args:
    real_features: [N_real, D]; no gradient flows into it.
    syn_features: [N_syn, D], N_syn >= 2.
    prototype: [D] h, or None.
    covariance_weight: DSDM's `cov_weight`.
    prototype_weight: DSDM's `h_p_weight`.

  Returns:
    A scalar.

  Raises:
    ValueError: fewer than 2 synthetic samples (no unbiased covariance; DSDM divides by 0).
  """
  num_syn, dim = syn_features.shape
  if num_syn < 2:
    raise ValueError(
      f"DSDM's covariance needs at least 2 synthetic images per class, got {num_syn}: use "
      'multi-formation (factor 2) or ipc >= 2.'
    )
  real_features = jax.lax.stop_gradient(real_features)
  syn_mean = jnp.mean(syn_features, axis=0)
  loss = jnp.sum(jnp.square(jnp.mean(real_features, axis=0) - syn_mean))
  distance = covariance_distance(syn_features, real_features, ddof=1)
  loss = loss + covariance_weight * distance / dim
  if prototype is not None:
    prototype = jax.lax.stop_gradient(prototype)
    loss = loss + prototype_weight * jnp.sum(jnp.square(syn_mean - prototype)) / dim
  return loss


def covariance(vectors: jax.Array, ddof: int = 0) -> jax.Array:
  """The covariance of N samples of P vectors each, summed over the P positions.

  sum_p (1 / (N - ddof)) sum_n (x_np - mean_n x_np)(x_np - mean_n x_np)^T: with P = 1 the plain
  covariance of the rows (DSDM: ddof 1, unbiased); IID's local covariance sums the biased
  (ddof 0) covariances of the local vectors at each position.

  Args:
    vectors: [N, P, D], or [N, D] for P = 1.
    ddof: 0 (divide by N) or 1 (by N - 1).

  Returns:
    [D, D].
  """
  if vectors.ndim == 2:
    vectors = vectors[:, None, :]
  centred = vectors - jnp.mean(vectors, axis=0, keepdims=True)
  return jnp.einsum('npi,npj->ij', centred, centred) / (vectors.shape[0] - ddof)


def covariance_distance(x: jax.Array, y: jax.Array, ddof: int = 0) -> jax.Array:
  """|| covariance(x, ddof) - covariance(y, ddof) ||_F^2 of row sets [N, D] and [M, D].

  With fewer rows than features (DSDM: 40 and 256 rows of 2048 features) it never forms a
  [D, D] matrix: with X, Y the centred rows, a = N - ddof and b = M - ddof,
  || X^T X / a - Y^T Y / b ||^2
    = || X X^T ||^2 / a^2 - 2 || X Y^T ||^2 / (a b) + || Y Y^T ||^2 / b^2,
  products of [N, N], [N, M] and [M, M] (N^2 + NM + M^2 against (N + M) D per feature). The
  gradient is as exact as the direct form's; the value, a difference of three sums, keeps
  float32's relative precision of those sums, not of the (small) distance itself.

  Args:
    x: [N, D].
    y: [M, D].
    ddof: 0 (divide by the rows) or 1 (by the rows - 1).

  Returns:
    A scalar.
  """
  (n, dim), m = x.shape, y.shape[0]
  if (n + m) * dim <= n * n + n * m + m * m:
    return jnp.sum(jnp.square(covariance(x, ddof) - covariance(y, ddof)))
  x = x - jnp.mean(x, axis=0)
  y = y - jnp.mean(y, axis=0)
  squared = lambda a, b: jnp.sum(jnp.square(a @ b.T))
  a, b = n - ddof, m - ddof
  return squared(x, x) / a**2 - 2.0 * squared(x, y) / (a * b) + squared(y, y) / b**2


def local_covariance(feature_map: jax.Array, grouping: str = 'channel') -> jax.Array:
  """The local feature covariance of one class's feature maps (Deng et al., CVPR 2024, Sec. 3).

  Each sample's map is a matrix whose columns are local feature vectors; every entry is centred
  over the batch, then Sigma = (1/N) sum_n G_n G_n^T. With the default grouping this equals the
  sum over spatial positions of the per-position biased covariance (no 1/P, no N-1).

  Args:
    feature_map: [N, H, W, C].
    grouping: 'channel' (default): C-dimensional vectors at the H * W positions, C x C result.
      'channel_row' (the reference code's commented-out variant for 64x64 data): (C * H)-dim
      vectors at the W column positions, a (C * H) x (C * H) result with rows ordered (c, h).

  Returns:
    [C, C] for 'channel', [C * H, C * H] for 'channel_row'.
  """
  n, h, w, c = feature_map.shape
  if grouping == 'channel':
    local_vectors = feature_map.reshape(n, h * w, c)
  elif grouping == 'channel_row':
    local_vectors = jnp.transpose(feature_map, (0, 2, 3, 1)).reshape(n, w, c * h)
  else:
    raise ValueError(f'Unknown covariance grouping {grouping!r}; choose one of {GROUPINGS}.')
  return covariance(local_vectors)


def covariance_matching(
  real_map: jax.Array, syn_map: jax.Array, grouping: str = 'channel'
) -> jax.Array:
  """CM loss of one class: || Sigma(real) - Sigma(syn) ||_F^2.

  With one synthetic sample (IPC 1, no expansion) Sigma(syn) is identically 0, so the loss is a
  constant with zero gradient: DM + CM equals DM there (Deng et al., CVPR 2024, Sec. 3).

  Args:
    real_map: [N_real, H, W, C]; no gradient flows into it.
    syn_map: [N_syn, H, W, C].
    grouping: see `local_covariance`.

  Returns:
    A scalar.
  """
  real_cov = local_covariance(jax.lax.stop_gradient(real_map), grouping)
  return jnp.sum(jnp.square(real_cov - local_covariance(syn_map, grouping)))


def within_class_spread(features: jax.Array) -> jax.Array:
  """Mean squared distance of one class's features to their mean: (1/N) sum_n || f_n - mu ||^2.

  The unit of the scale-free class-centralization forms: it scales as the features squared, so
  dividing by the real batch's spread removes the extractor's scale. No gradient flows into it.

  Args:
    features: [N, D], N >= 2 for a non-zero spread.

  Returns:
    A non-negative scalar.
  """
  features = jax.lax.stop_gradient(features)
  return jnp.mean(jnp.sum(jnp.square(features - jnp.mean(features, axis=0)), axis=-1))


def _spread_unit(real_features: jax.Array | None, form: str) -> jax.Array:
  if real_features is None:
    raise ValueError(
      f"Class-centralization form {form!r} measures distances in units of the real batch's "
      'within-class spread: pass real_features (the real batch under the same extractor).'
    )
  spread = within_class_spread(real_features)
  # A guard, not a regulariser: only a batch of identical real features has zero spread.
  return jnp.maximum(spread, jnp.finfo(spread.dtype).tiny)


def class_centralization(
  features: jax.Array,
  form: str = 'squared',
  alpha: float = 0.02,
  beta: float = 0.0,
  real_features: jax.Array | None = None,
  tau: float = 1.0,
) -> jax.Array:
  """CC loss of one class: pulls synthetic features towards their class mean (Deng et al.).

  With d_i^2 = || g_i - mu ||^2, mu the mean of the synthetic features (not stop-gradient: it
  moves with the samples, as in the reference), and s the real batch's `within_class_spread`
  under the same extractor:

    'squared' (reference code, default): sum_i d_i^2. Scales as the features squared.
    'exp' (paper, Eq. 5): sum_i max(0, exp(alpha * d_i^2) - beta).
    'relative': sum_i d_i^2 / s. Scale-free: a weight is in units of "real spread".
    'threshold': sum_i max(0, d_i^2 / s - tau). Scale-free, the paper's threshold beta put in
      units of the real spread: a sample is pulled in only while it lies farther from its class
      mean than tau real spreads, so CC never makes a class tighter than that.
    'calibrated': the 'squared' value; `class_objective` scales its weight (see there).

  Args:
    features: [N_syn, D] features of the augmented synthetic images of one class.
    form: one of CC_FORMS.
    alpha: temperature of the 'exp' form.
    beta: threshold of the 'exp' form.
    real_features: [N_real, D] the augmented real batch of the class under the same extractor
      (no gradient flows into it); required by 'relative' and 'threshold'.
    tau: threshold of the 'threshold' form, in units of the real spread.

  Returns:
    A scalar.
  """
  squared_distances = jnp.sum(jnp.square(features - jnp.mean(features, axis=0)), axis=-1)
  if form in ('squared', 'calibrated'):
    return jnp.sum(squared_distances)
  if form == 'exp':
    return jnp.sum(jnp.maximum(0.0, jnp.exp(alpha * squared_distances) - beta))
  if form == 'relative':
    return jnp.sum(squared_distances) / _spread_unit(real_features, form)
  if form == 'threshold':
    return jnp.sum(jnp.maximum(0.0, squared_distances / _spread_unit(real_features, form) - tau))
  raise ValueError(f'Unknown class-centralization form {form!r}; choose one of {CC_FORMS}.')


class ObjectiveWeights(NamedTuple):
  """Weights and options of the objective L = match + cc * CC + cm * CM (Deng et al., CVPR 2024).

  The default is the matching term alone (both weights 0); `reference_iid()` gives the reference
  IID weights. For cc_form='calibrated', `cc` is the fraction rho of the matching term that CC
  contributes.
  """

  cc: float = 0.0
  cm: float = 0.0
  cc_form: str = 'squared'
  cc_alpha: float = 0.02
  cc_beta: float = 0.0
  cc_tau: float = 1.0
  cm_grouping: str = 'channel'

  @classmethod
  def reference_iid(cls) -> ObjectiveWeights:
    """DM + IID with the reference code's weights: lambda_CC 0.05 ('squared'), lambda_CM 0.01."""
    return cls(cc=0.05, cm=0.01)

  @property
  def needs_real_cc_features(self) -> bool:
    """Whether CC needs the real batch under its extractor (the scale-free forms' unit)."""
    return bool(self.cc) and self.cc_form in REAL_SPREAD_FORMS


class LossTerms(NamedTuple):
  """Unweighted loss terms and the weighted total (all scalars); `match` is the method's
  distribution term (DM: mean matching)."""

  total: jax.Array
  match: jax.Array
  cc: jax.Array
  cm: jax.Array


def class_objective(
  real_features: jax.Array,
  real_map: jax.Array,
  syn_features: jax.Array,
  syn_map: jax.Array,
  weights: ObjectiveWeights = ObjectiveWeights(),
  cc_features: jax.Array | None = None,
  cc_real_features: jax.Array | None = None,
  match: MatchFn = mean_matching,
) -> LossTerms:
  """A matching term plus the IID constraints, for one class.

  Args:
    real_features: [N_real, D] matching-network features of the augmented real batch.
    real_map: [N_real, H, W, C] the matching network's final feature map of the same batch.
    syn_features: [N_syn, D] matching-network features of the augmented synthetic images.
    syn_map: [N_syn, H, W, C] their final feature map.
    weights: term weights and options (Python values, static under jit). A zero weight skips
      that term's computation and reports it as 0.
    cc_features: [N_syn, D'] the features class centralization acts on, e.g. a pretrained
      extractor's; None: the matching network's own (`syn_features`).
    cc_real_features: [N_real, D'] the real batch under the same extractor, for the forms that
      measure in units of the real spread; None with `cc_features` None: `real_features`.
    match: the distribution term of (real_features, syn_features) (a `MatchFn`; default DM's
      `mean_matching`).

  Returns:
    LossTerms with total = match + weights.cc * cc + weights.cm * cm, cc the form's value. For
    the 'calibrated' form the weight is weights.cc * stop_gradient(match / cc), recomputed every
    step: CC contributes exactly the fraction weights.cc of this step's matching term whatever
    the extractor's scale, and no state is carried (a resumed run computes the same), while its
    gradient still pulls samples towards their class mean.
  """
  if cc_features is None:
    cc_features, cc_real_features = syn_features, real_features
  matched = match(real_features, syn_features)
  zero = jnp.zeros((), matched.dtype)
  cm = covariance_matching(real_map, syn_map, weights.cm_grouping) if weights.cm else zero
  cc = (
    class_centralization(
      cc_features,
      weights.cc_form,
      weights.cc_alpha,
      weights.cc_beta,
      cc_real_features,
      weights.cc_tau,
    )
    if weights.cc
    else zero
  )
  cc_weight = weights.cc
  if weights.cc_form == 'calibrated' and weights.cc:
    # cc = 0 (one sample per class): no centralization to weigh, and no inf * 0.
    positive = cc > 0
    ratio = jnp.where(positive, matched / jnp.where(positive, cc, 1.0), 0.0)
    cc_weight = weights.cc * jax.lax.stop_gradient(ratio)
  return LossTerms(total=matched + cc_weight * cc + weights.cm * cm, match=matched, cc=cc, cm=cm)


def by_class(x: jax.Array, num_classes: int) -> jax.Array:
  """A class-blocked batch [K * N, ...] (N of class 0, then N of class 1, ...) as [K, N, ...].

  The layout `classwise_objective` takes; `data.sample_all_classes` and the methods'
  `initial_images` produce class-blocked batches, and so does `net.embed` on them.

  Raises:
    ValueError: the leading axis is not a multiple of `num_classes`.
  """
  if x.shape[0] % num_classes:
    raise ValueError(
      f'by_class: a leading axis of {x.shape[0]} does not split into {num_classes} equal classes.'
    )
  return x.reshape(num_classes, x.shape[0] // num_classes, *x.shape[1:])


def classwise_objective(
  real_features: jax.Array,
  real_map: jax.Array,
  syn_features: jax.Array,
  syn_map: jax.Array,
  weights: ObjectiveWeights = ObjectiveWeights(),
  cc_features: jax.Array | None = None,
  cc_real_features: jax.Array | None = None,
  match: MatchFn = mean_matching,
) -> LossTerms:
  """`class_objective` for all classes at once (vmap over a leading class axis), summed.

  Args: as `class_objective`, each array with a leading class axis K, e.g. real_features
    [K, N, D].

  Returns:
    LossTerms, each term summed over the K classes.
  """
  per_class = jax.vmap(
    lambda *arrays: class_objective(*arrays[:4], weights, *arrays[4:], match=match)
  )(real_features, real_map, syn_features, syn_map, cc_features, cc_real_features)
  return jax.tree_util.tree_map(jnp.sum, per_class)

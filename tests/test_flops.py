"""The dense FLOP counter against hand-computed counts."""

import jax
import jax.numpy as jnp
import pytest

from dd_jax import flops, models
from dd_jax.models import kernels


def test_matmul_conv_scan_and_cond():
  a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
  assert flops.count(jnp.matmul, a, b) == 2 * 3 * 4 * 5
  x, w = jnp.ones((2, 7, 7, 3)), jnp.ones((3, 3, 3, 8))  # NHWC, HWIO, SAME: out 2x7x7x8
  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  assert flops.count(conv, x, w) == 2 * (2 * 7 * 7 * 8) * (3 * 3 * 3)
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=6)[1]
  assert flops.count(scanned, a, b) == 6 * 2 * 3 * 4 * 5
  cond = lambda p, a, b: jax.lax.cond(p, lambda: (a @ b).sum(), lambda: a.sum())
  assert flops.count(cond, True, a, b) == 2 * 3 * 4 * 5
  # Under jit and grad: the backward of a matmul is two more matmuls.
  loss = jax.jit(lambda a, b: jnp.sum(a @ b))
  assert flops.count(jax.grad(loss), a, b) == 2 * (2 * 3 * 4 * 5)


@pytest.mark.parametrize('impl', kernels.CONV_IMPLS)
def test_convnet_forward_matches_the_published_layer_shapes(impl):
  # ConvNet (width 128, depth 3) at 32x32x3: 3x3 convolutions at 32, 16 and 8 pixels square.
  net = models.get_network('ConvNet', 10, conv=kernels.ConvLowering(impl))
  variables = net.init(jax.random.key(0), (1, 32, 32, 3))
  expected_convs = 2 * (32 * 32 * 128 * 27 + 16 * 16 * 128 * 1152 + 8 * 8 * 128 * 1152)
  expected_classifier = 2 * 2048 * 10
  published = 4 * (expected_convs + expected_classifier)
  # Without the fold: the published layers, convolution then its instance norm.
  counted = flops.count(lambda x: net.apply(variables, x), jnp.ones((4, 32, 32, 3)))
  if impl == 'winograd':  # layers 2 and 3 (128 channels) take fewer products
    assert counted < published
  else:
    assert counted == published
  # With fold_norm, whatever the convolution's impl, the first norm is folded into its
  # convolution: the same product with per-sample weights, plus each sample's [27, 27] patch
  # covariance over 32 x 32 positions, w^T C w per channel (as C w, then a per-channel dot) and
  # the patch mean's product with w.
  folding = net.with_conv(kernels.ConvLowering(impl, fold_norm=True))
  folded = flops.count(lambda x: folding.apply(variables, x), jnp.ones((4, 32, 32, 3)))
  patch, width = 27, 128
  fold_extra = 2 * (32 * 32 * patch * patch + patch * patch * width + 2 * patch * width)
  assert folded == counted + 4 * fold_extra
  # Only a first layer's small patch is folded: on 8 input channels (72 values per patch, above
  # FOLD_NORM_MAX_PATCH) the folding network computes what the other one does.
  wide = (4, 32, 32, 8)
  assert 3 * 3 * wide[-1] > kernels.FOLD_NORM_MAX_PATCH
  wide_variables = net.init(jax.random.key(0), wide)
  assert flops.count(lambda x: folding.apply(wide_variables, x), jnp.ones(wide)) == flops.count(
    lambda x: net.apply(wide_variables, x), jnp.ones(wide)
  )

"""dd_jax.models: published parameter counts, PyTorch init, norm semantics, the boundary."""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from dd_jax import flops, lowering, models
from dd_jax.models import kernels, layers


def _abstract_param_count(net, input_shape):
  shapes = jax.eval_shape(lambda key: net.init(key, (1, *input_shape)), jax.random.key(0))
  return models.param_count(shapes)


# Counts of the PyTorch reference networks (DC benchmark code).
@pytest.mark.parametrize(
  'name, input_shape, num_classes, expected',
  [
    ('ConvNet', (32, 32, 3), 10, 320_010),
    ('ConvNet', (28, 28, 1), 10, 317_706),
    ('ConvNet', (32, 32, 3), 100, 504_420),
    ('ConvNetD4', (64, 64, 3), 200, 857_160),
    ('ConvNet', (64, 64, 3), 200, 1_938_120),
    ('AlexNet', (32, 32, 3), 10, 1_872_202),
    ('VGG11', (32, 32, 3), 10, 9_231_114),
    ('ResNet18', (32, 32, 3), 10, 11_173_962),
    ('LeNet', (32, 32, 3), 10, 62_006),
    ('MLP', (32, 32, 3), 10, 411_146),
  ],
)
def test_parameter_counts_match_pytorch_reference(name, input_shape, num_classes, expected):
  net = models.get_network(name, num_classes)
  assert _abstract_param_count(net, input_shape) == expected


@pytest.mark.parametrize('name', models.network_names())
@pytest.mark.parametrize('input_shape', [(32, 32, 3), (64, 64, 3), (28, 28, 1)])
def test_every_network_builds_at_every_input_size(name, input_shape):
  net = models.get_network(name, 7)
  variables = jax.eval_shape(lambda key: net.init(key, (2, *input_shape)), jax.random.key(0))
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  logits = jax.eval_shape(lambda v, x: net.apply(v, x), variables, x)
  features, feature_map = jax.eval_shape(lambda v, x: net.embed(v, x), variables, x)
  assert logits.shape == (2, 7)
  assert features.shape[0] == 2 and feature_map.shape[0] == 2
  if name not in ('MLP', 'LeNet'):  # their embedding is the penultimate dense layer
    assert features.shape[1] == math.prod(feature_map.shape[1:])


def test_convnet_maps_follow_spec():
  net = models.get_network('ConvNet', 10)
  for shape, map_shape in [
    ((32, 32, 3), (4, 4, 128)),
    ((28, 28, 1), (4, 4, 128)),
    ((64, 64, 3), (8, 8, 128)),
  ]:
    variables = jax.eval_shape(lambda key: net.init(key, (1, *shape)), jax.random.key(0))
    _, feature_map = jax.eval_shape(lambda v: net.embed(v, jnp.zeros((1, *shape))), variables)
    assert feature_map.shape[1:] == map_shape
  # The 28x28 one-channel rule pads the first conv by 3 (a 32x32 map); others by 1.
  variables = jax.eval_shape(lambda key: net.init(key, (1, 28, 28, 1)), jax.random.key(0))
  assert variables['params']['conv0']['kernel'].shape == (3, 3, 1, 128)


def test_init_is_pytorch_uniform_for_weights_and_biases():
  net = models.get_network('ConvNet', 10)
  params = net.init(jax.random.key(1), (1, 32, 32, 3))['params']
  for name, fan_in in [('conv0', 27), ('conv1', 1152), ('classifier', 2048)]:
    bound = 1 / math.sqrt(fan_in)
    for leaf_name in ('kernel', 'bias'):
      values = np.asarray(params[name][leaf_name])
      assert np.abs(values).max() <= bound
      if values.size > 1000:
        # A U(-b, b) sample of this size spans the interval and has std b / sqrt(3).
        assert np.abs(values).max() > 0.99 * bound
        np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=0.05)
    # Biases are not zero (Flax's default) but uniform like PyTorch.
    assert np.abs(np.asarray(params[name]['bias'])).max() > 0.5 * bound
  np.testing.assert_array_equal(params['norm0']['scale'], np.ones(128))
  np.testing.assert_array_equal(params['norm0']['bias'], np.zeros(128))


def test_every_norm_uses_eps_1e5():
  for kind in ('instancenorm', 'groupnorm', 'layernorm', 'batchnorm'):
    assert layers.norm_layer(kind, 8, train=False).epsilon == 1e-5


def test_instance_norm_equals_its_formula():
  x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6)) * 3.0 + 1.5
  norm = layers.norm_layer('instancenorm', 6, train=False)
  variables = norm.init(jax.random.key(1), x)
  scale = jax.random.normal(jax.random.key(2), (6,))
  bias = jax.random.normal(jax.random.key(3), (6,))
  y = norm.apply({'params': {'scale': scale, 'bias': bias}}, x)
  x64 = np.asarray(x, np.float64)
  mean = x64.mean(axis=(1, 2), keepdims=True)
  var = x64.var(axis=(1, 2), keepdims=True)  # biased, per sample and channel
  expected = (x64 - mean) / np.sqrt(var + 1e-5) * np.asarray(scale) + np.asarray(bias)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  assert variables['params']['scale'].shape == (6,)


def _instance_norm_case(dtype):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 3, 5)) * 3.0 + 1.5, dtype)
  scale = jnp.asarray(rng.normal(size=(5,)), dtype)
  bias = jnp.asarray(rng.normal(size=(5,)), dtype)
  weights = jnp.asarray(rng.normal(size=x.shape), dtype)  # a loss that weighs every output
  return x, scale, bias, weights


@pytest.mark.parametrize('relu', [False, True])
def test_instance_norm_equals_flax_group_norm_in_value_and_gradient(relu):
  # The hand-written backward must equal autodiff of Flax's GroupNorm(one group per channel),
  # followed by nn.relu for the fused variant.
  x, scale, bias, weights = _instance_norm_case(jnp.float32)
  group_norm = nn.GroupNorm(num_groups=5, epsilon=1e-5, use_fast_variance=False)
  act = nn.relu if relu else (lambda y: y)

  def flax_loss(x, scale, bias):
    y = group_norm.apply({'params': {'scale': scale, 'bias': bias}}, x)
    return jnp.sum(weights * act(y))

  def ours_loss(x, scale, bias):
    return jnp.sum(weights * kernels.instance_norm(x, scale, bias, relu=relu))

  np.testing.assert_allclose(ours_loss(x, scale, bias), flax_loss(x, scale, bias), rtol=1e-5)
  ours = jax.grad(ours_loss, argnums=(0, 1, 2))(x, scale, bias)
  expected = jax.grad(flax_loss, argnums=(0, 1, 2))(x, scale, bias)
  for got, want in zip(ours, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(ours[0]).max()) > 0.1


@pytest.mark.parametrize('relu', [False, True])
def test_instance_norm_gradient_matches_finite_differences_in_float64(relu):
  with float64():
    x, scale, bias, weights = _instance_norm_case(jnp.float64)
    assert x.dtype == jnp.float64

    def loss(x, scale, bias):
      return jnp.sum(weights * jnp.tanh(kernels.instance_norm(x, scale, bias, relu=relu)))

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
    rng = np.random.default_rng(4)
    eps = 1e-6
    for _ in range(3):
      directions = [jnp.asarray(rng.normal(size=a.shape)) for a in (x, scale, bias)]
      plus = loss(*(a + eps * d for a, d in zip((x, scale, bias), directions)))
      minus = loss(*(a - eps * d for a, d in zip((x, scale, bias), directions)))
      analytic = sum(jnp.vdot(g, d) for g, d in zip(grads, directions))
      np.testing.assert_allclose(analytic, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_eps_matters_for_small_variance():
  # With variance ~1e-5 the result depends visibly on eps: distinguishes 1e-5 from 1e-6.
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2)) * 3e-3
  norm = layers.norm_layer('instancenorm', 2, train=False)
  y = norm.apply(norm.init(jax.random.key(0), x), x)
  x64 = np.asarray(x, np.float64)
  centred = x64 - x64.mean(axis=(1, 2), keepdims=True)
  var = x64.var(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(y, centred / np.sqrt(var + 1e-5), rtol=1e-4)
  assert not np.allclose(y, centred / np.sqrt(var + 1e-6), rtol=1e-2)


def test_batchnorm_train_and_eval_modes():
  net = models.get_network('ConvNetBN', 4)
  assert net.has_batch_stats
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) * 2 + 1
  variables = net.init(jax.random.key(1), x.shape)
  logits, updated = net.apply_train(variables, x)
  # Running mean moves by (1 - momentum) = 0.1 of the batch mean (PyTorch momentum 0.1).
  old = variables['batch_stats']['norm0']['mean']
  new = updated['batch_stats']['norm0']['mean']
  assert not np.allclose(old, new)
  np.testing.assert_array_equal(logits, net.apply(variables, x, train=True))
  assert not np.allclose(net.apply(variables, x), logits)
  # Embedding in train mode uses batch statistics, in eval mode the (initial) running ones.
  features, _ = net.embed(variables, x, train=True)
  assert features.shape == (8, 128)
  assert not np.allclose(features, net.embed(variables, x)[0])


def test_functional_boundary_under_jit_and_vmap_over_keys():
  net = models.get_network('ConvNetW32', 10)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(jax.random.key(1), (5, 16, 16, 3))

  @jax.jit
  def embed_with_fresh_networks(keys, x):
    def one(key):
      return net.embed(net.init(key, x.shape), x)[0]

    return jax.vmap(one)(keys)

  features = embed_with_fresh_networks(keys, x)
  chex.assert_shape(features, (3, 5, 32 * 2 * 2))
  chex.assert_tree_all_finite(features)
  # Different keys give different random networks; the same key gives the same one.
  assert not np.allclose(features[0], features[1])
  again = embed_with_fresh_networks(keys, x)
  np.testing.assert_array_equal(features, again)
  one = jax.jit(lambda key: net.embed(net.init(key, x.shape), x)[0])(keys[2])
  np.testing.assert_allclose(features[2], one, rtol=1e-5, atol=1e-6)


def test_embed_is_consistent_with_logits():
  net = models.get_network('ConvNetD2', 3)
  x = jax.random.normal(jax.random.key(0), (4, 12, 12, 3))
  variables = net.init(jax.random.key(1), x.shape)
  features, feature_map = net.embed(variables, x)
  classifier = variables['params']['classifier']
  expected = features @ classifier['kernel'] + classifier['bias']
  np.testing.assert_allclose(net.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(features, feature_map.reshape(4, -1))


def test_convnet_variants():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  outputs = {}
  for name in (
    'ConvNetAS',
    'ConvNetAL',
    'ConvNetASwish',
    'ConvNetNN',
    'ConvNetLN',
    'ConvNetGN',
    'ConvNetMP',
    'ConvNetNP',
    'ConvNetW32',
    'ConvNetD1',
  ):
    net = models.get_network(name, 10)
    variables = jax.eval_shape(lambda key: net.init(key, x.shape), jax.random.key(0))
    outputs[name] = jax.eval_shape(lambda v: net.embed(v, x), variables)[1].shape
  assert outputs['ConvNetNP'] == (2, 16, 16, 128)
  assert outputs['ConvNetD1'] == (2, 8, 8, 128)
  assert outputs['ConvNetW32'] == (2, 2, 2, 32)
  sigmoid_net = models.get_network('ConvNetAS', 10)
  _, sigmoid_map = jax.jit(lambda key: sigmoid_net.embed(sigmoid_net.init(key, x.shape), x))(
    jax.random.key(0)
  )
  assert float(sigmoid_map.min()) >= 0.0 and float(sigmoid_map.max()) <= 1.0


def test_registry_errors_and_overrides():
  with pytest.raises(ValueError, match='Unknown network .ConvNett.*ConvNet'):
    models.get_network('ConvNett', 10)
  with pytest.raises(ValueError, match='only apply to ConvNet'):
    models.get_network('ResNet18', 10, depth=4)
  net = models.get_network('ConvNet', 200, depth=4)
  assert _abstract_param_count(net, (64, 64, 3)) == 857_160
  assert isinstance(net.module, nn.Module)
  hash(net)  # usable as a static jit argument


@pytest.mark.parametrize(
  'kernel_size, stride, padding', [(3, 1, 1), (3, 1, 3), (5, 1, 2), (3, 2, 1), (1, 2, 0), (5, 1, 0)]
)
def test_im2col_convolution_equals_xla(kernel_size, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 3, 4))

  def xla(x, kernel):
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      ((padding, padding),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )

  def im2col(x, kernel):
    return kernels.conv2d_im2col(x, kernel, stride, padding)

  np.testing.assert_allclose(im2col(x, kernel), xla(x, kernel), rtol=1e-5, atol=1e-5)
  for argnum in (0, 1):
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=argnum)(x, kernel)
    np.testing.assert_allclose(grad(im2col), grad(xla), rtol=1e-4, atol=1e-4)


def test_conv_impls_give_the_same_network():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  outputs = []
  for impl in kernels.CONV_IMPLS:
    net = models.get_network('ResNet18', 10, conv=kernels.ConvLowering(impl))
    assert net.conv == kernels.ConvLowering(impl)
    variables = jax.jit(lambda key: net.init(key, x.shape))(jax.random.key(1))
    outputs.append(jax.jit(lambda v: net.apply(v, x))(variables))
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outputs[0], outputs[2], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="Unknown convolution impl 'fft'"):
    kernels.ConvLowering('fft')


def _xla_same_conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _conv_and_gradients(conv, x, kernel, dy):
  y, vjp = jax.vjp(conv, x, kernel)
  return (y, *vjp(dy))


def test_winograd_convolution_equals_xla_in_float64():
  # Non-square maps, channel counts that are not multiples of anything, a 2x2 map (one tile).
  with float64():
    for shape, c_out in (((2, 6, 4, 5), 7), ((3, 2, 2, 16), 3)):
      x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
      kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], c_out), jnp.float64)
      dy = jax.random.normal(jax.random.key(2), (*shape[:3], c_out), jnp.float64)
      expected = _conv_and_gradients(_xla_same_conv, x, kernel, dy)
      got = _conv_and_gradients(kernels.conv2d_winograd, x, kernel, dy)
      for name, a, b in zip(('output', 'input gradient', 'kernel gradient'), got, expected):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_winograd_float32_error_is_that_of_im2col():
  # Both against a float64 reference: Winograd's transforms must not amplify rounding (its
  # F(4x4, 3x3) cousin would, by ~5x).
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 16)) / 17
  dy = jax.random.normal(jax.random.key(2), (4, 8, 8, 16))
  with float64():
    reference = [
      np.asarray(a)
      for a in _conv_and_gradients(
        _xla_same_conv, *(np.asarray(a, np.float64) for a in (x, kernel, dy))
      )
    ]
  im2col = _conv_and_gradients(lambda a, b: kernels.conv2d_im2col(a, b, 1, 1), x, kernel, dy)
  winograd = _conv_and_gradients(kernels.conv2d_winograd, x, kernel, dy)
  for name, w, i, r in zip(
    ('output', 'input gradient', 'kernel gradient'), winograd, im2col, reference
  ):
    assert w.dtype == jnp.float32
    relative = lambda a: float(np.linalg.norm(np.asarray(a, np.float64) - r) / np.linalg.norm(r))
    assert relative(w) < max(3 * relative(i), 1e-7), (name, relative(w), relative(i))


def test_winograd_applies_to_same_3x3_convolutions_with_channels():
  assert kernels.winograd_applies((8, 16, 16, 128), (3, 3, 128, 128), 1, 1)
  assert not kernels.winograd_applies((8, 32, 32, 3), (3, 3, 3, 128), 1, 1)  # few channels
  assert not kernels.winograd_applies((8, 7, 8, 64), (3, 3, 64, 64), 1, 1)  # odd height
  assert not kernels.winograd_applies((8, 8, 8, 64), (3, 3, 64, 64), 2, 1)  # stride
  assert not kernels.winograd_applies((8, 8, 8, 64), (3, 3, 64, 64), 1, 0)  # 'valid'
  assert not kernels.winograd_applies((8, 8, 8, 64), (5, 5, 64, 64), 1, 2)
  with pytest.raises(ValueError, match='even map sides'):
    kernels.conv2d_winograd(jnp.ones((1, 5, 4, 16)), jnp.ones((3, 3, 16, 2)))


def test_convnet_training_gradient_is_the_same_with_winograd():
  # The CPU's trained networks: layers 2 and 3 by Winograd, layer 1 (3 channels) by im2col with
  # its norm folded; against XLA's convolutions.
  x = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  labels = jnp.arange(6) % 4
  gradients, forward_flops = [], []
  for conv in (kernels.ConvLowering('xla'), kernels.ConvLowering('winograd', fold_norm=True)):
    net = models.get_network('ConvNet', 4, conv=conv)
    variables = net.init(jax.random.key(1), x.shape)
    # Layer 1 as a plain im2col product in the count (the fold is tested below).
    unfolded = net.with_conv(dataclasses.replace(conv, fold_norm=False))
    forward_flops.append(flops.count(lambda v, net=unfolded: net.apply(v, x), variables))

    def loss(params):
      logits = net.apply({'params': params}, x)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    gradients.append(jax.jit(jax.grad(loss))(variables['params']))
  for path, a, b in zip(
    jax.tree_util.tree_leaves_with_path(gradients[0]), *map(jax.tree.leaves, gradients)
  ):
    # Conv biases before instance norm have a zero gradient: only rounding is compared there.
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path[0]))
  # Winograd ran: layers 2 and 3 (8x8 and 4x4 maps) do 16 instead of 36 products per 2x2 tile,
  # plus the kernel transforms (G g G^T as two small products, 168 C_in C_out FLOPs).
  conv1_and_classifier = 2 * 6 * (16 * 16 * 27 * 128 + 2 * 2 * 128 * 4)
  layers_2_and_3 = forward_flops[0] - conv1_and_classifier
  expected = conv1_and_classifier + layers_2_and_3 * 16 / 36 + 2 * 168 * 128 * 128
  assert forward_flops[1] == pytest.approx(expected, rel=1e-6)


def test_convnet_with_fused_norm_and_relu_equals_the_layers_one_by_one_in_float64():
  # ConvNet runs instance norm + ReLU as one VJP; the same weights through the separate layers
  # (norm, then nn.relu differentiated by autodiff) must agree in value and every gradient.
  net = models.get_network('ConvNet', 4, conv=kernels.ConvLowering('xla'), depth=2)
  params32 = net.init(jax.random.key(1), (3, 8, 8, 3))['params']
  with float64():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3), jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)

    def layer_by_layer(params, x):
      for d in range(2):
        conv = params[f'conv{d}']
        x = jax.lax.conv_general_dilated(
          x, conv['kernel'], (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )
        norm = params[f'norm{d}']
        x = nn.relu(kernels.instance_norm(x + conv['bias'], norm['scale'], norm['bias']))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      dense = params['classifier']
      return x.reshape(x.shape[0], -1) @ dense['kernel'] + dense['bias']

    def loss(forward):
      return lambda params, x: jnp.sum(jnp.sin(forward(params, x)))

    fused = loss(lambda params, x: net.apply({'params': params}, x))
    np.testing.assert_allclose(fused(params, x), loss(layer_by_layer)(params, x), rtol=1e-12)
    got = jax.grad(fused, argnums=(0, 1))(params, x)
    want = jax.grad(loss(layer_by_layer), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
  ('shape', 'stride', 'padding', 'relu'),
  [((3, 9, 10, 3), 1, 1, True), ((2, 11, 8, 1), 2, 0, False), ((2, 6, 6, 2), 1, 3, True)],
)
def test_conv_instance_norm_equals_the_norm_of_the_convolution_in_float64(
  shape, stride, padding, relu
):
  with float64():
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], shape, jnp.float64)
    x = x.at[0].set(0.0)  # a blank image: zero variance, the output is the norm's bias
    kernel = jax.random.normal(keys[1], (3, 3, shape[-1], 5), jnp.float64)
    conv_bias = jax.random.normal(keys[2], (5,), jnp.float64)
    scale = 1 + 0.3 * jax.random.normal(keys[3], (5,), jnp.float64)
    bias = jax.random.normal(keys[4], (5,), jnp.float64)

    def folded(x, kernel, scale, bias):
      y = kernels.conv_instance_norm(
        x, kernel, scale, bias, stride=stride, padding=padding, relu=relu
      )
      return jnp.sum(jnp.sin(y))

    def unfolded(x, kernel, conv_bias, scale, bias):
      y = kernels.conv2d_im2col(x, kernel, stride, padding) + conv_bias
      return jnp.sum(jnp.sin(kernels.instance_norm(y, scale, bias, relu=relu)))

    # A sum of ~150 outputs of size ~1 that nearly cancel: float64 rounding of the terms gives
    # ~1e-12 absolute (jax 0.12 reached 1.8e-12); a wrong fold is off by O(1).
    np.testing.assert_allclose(
      folded(x, kernel, scale, bias),
      unfolded(x, kernel, conv_bias, scale, bias),
      rtol=1e-12,
      atol=1e-11,
    )
    got = jax.grad(folded, argnums=(0, 1, 2, 3))(x, kernel, scale, bias)
    want = jax.grad(unfolded, argnums=(0, 1, 3, 4))(x, kernel, conv_bias, scale, bias)
    # The blank image's input gradient is zero up to rounding amplified by 1 / sqrt(eps).
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('input_shape', [(3, 12, 12, 3), (2, 8, 8, 1)])
def test_convnet_gradient_is_the_same_with_the_folded_first_norm_in_float64(input_shape):
  folding = models.get_network(
    'ConvNet', 4, conv=kernels.ConvLowering('winograd', fold_norm=True), depth=2
  )
  plain = folding.with_conv(kernels.ConvLowering('winograd'))
  params32 = folding.init(jax.random.key(1), input_shape)['params']
  with float64():
    x = jax.random.normal(jax.random.key(0), input_shape, jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)

    def loss(net):
      return lambda params, x: jnp.sum(jnp.sin(net.apply({'params': params}, x)))

    got = jax.value_and_grad(loss(folding), argnums=(0, 1))(params, x)
    want = jax.value_and_grad(loss(plain), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    # The fold ran: the programs differ.
    programs = [str(jax.make_jaxpr(loss(net))(params, x)) for net in (folding, plain)]
    assert programs[0] != programs[1]


def test_folds_norm_only_when_asked_and_on_narrow_convolutions():
  for impl in kernels.CONV_IMPLS:
    folding, plain = kernels.ConvLowering(impl, fold_norm=True), kernels.ConvLowering(impl)
    assert folding.folds_norm((3, 3, 3, 128))
    assert folding.folds_norm((3, 3, 7, 128))  # 63 values per patch
    assert not folding.folds_norm((3, 3, 8, 128))  # 72: the covariance costs too much
    assert not plain.folds_norm((3, 3, 3, 128))
  assert kernels.ConvLowering() == kernels.ConvLowering('xla', fold_norm=False)
  hash(kernels.ConvLowering('winograd', fold_norm=True))  # a field of the (hashable) networks


def test_every_conv_lowering_gives_the_same_network_under_x64():
  # jax_enable_x64: float32 parameters on float64 inputs compute in float64 in every kernel
  # (Winograd in layers 2 and 3, the folded first norm, the instance norm's VJP).
  lowerings = (
    kernels.ConvLowering('xla'),
    kernels.ConvLowering('xla', fold_norm=True),
    kernels.ConvLowering('im2col', fold_norm=True),
    kernels.ConvLowering('winograd', fold_norm=True),
  )
  outputs = []
  with float64():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3), jnp.float64)
    for conv in lowerings:
      net = models.get_network('ConvNet', 4, conv=conv, width=16)
      variables = net.init(jax.random.key(1), x.shape)

      def logits_and_input_gradient(x, net=net, variables=variables):
        loss = lambda x: jnp.sum(jnp.sin(net.apply(variables, x)))
        return net.apply(variables, x), jax.grad(loss)(x)

      logits, grad = jax.jit(logits_and_input_gradient)(x)
      for name, value in (('logits', logits), ('input gradient', grad)):
        assert value.dtype == jnp.float64, (conv, name, value.dtype)
        assert np.all(np.isfinite(value)), (conv, name)
      outputs.append((logits, grad))
  assert np.abs(outputs[0][1]).max() > 1e-3  # a gradient to compare
  for conv, (logits, grad) in zip(lowerings[1:], outputs[1:]):
    np.testing.assert_allclose(logits, outputs[0][0], rtol=1e-6, atol=1e-6, err_msg=str(conv))
    np.testing.assert_allclose(grad, outputs[0][1], rtol=1e-6, atol=1e-6, err_msg=str(conv))


def test_resolve_lowering():
  on_cpu = jax.default_backend() == 'cpu'
  assert lowering.resolve() == (lowering.CPU if on_cpu else lowering.ACCELERATOR)
  assert lowering.resolve('auto') == lowering.resolve()
  assert lowering.resolve('cpu') == lowering.CPU
  assert lowering.resolve('accelerator') == lowering.ACCELERATOR
  assert (lowering.CPU.name, lowering.ACCELERATOR.name) == ('cpu', 'accelerator')
  # 'auto' keeps the lowering's precision, 'default' is the platform's (None), others override.
  assert lowering.resolve('accelerator', 'auto').precision == 'tensorfloat32'
  assert lowering.resolve('accelerator', 'default') == dataclasses.replace(
    lowering.ACCELERATOR, precision=None
  )
  assert lowering.resolve('cpu', 'float32') == dataclasses.replace(
    lowering.CPU, precision='float32'
  )
  hash(lowering.resolve('cpu', 'float32'))  # a static argument of jax.jit
  with pytest.raises(ValueError, match=r"config\.compute\.lowering='gpu'"):
    lowering.resolve('gpu')
  with pytest.raises(ValueError, match=r"config\.compute\.precision='bfloat16'"):
    lowering.resolve('cpu', 'bfloat16')
  with pytest.raises(ValueError, match=r"config\.compute\.precision='highest'"):
    lowering.resolve('auto', 'highest')


def test_too_small_input_is_a_clear_error():
  net = models.get_network('VGG11', 10)
  with pytest.raises(ValueError, match='too small for this network'):
    jax.eval_shape(lambda key: net.init(key, (1, 8, 8, 1)), jax.random.key(0))

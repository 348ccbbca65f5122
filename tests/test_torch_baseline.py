"""The PyTorch speed baseline computes what dd_jax computes (experiments/torch_baseline.py).

Skipped without the optional `bench` extra (torch). On identical weights and images, without
augmentation, the baseline's network, DM + CC + CM objective and its gradient with respect to the
synthetic images equal dd_jax's: the benchmark times the same work. For the IDC family: M3D's
MMD (value and gradient, float64), the factor-2 decode and IDC's DiffAug on given parameters
equal dd_jax's `losses.mmd_matching`, `multiformation.decode` and `augment.idc.apply`; NCFM's CF
loss and DSDM's loss (value and gradient, float64) equal `losses.characteristic_function_matching`
and `losses.dsdm_matching`.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from dd_jax import losses, models, multiformation
from dd_jax.augment import idc

torch = pytest.importorskip('torch')

_PATH = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'torch_baseline.py'
_SPEC = importlib.util.spec_from_file_location('torch_baseline', _PATH)
torch_baseline = importlib.util.module_from_spec(_SPEC)
sys.modules['torch_baseline'] = torch_baseline  # dataclasses look their module up by name
_SPEC.loader.exec_module(torch_baseline)

WIDTH, SIDE, CLASSES = 8, 16, 3


def _torch_net_from(params) -> 'torch_baseline.ConvNet':
  """The dd_jax ConvNet's weights in the baseline's layout (HWIO -> OIHW; NHWC flattening)."""
  net = torch_baseline.ConvNet(3, CLASSES, width=WIDTH, image_size=SIDE)
  convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
  norms = [m for m in net.features if isinstance(m, torch.nn.GroupNorm)]
  as_tensor = lambda x: torch.from_numpy(np.asarray(x).copy())
  with torch.no_grad():
    for i, (conv, norm) in enumerate(zip(convs, norms)):
      conv.weight.copy_(as_tensor(params[f'conv{i}']['kernel']).permute(3, 2, 0, 1))
      conv.bias.copy_(as_tensor(params[f'conv{i}']['bias']))
      norm.weight.copy_(as_tensor(params[f'norm{i}']['scale']))
      norm.bias.copy_(as_tensor(params[f'norm{i}']['bias']))
    side = SIDE // 8
    kernel = as_tensor(params['classifier']['kernel'])  # rows in (h, w, c) order
    kernel = kernel.reshape(side, side, WIDTH, CLASSES).permute(3, 2, 0, 1).reshape(CLASSES, -1)
    net.classifier.weight.copy_(kernel)
    net.classifier.bias.copy_(as_tensor(params['classifier']['bias']))
  return net


@pytest.fixture(name='pair')
def _pair():
  network = models.get_network('ConvNet', CLASSES, width=WIDTH)
  variables = network.init(jax.random.key(0), (SIDE, SIDE, 3))
  return network, variables, _torch_net_from(variables['params'])


def test_network_embedding_and_logits_match(pair):
  network, variables, torch_net = pair
  images = np.random.default_rng(0).normal(size=(4, SIDE, SIDE, 3)).astype(np.float32)
  _, feature_map, logits = network.embed_with_logits(variables, jnp.asarray(images))
  nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    torch_map = torch_net.embed(nchw).permute(0, 2, 3, 1).numpy()
    torch_logits = torch_net(nchw).numpy()
  np.testing.assert_allclose(torch_map, feature_map, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(torch_logits, logits, rtol=1e-4, atol=1e-5)


def test_objective_and_its_gradient_match_dd_jax(pair):
  network, variables, torch_net = pair
  rng = np.random.default_rng(1)
  real = rng.normal(size=(6, SIDE, SIDE, 3)).astype(np.float32)
  syn = rng.normal(size=(3, SIDE, SIDE, 3)).astype(np.float32)
  weights = losses.ObjectiveWeights.reference_iid()

  def jax_objective(syn_images):
    real_features, real_map = network.embed(variables, jnp.asarray(real))
    syn_features, syn_map = network.embed(variables, syn_images)
    return losses.class_objective(real_features, real_map, syn_features, syn_map, weights).total

  value, gradient = jax.value_and_grad(jax_objective)(jnp.asarray(syn))
  torch_syn = torch.from_numpy(syn.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  torch_real = torch.from_numpy(real.transpose(0, 3, 1, 2).copy())
  torch_value = torch_baseline.class_objective(
    torch_net.embed(torch_real),
    torch_net.embed(torch_syn),
    torch_baseline.Weights(cc=0.05, cm=0.01),
  )
  torch_value.backward()
  np.testing.assert_allclose(float(torch_value.detach()), float(value), rtol=1e-4)
  np.testing.assert_allclose(
    torch_syn.grad.numpy().transpose(0, 2, 3, 1), gradient, rtol=1e-3, atol=1e-6
  )


def test_steps_update_the_images_and_keep_shapes():
  generator = torch.Generator().manual_seed(0)
  real_by_class = [torch.randn(8, 3, SIDE, SIDE) for _ in range(CLASSES)]
  labels = torch.arange(CLASSES).repeat_interleave(8)
  for op in torch_baseline.STRATEGY:
    out = torch_baseline.augment(real_by_class[0], op, generator, siamese=False)
    assert out.shape == real_by_class[0].shape and torch.isfinite(out).all(), op
  images = torch.randn(CLASSES * 2, 3, SIDE, SIDE, requires_grad=True)
  before = images.detach().clone()
  optimizer = torch.optim.SGD([images], lr=1.0, momentum=0.5)
  torch_baseline.dm_step(images, optimizer, real_by_class, 4, torch_baseline.Weights(), generator)
  assert not torch.equal(images.detach(), before)
  queue = [torch_baseline.queue_net(3, CLASSES, SIDE) for _ in range(2)]
  queue_before = queue[0].net.classifier.weight.detach().clone()
  torch_baseline.idm_step(
    images,
    torch.optim.SGD([images], lr=0.2, momentum=0.5),
    real_by_class,
    (torch.cat(real_by_class), labels),
    queue,
    4,
    torch_baseline.Weights(cc=0.01, cm=0.03),
    generator,
    train_steps=2,
    train_batch=4,
  )
  assert not torch.equal(queue[0].net.classifier.weight, queue_before)
  assert torch_baseline.expand(images.detach()).shape == (4 * CLASSES * 2, 3, SIDE, SIDE)


def _nchw(x: np.ndarray) -> 'torch.Tensor':
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: 'torch.Tensor') -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def test_m3d_mmd_and_its_gradient_match_dd_jax_in_float64():
  rng = np.random.default_rng(2)
  real, syn = rng.normal(size=(5, 6)), rng.normal(size=(3, 6))
  torch_syn = torch.from_numpy(syn).requires_grad_(True)
  torch_value = torch_baseline.mmd_matching(torch.from_numpy(real), torch_syn)
  torch_value.backward()
  with float64():
    value, gradient = jax.value_and_grad(lambda s: losses.mmd_matching(jnp.asarray(real), s))(
      jnp.asarray(syn)
    )
  np.testing.assert_allclose(float(torch_value.detach()), float(value), rtol=1e-12)
  np.testing.assert_allclose(torch_syn.grad.numpy(), gradient, rtol=1e-10, atol=1e-14)
  # The hand-computed vector of tests/test_losses.py.
  vector = torch_baseline.mmd_matching(
    torch.tensor([[1.0, 0], [0, 1], [1, 1]], dtype=torch.float64),
    torch.tensor([[1.0, 0], [0, 0]], dtype=torch.float64),
  )
  np.testing.assert_allclose(float(vector), 1.7951326, rtol=1e-6)


def test_decode_matches_multiformation():
  stored = np.random.default_rng(3).normal(size=(2, SIDE, SIDE, 3)).astype(np.float32)
  decoded = torch_baseline.decode(_nchw(stored), factor=2)
  np.testing.assert_allclose(
    _nhwc(decoded), multiformation.decode(jnp.asarray(stored), 2), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize(
  'shift, centre',
  [((-2, 1), (0, 16)), ((2, 0), (7, 3)), ((0, -1), (16, 0))],
)
def test_idc_augment_matches_dd_jax_on_given_parameters(shift, centre):
  # SIDE 16: crop shifts in {-2, ..., 2}, an 8 x 8 cutout around a centre in {0, ..., 16}.
  images = np.random.default_rng(4).normal(size=(3, SIDE, SIDE, 3)).astype(np.float32)
  params = torch_baseline.IDCParams(0.3, 0.8, 0.1, *shift, *centre)
  one = lambda value, dtype=jnp.float32: jnp.asarray([value], dtype)
  jax_params = idc.Params(
    flip=one(False, bool),
    brightness=one(params.brightness),
    saturation=one(params.saturation),
    contrast=one(params.contrast),
    geometric=jnp.asarray(0, jnp.int32),
    shift_rows=one(shift[0], jnp.int32),
    shift_cols=one(shift[1], jnp.int32),
    scale_rows=one(1.0),
    scale_cols=one(1.0),
    angle=one(0.0),
    cutout_rows=one(centre[0], jnp.int32),
    cutout_cols=one(centre[1], jnp.int32),
  )
  expected = idc.apply(jnp.asarray(images), jax_params, 'color_crop_cutout')
  got = torch_baseline.idc_augment(_nchw(images), params)
  np.testing.assert_allclose(_nhwc(got), expected, rtol=1e-5, atol=1e-5)


def test_family_steps_update_the_images():
  generator = torch.Generator().manual_seed(0)
  real_by_class = [torch.rand(8, 3, SIDE, SIDE) for _ in range(CLASSES)]
  images = torch.rand(CLASSES * 2, 3, SIDE, SIDE, requires_grad=True)
  optimizer = torch.optim.SGD([images], lr=1.0, momentum=0.5)
  networks = torch_baseline.RandomNetworks(3, CLASSES, SIDE, every=2)
  nets = []
  for _ in range(3):
    before = images.detach().clone()
    loss = torch_baseline.m3d_step(images, optimizer, real_by_class, 4, networks, generator)
    nets.append(networks.net)
    assert np.isfinite(loss) and not torch.equal(images.detach(), before)
  assert nets[0] is nets[1] and nets[2] is not nets[1]  # re-drawn every 2 iterations
  pool = torch_baseline.dance_pool(3, CLASSES, SIDE, members=2)
  before = images.detach().clone()
  torch_baseline.dance_step(
    images, torch.optim.SGD([images], lr=0.1, momentum=0.5), real_by_class, 4, pool, generator
  )
  assert not torch.equal(images.detach(), before)
  # The matching network holds lambda * initial + (1 - lambda) * final of one member.
  weight = pool.matching.classifier.weight
  fits = []
  for initial, final in zip(pool.initial, pool.final):
    a, b = initial['classifier.weight'], final['classifier.weight']
    lam = float(((weight - b) * (a - b)).sum() / ((a - b) ** 2).sum())
    fits.append(float((weight - (lam * a + (1 - lam) * b)).abs().max()))
  assert min(fits) < 1e-6


def test_ncfm_cf_loss_and_its_gradient_match_dd_jax_in_float64():
  rng = np.random.default_rng(5)
  real, syn, frequencies = rng.normal(size=(5, 6)), rng.normal(size=(3, 6)), rng.normal(size=(7, 6))
  torch_syn = torch.from_numpy(syn).requires_grad_(True)
  torch_value = torch_baseline.characteristic_function_matching(
    torch.from_numpy(real), torch_syn, torch.from_numpy(frequencies), 0.3, 0.7, 300.0
  )
  torch_value.backward()
  with float64():
    loss = lambda s: losses.characteristic_function_matching(
      jnp.asarray(real), s, jnp.asarray(frequencies), 0.3, 0.7, 300.0
    )
    value, gradient = jax.value_and_grad(loss)(jnp.asarray(syn))
  np.testing.assert_allclose(float(torch_value.detach()), float(value), rtol=1e-12)
  np.testing.assert_allclose(torch_syn.grad.numpy(), gradient, rtol=1e-10, atol=1e-14)
  # FAMILY.md's test vectors: a plain case, and identical sets (the 1e-12 phase clamp bites).
  as64 = lambda x: torch.tensor(x, dtype=torch.float64)
  eye = as64([[1.0, 0], [0, 1]])
  vector = torch_baseline.characteristic_function_matching(eye, as64([[1.0, 0]]), eye)
  np.testing.assert_allclose(float(vector), 101.70151, rtol=1e-6)
  same = torch_baseline.characteristic_function_matching(eye, eye, eye, scale=1.0)
  np.testing.assert_allclose(float(same), np.sqrt(0.5e-12), rtol=1e-6)


@pytest.mark.parametrize('with_prototype', [True, False])
def test_dsdm_loss_and_its_gradient_match_dd_jax_in_float64(with_prototype):
  rng = np.random.default_rng(6)
  real, syn, prototype = rng.normal(size=(7, 5)), rng.normal(size=(4, 5)), rng.normal(size=5)
  torch_syn = torch.from_numpy(syn).requires_grad_(True)
  torch_prototype = torch.from_numpy(prototype) if with_prototype else None
  torch_value = torch_baseline.dsdm_matching(
    torch.from_numpy(real), torch_syn, torch_prototype, 50.0, 0.2
  )
  torch_value.backward()
  with float64():
    jax_prototype = jnp.asarray(prototype) if with_prototype else None
    loss = lambda s: losses.dsdm_matching(jnp.asarray(real), s, jax_prototype, 50.0, 0.2)
    value, gradient = jax.value_and_grad(loss)(jnp.asarray(syn))
  np.testing.assert_allclose(float(torch_value.detach()), float(value), rtol=1e-12)
  np.testing.assert_allclose(torch_syn.grad.numpy(), gradient, rtol=1e-10, atol=1e-14)
  # FAMILY.md's test vector: mean 0.4722222 + covariance 4.8611111 + prototype 0.025.
  as64 = lambda x: torch.tensor(x, dtype=torch.float64)
  vector = torch_baseline.dsdm_matching(
    as64([[1.0, 0], [0, 1], [1, 1]]), as64([[1.0, 0], [0, 0]]), as64([0.5, 0.5])
  )
  np.testing.assert_allclose(float(vector), 5.3583333, rtol=1e-6)


def test_ncfm_and_dsdm_steps_update_the_images():
  generator = torch.Generator().manual_seed(0)
  real_by_class = [torch.rand(8, 3, SIDE, SIDE) for _ in range(CLASSES)]
  pool = torch_baseline.dance_pool(3, CLASSES, SIDE, members=2)
  # ipc 1, factor 2: 4 decoded images per class, enough for DSDM's unbiased covariance.
  images = torch.rand(CLASSES, 3, SIDE, SIDE, requires_grad=True)
  optimizer = torch.optim.AdamW([images], lr=1e-3, weight_decay=5e-4)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
  for _ in range(3):
    before = images.detach().clone()
    loss = torch_baseline.ncfm_step(
      images, optimizer, real_by_class, 4, pool, generator, num_frequencies=16, scheduler=scheduler
    )
    assert np.isfinite(loss) and not torch.equal(images.detach(), before)
  assert optimizer.state[images]['step'] == 3 * 2 * CLASSES  # match and calibration steps
  optimizer = torch.optim.SGD([images], lr=0.1, momentum=0.5)
  prototypes = torch_baseline.Prototypes()
  for updates in (1, 2):
    before = images.detach().clone()
    loss = torch_baseline.dsdm_step(
      images, optimizer, real_by_class, 4, pool, prototypes, generator
    )
    assert np.isfinite(loss) and not torch.equal(images.detach(), before)
    assert prototypes.updates == updates
    assert prototypes.values.shape == (CLASSES, 128 * (SIDE // 8) ** 2)  # the pool's width 128
    assert torch.isfinite(prototypes.values).all() and prototypes.values.abs().sum() > 0

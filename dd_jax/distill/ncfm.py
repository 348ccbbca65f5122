"""NCFM (Wang et al., CVPR 2025): characteristic-function matching on interpolated pretrained
networks, optionally against a sampling network trained by ascent, on the IDC family's step
(`distill.family`).

Per iteration (official code, `Condenser.py` and `compute_loss.py`): a pool member interpolated
towards its initialisation (as DANCE, all 20 members drawn from), the stored images clipped; per
class, the CF loss (`losses.characteristic_function_matching`: unit-normalised features, 4096
Gaussian frequencies drawn fresh every class step, amplitude and phase weights 0.5, scale 300)
between the class's real images and its decoded synthetic images under one IDC DiffAug draw, one
image step; then DANCE's calibration pass. The images' optimizer is AdamW (lr 0.01 x 0.1, weight
decay 5e-4) whose lr halves when the iteration's mean class loss has not improved for 500
iterations (ReduceLROnPlateau, `family.plateau_*`).

The code's facts, as options (config section `ncfm`, `family`):
- the real side of every class is its first 1024 training images at every iteration
  (`family.fixed_real`, on in the presets), not a random draw;
- with the sampling network (`ncfm.sampling_net`, off in every shipped config) the frequencies
  are its output: the code draws 4 rows of noise and tiles the 4 outputs 16 times, so 4
  frequencies count (the loss averages over rows; dd_jax computes the 4 rows once); the paper
  speaks of 1024 (`ncfm.sampling_rows=1024`). The network ascends the same loss (SGD lr 1e-3,
  momentum 0.5) after every class step, its gradient taken at the images before their step;
- with the sampling network, the code attaches a second plateau schedule to the image optimizer
  by mistake, so the image lr drops by 0.5 * 0.5 at once (`ncfm.double_plateau`, off: the
  intended single schedule); the network's own lr never decays in either case;
- the code decodes the synthetic images in a background thread, up to one iteration stale; dd_jax
  always uses the current images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dd_jax import keys as keys_lib
from dd_jax import losses
from dd_jax.distill import base, class_steps, family
from dd_jax.settings import NON_NEGATIVE, POSITIVE, field

# NCFMSettings' fields read from config.ncfm.
NCFM_FIELDS = (
  'num_frequencies',
  'amplitude_weight',
  'phase_weight',
  'scale',
  'sampling_net',
  'sampling_rows',
  'sampling_lr',
  'sampling_momentum',
  'sampling_variance',
  'double_plateau',
)
# The sampling network's batch-norm epsilon and LeakyReLU slope (PyTorch's defaults / SampleNet).
_BN_EPSILON = 1e-5
_LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class NCFMSettings(family.FamilySettings):
  """The family's settings plus NCFM's (config section `ncfm`).

  Attributes:
    num_frequencies: Gaussian frequencies per class step without the sampling network.
    amplitude_weight: alpha, the amplitude term's weight.
    phase_weight: beta, the phase term's weight.
    scale: the loss's scale (the code's 300).
    sampling_net: frequencies from the sampling network, trained by ascent (min-max).
    sampling_rows: distinct frequencies the network proposes (the code: 4; the paper: 1024).
    sampling_lr: its SGD learning rate.
    sampling_momentum: its SGD momentum.
    sampling_variance: the variance of its input noise.
    double_plateau: the code's second image-lr schedule with the sampling network.
  """

  num_frequencies: int = field(4096, check=POSITIVE)
  amplitude_weight: float = field(0.5, check=NON_NEGATIVE)
  phase_weight: float = field(0.5, check=NON_NEGATIVE)
  scale: float = field(losses.CF_SCALE, check=POSITIVE)
  sampling_net: bool = False
  sampling_rows: int = field(4, check=POSITIVE)
  sampling_lr: float = field(1e-3, check=POSITIVE)
  sampling_momentum: float = field(0.5, check=NON_NEGATIVE)
  sampling_variance: float = field(1.0, check=POSITIVE)
  double_plateau: bool = False

  section = 'ncfm'
  section_fields = NCFM_FIELDS

  def plateau_schedule(self):
    if self.sampling_net and self.double_plateau and self.plateau_factor:
      # Two schedules on one loss drop together: the code's lr falls by factor^2 at once.
      factor = self.plateau_factor * self.plateau_factor
      return class_steps.plateau_schedule(factor, self.plateau_patience)
    return super().plateau_schedule()


def sampling_net_init(key: jax.Array, dim: int) -> dict[str, jax.Array]:
  """The sampling network's parameters: three Linear(dim, dim) layers with PyTorch's default
  initialisation (weights and biases U(-1/sqrt(dim), 1/sqrt(dim))) and batch-norm scales 1,
  offsets 0."""
  bound = 1.0 / jnp.sqrt(dim)
  params = {}
  for layer, layer_key in enumerate(jax.random.split(key, 3)):
    weight_key, bias_key = jax.random.split(layer_key)
    params[f'weight{layer}'] = jax.random.uniform(
      weight_key, (dim, dim), minval=-bound, maxval=bound
    )
    params[f'bias{layer}'] = jax.random.uniform(bias_key, (dim,), minval=-bound, maxval=bound)
    params[f'scale{layer}'] = jnp.ones((dim,))
    params[f'offset{layer}'] = jnp.zeros((dim,))
  return params


def sampling_net_apply(
  params: dict[str, jax.Array], key: jax.Array, rows: int, variance: float = 1.0
) -> jax.Array:
  """Frequencies [rows, dim] from noise N(0, variance) drawn from `key`: three blocks of
  Linear, batch norm with the rows' statistics (the code's network stays in training mode) and
  LeakyReLU(0.2), the last with tanh, so every entry lies in (-1, 1)."""
  dim = params['weight0'].shape[0]
  x = jnp.sqrt(variance) * jax.random.normal(key, (rows, dim))
  for layer in range(3):
    x = x @ params[f'weight{layer}'] + params[f'bias{layer}']
    mean = jnp.mean(x, axis=0)
    variance_rows = jnp.mean(jnp.square(x - mean), axis=0)
    x = (x - mean) / jnp.sqrt(variance_rows + _BN_EPSILON)
    x = x * params[f'scale{layer}'] + params[f'offset{layer}']
    x = jnp.tanh(x) if layer == 2 else jax.nn.leaky_relu(x, _LEAKY_SLOPE)
  return x


class CFMatcher(family.Matcher):
  """NCFM's CF loss with Gaussian frequencies per class step, or the sampling network's
  (state: its parameters and SGD state, ascending the loss after every class step)."""

  def __init__(self, settings: NCFMSettings):
    super().__init__()
    self.settings = settings
    self.ascends = settings.sampling_net
    self.ascent = optax.sgd(settings.sampling_lr, momentum=settings.sampling_momentum)

  def init_state(self, feature_dim, num_classes, key):
    del num_classes
    if not self.ascends:
      return ()
    params = sampling_net_init(key, feature_dim)
    return params, self.ascent.init(params)

  def frequencies(self, dim: int, context: family.ClassContext, params: Any) -> jax.Array:
    """The class step's frequencies [M, dim]."""
    if params is None:
      return keys_lib.normal(context.key, (self.settings.num_frequencies, dim))
    rows, variance = self.settings.sampling_rows, self.settings.sampling_variance
    return sampling_net_apply(params, context.key, rows, variance)

  def loss(self, real_features, syn_features, context, params):
    frequencies = self.frequencies(real_features.shape[-1], context, params)
    return losses.characteristic_function_matching(
      real_features,
      syn_features,
      frequencies,
      self.settings.amplitude_weight,
      self.settings.phase_weight,
      self.settings.scale,
    )

  def params(self, state):
    return state[0] if self.ascends else None

  def ascend(self, state, grads):
    if not self.ascends:
      return state
    params, opt_state = state
    ascent = jax.tree_util.tree_map(jnp.negative, grads)
    updates, opt_state = self.ascent.update(ascent, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class NCFM(family.PooledFamilyMethod):
  """NCFM: characteristic-function matching on interpolated pretrained networks, with
  calibration, AdamW and a plateau schedule; the sampling network's min-max as an option."""

  name = 'ncfm'
  presets = base.Presets(
    image_lr=1e-3,  # AdamW: the code's lr_img 0.01 x lr_scale_adam 0.1
    iid=family.DM_IID_SETTINGS,
    config={
      **family.IDC_STEP,
      'distill.optimizer': 'adamw',
      'distill.weight_decay': 5e-4,
      'distill.batch_real': 1024,
      'family.network_every': 1,
      'family.calibration_passes': 1,
      'family.pool_members': 20,
      'family.fixed_real': True,
      'family.plateau_factor': 0.5,
      'family.plateau_patience': 500,
      **family.POOL_RECIPE,
      'pool.size': 20,
      'pool.epochs': 60,
    },
    protocol='ncfm',
  )

  def settings(self, config):
    self.check_pool(config)
    return NCFMSettings.from_config(config)

  def matcher(self, settings):
    return CFMatcher(settings)

  def paper_preset(self, config, dataset, ipc, with_iid):
    """The official configs (config/ipc{1,10,50}/cifar{10,100}.yaml): 20,000 iterations, real
    batch 1024 (all 500 images of a class on CIFAR-100 and TinyImageNet), a pool of 20 ConvNets
    x 60 epochs pretrained with batch 128; CIFAR-100 IPC 10 takes SGD (lr 0.01, momentum 0.5)
    instead of AdamW. TinyImageNet: as CIFAR (unconfirmed beyond the network's depth)."""
    del with_iid
    config.distill.iterations = 20_000
    config.pool.batch_size = 128
    if dataset in ('cifar100', 'tinyimagenet'):  # 500 per class: the code takes them all
      config.distill.batch_real = 500
    if dataset == 'cifar100' and ipc == 10:
      config.distill.optimizer = 'sgd'
      config.distill.lr = 0.01
      config.distill.momentum = 0.5
      config.distill.weight_decay = 0.0

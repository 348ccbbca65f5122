"""DSDM (Li et al., ACM MM 2024): mean and full feature-covariance matching with a historical
class prototype, on pretrained networks (final weights only), on the IDC family's step
(`distill.family`).

Per iteration (official code, `DSDM.py`): one of the 10 pool members (its final weights), the
stored images clipped; per class, `losses.dsdm_matching` between the class's random real batch
(256) and its decoded synthetic images under one IDC DiffAug draw, one SGD step (lr 0.01 x ipc,
momentum 0.5). After the class steps, every class's prototype h_c moves towards the mean feature
of its decoded images under a fresh DiffAug draw and the same network, without gradient:
h_c = m_c at the first iteration, then 0.01 m_c + 0.99 h_c. The prototype term acts from
iteration `prototype_start` + 1 on (the code's `t > smooth_iter`). The moving average mixes
features of different pool members, as the code's does.

The pool (`pool.*`): 10 ConvNets x 20 epochs, SGD 0.01 / 0.9 / 5e-4 without a schedule, batch
256, IDC's DiffAug and CutMix 0.5 (`paper_preset`); the reduced budgets give every pooled method
the family's shared recipe (`family.POOL_RECIPE`). The code evaluates on the test set every 100
iterations and keeps the best set: dd_jax evaluates the last unless `eval.select_checkpoint`
says otherwise.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dd_jax import losses
from dd_jax import settings as settings_lib
from dd_jax.distill import base, family
from dd_jax.settings import NON_NEGATIVE, field

# DSDMSettings' fields read from config.dsdm.
DSDM_FIELDS = ('covariance_weight', 'prototype_weight', 'prototype_momentum', 'prototype_start')


@dataclasses.dataclass(frozen=True)
class DSDMSettings(family.FamilySettings):
  """The family's settings plus DSDM's (config section `dsdm`).

  Attributes:
    covariance_weight: the covariance term's weight (`cov_weight`).
    prototype_weight: the prototype term's weight (`h_p_weight`).
    prototype_momentum: the prototypes' moving-average momentum (`smooth_factor`).
    prototype_start: the prototype term acts at iterations > this (`smooth_iter`).
  """

  covariance_weight: float = field(50.0, check=NON_NEGATIVE)
  prototype_weight: float = field(0.2, check=NON_NEGATIVE)
  prototype_momentum: float = field(0.99, check=NON_NEGATIVE)
  prototype_start: int = field(2000, check=NON_NEGATIVE)

  def check(self) -> None:
    super().check()
    if self.prototype_momentum > 1:
      raise settings_lib.SettingError('prototype_momentum', self.prototype_momentum, 'must be <= 1')
    if self.decoded_per_class() < 2:
      raise settings_lib.SettingError(
        'factor',
        self.factor,
        f"leaves DSDM's covariance {self.decoded_per_class()} synthetic image per class (ipc "
        f"{self.ipc}); it needs 2: use factor 2 (DSDM's) or ipc >= 2",
      )

  section = 'dsdm'
  section_fields = DSDM_FIELDS


class PrototypeMatcher(family.Matcher):
  """DSDM's loss with the class prototypes as its state ([K, D], moved after the class steps)."""

  def __init__(self, settings: DSDMSettings):
    super().__init__()
    self.settings = settings

  def init_state(self, feature_dim, num_classes, key):
    del key
    return jnp.zeros((num_classes, feature_dim), jnp.float32)

  def loss(self, real_features, syn_features, context, params):
    del params
    settings = self.settings
    active = context.step > settings.prototype_start
    return losses.dsdm_matching(
      real_features,
      syn_features,
      context.state[context.class_id],
      settings.covariance_weight,
      jnp.where(active, settings.prototype_weight, 0.0),
    )

  def after_classes(self, state, step, class_features, key):
    means = jnp.mean(class_features(key), axis=1)
    momentum = self.settings.prototype_momentum
    return jnp.where(step == 0, means, (1.0 - momentum) * means + momentum * state)


class DSDM(family.PooledFamilyMethod):
  """DSDM: mean and covariance matching with historical class prototypes on the final weights
  of pretrained networks, with IDC multi-formation and per-class image steps."""

  name = 'dsdm'
  presets = base.Presets(
    image_lr=0.1,  # 0.01 * ipc at IPC 10 (configs/paper.py sets it per IPC)
    iid=family.DM_IID_SETTINGS,
    config={
      **family.IDC_STEP,
      'distill.momentum': 0.5,
      'distill.batch_real': 256,
      'family.network_every': 1,
      'family.calibration_passes': 0,
      'family.pool_members': 10,
      **family.POOL_RECIPE,
      'pool.size': 10,
      'pool.epochs': 20,
    },
    protocol='dsdm',
  )

  def settings(self, config):
    self.check_pool(config)
    return DSDMSettings.from_config(config)

  def matcher(self, settings):
    return PrototypeMatcher(settings)

  def network_source(self, net, pool, settings):
    return family.final_pool(net, pool, settings.pool_members)

  def paper_preset(self, config, dataset, ipc, with_iid):
    """The official reproduce settings (CIFAR, every IPC): 10,000 iterations, image lr
    0.01 * ipc; a pool of 10 ConvNets x 20 epochs, SGD without a schedule, batch 256."""
    del dataset, with_iid
    config.distill.iterations = 10_000
    config.distill.lr = 0.01 * ipc
    config.pool.batch_size = 256
    config.pool.schedule = 'constant'
    config.pool.milestones = ()
    config.pool.gamma = 0.1

"""DANCE (Zhang et al., IJCAI 2024): mean matching on a pretrained network interpolated towards
its initialisation, plus a class-calibration pass on the final ("expert") network, on the IDC
family's step (`distill.family`).

Per iteration (official code, `DANCE.py`): one member k of the first `num_premodel` = 5 pool
members (`family.pool_members`) and one lambda ~ U(0, 1); the matching network is
lambda * initial_k + (1 - lambda) * final_k (every parameter), the expert final_k. Match pass:
per class, DM's mean matching of real and decoded synthetic features under one IDC DiffAug draw,
one SGD step (lr 0.01 * ipc, momentum 0.5). Calibration pass: per class, the expert's
cross-entropy on a fresh DiffAug draw of the class's decoded images, one SGD step.

The pool is config.pool (members trained on the full training set; their initial weights are
recomputed from the pool's seed, bitwise, rather than stored). The presets set the official pool
recipe: 20 ConvNets, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 64, 60 epochs with the lr x 0.2 at
epochs 40 and 50, IDC's DiffAug (colour, crop; per image) and CutMix with probability 0.5;
`budget=cpu` shrinks it (dd_jax.config.set_cpu_budget).
"""

from __future__ import annotations

import jax

from dd_jax import extractors as extractors_lib
from dd_jax import keys as keys_lib
from dd_jax import losses, models
from dd_jax import pool as pool_lib
from dd_jax.distill import base, family


def interpolated_pool(net: models.Network, pool: pool_lib.Pool, members: int):
  """The `family.NetworkSource` of DANCE and its parameters: per iteration, member
  k ~ U{0..members-1} and lambda ~ U(0, 1) from the step's 'pool_member' stream.

  Returns:
    (source, params): params = (initial, final) variables of the first `members` members,
    stacked and on the device, for the jitted step.
  """
  if pool.settings is None:
    raise ValueError('DANCE needs the settings of its pool to recompute its initial weights.')
  final = jax.tree_util.tree_map(lambda x: x[:members], pool.variables)
  image_shape = tuple(pool.metadata['image_shape'])
  initial = pool_lib.initial_variables(pool.settings, pool.net, image_shape, 0, members)
  params = jax.device_put((initial, final))

  def source(key_data, step, params):
    initial, final = params
    key = keys_lib.stream(keys_lib.step_key(key_data, step), 'pool_member')
    member_key, lam_key = jax.random.split(key)
    member = jax.random.randint(member_key, (), 0, members)
    lam = jax.random.uniform(lam_key)
    take = lambda tree: jax.tree_util.tree_map(lambda x: x[member], tree)
    expert = take(final)
    return family.Networks(matching=pool_lib.interpolate(take(initial), expert, lam), expert=expert)

  return source, params


class DANCE(family.FamilyMethod):
  """DANCE: mean matching on interpolated pretrained networks, and a calibration pass with the
  expert's cross-entropy, with IDC multi-formation and per-class image steps."""

  name = 'dance'
  uses_pool = True
  presets = base.Presets(
    image_lr=0.1,  # 0.01 * ipc at IPC 10 (configs/paper.py sets it per IPC)
    iid=family.DM_IID_SETTINGS,
    config={
      'distill.init': 'mix',
      'distill.momentum': 0.5,
      'distill.batch_real': 128,
      'augment.strategy': 'color_crop_cutout',
      'family.factor': 2,
      'family.network_every': 1,
      'family.calibration_passes': 1,
      'family.pool_members': 5,
      'pool.model': 'ConvNet',
      'pool.size': 20,
      'pool.epochs': 60,
      'pool.batch_size': 64,
      'pool.schedule': 'multistep',
      'pool.milestones': (2 / 3, 5 / 6),
      'pool.gamma': 0.2,
      'pool.augment_strategy': 'color_crop',
      'pool.augment_mode': 'idc',
      'pool.cutmix_probability': 0.5,
    },
  )

  def check_pool(self, config) -> None:
    """DANCE matches with the pool's own networks: their architecture is the matching one."""
    if config.pool.model != config.model.name:
      raise ValueError(
        f'method=dance matches with the pool members (config.pool.model={config.pool.model!r}), '
        f'but config.model.name={config.model.name!r}; set both to the same network.'
      )
    if config.family.pool_members > config.pool.size:
      raise ValueError(
        f'config.family.pool_members={config.family.pool_members} exceeds config.pool.size='
        f'{config.pool.size}; draw from at most the pool.'
      )

  def paper_preset(self, config, dataset, ipc, with_iid):
    """The official reproduce settings (CIFAR-10/100, every IPC): 10,000 iterations, image lr
    0.01 * ipc; pool of 20 ConvNets x 60 epochs, 5 of them drawn from."""
    del dataset, with_iid
    config.distill.iterations = 10_000
    config.distill.lr = 0.01 * ipc

  def settings(self, config):
    self.check_pool(config)
    return super().settings(config)

  def make_step(
    self,
    net,
    settings,
    spec,
    lowering,
    extractor=extractors_lib.matching_net_extractor,
    mesh=None,
    pool=None,
  ):
    del mesh  # one device
    if pool is None:
      raise ValueError('DANCE needs the pretrained pool: make_step(..., pool=<pool_lib.Pool>).')
    source, params = interpolated_pool(net, pool, settings.pool_members)
    return family.make_family_step(
      net,
      settings,
      spec,
      lowering,
      source,
      extractor,
      match=losses.mean_matching,
      network_params=params,
    )

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

from dd_jax.distill import base, family


class DANCE(family.PooledFamilyMethod):
  """DANCE: mean matching on interpolated pretrained networks, and a calibration pass with the
  expert's cross-entropy, with IDC multi-formation and per-class image steps."""

  name = 'dance'
  presets = base.Presets(
    image_lr=0.1,  # 0.01 * ipc at IPC 10 (configs/paper.py sets it per IPC)
    iid=family.DM_IID_SETTINGS,
    config={
      **family.IDC_STEP,
      'distill.momentum': 0.5,
      'distill.batch_real': 128,
      'family.network_every': 1,
      'family.calibration_passes': 1,
      'family.pool_members': 5,
      **family.POOL_RECIPE,
      'pool.size': 20,
      'pool.epochs': 60,
    },
    protocol='dance',
  )

  def paper_preset(self, config, dataset, ipc, with_iid):
    """The official reproduce settings (CIFAR-10/100, every IPC): 10,000 iterations, image lr
    0.01 * ipc; pool of 20 ConvNets x 60 epochs, 5 of them drawn from."""
    del dataset, with_iid
    config.distill.iterations = 10_000
    config.distill.lr = 0.01 * ipc

"""Spreading the DM step over devices: a (nets, classes) mesh for plain `jax.jit` (GSPMD).

The DM objective is a sum over classes (and a mean over random networks) of independent terms,
so the class axis of the real batch [K, B, H, W, C], of the synthetic images [K * ipc, ...] and
of everything computed from them is split across devices; the compiled program all-reduces the
scalar loss and nothing else. Network parameters are built from the step key on every device
(cheap, and identical), the dataset is replicated.

    mesh = class_mesh(num_nets=settings.num_nets)       # all local (or global) devices
    state = place_state(state, mesh)                     # images / optimizer state split by class
    step = dm.make_dm_step(net, settings, optimizer, extractor, mesh=mesh)

Uneven splits (10 classes on 4 devices) are allowed: XLA pads the last shard.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

NETS = 'nets'
CLASSES = 'classes'


def class_mesh(num_devices: int | None = None, num_nets: int = 1) -> Mesh:
  """A 2-D device mesh (nets, classes) over the first `num_devices` devices (default: all).

  The nets axis gets gcd(num_nets, devices) devices (so random networks split evenly), the class
  axis the rest.

  Args:
    num_devices: how many of `jax.devices()` to use; None: all of them.
    num_nets: random networks per step (DMSettings.num_nets).

  Returns:
    The mesh, axis names ('nets', 'classes').
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f'num_devices={num_devices}: choose 1..{len(devices)} (the devices '
                       'jax sees).')
    devices = devices[:num_devices]
  nets = math.gcd(num_nets, len(devices))
  return Mesh(np.asarray(devices).reshape(nets, len(devices) // nets), (NETS, CLASSES))


def by_class(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the class devices (replicated over the nets devices)."""
  return NamedSharding(mesh, PartitionSpec(CLASSES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def constrain_by_class(x: Any, mesh: Mesh | None) -> Any:
  """`with_sharding_constraint` of every leaf's leading axis to the class devices (no-op
  without a mesh)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, by_class(mesh))


def place_state(state: Any, mesh: Mesh) -> Any:
  """Puts a DistillState on `mesh`: images, labels and same-shaped optimizer leaves split by
  class, everything else (step, key, scalar optimizer state) replicated."""
  rows = state.images.shape[0]
  sharding = lambda x: (by_class(mesh) if np.ndim(x) and np.shape(x)[0] == rows else
                        replicated(mesh))
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding(x)), state)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree to every device of `mesh` (no copy if it is there already)."""
  return jax.device_put(tree, replicated(mesh))

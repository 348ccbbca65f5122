"""Spreading the DM step over devices: a (nets, classes) mesh for plain `jax.jit` (GSPMD).

The DM objective is a sum over classes (and a mean over random networks) of independent terms,
so the class axis of the real batch [K, B, H, W, C], of the synthetic images [K * ipc, ...] and
of everything computed from them is split across devices; the compiled program all-reduces the
scalar loss and nothing else. Network parameters are built from the step key on every device
(cheap, and identical), the dataset is replicated.

    mesh = class_mesh(num_nets=settings.num_nets)       # all local (or global) devices
    state = place_state(state, mesh)                     # images / optimizer state split by class
    step = dm.make_dm_step(net, settings, spec, lowering, extractor, mesh=mesh)

Uneven splits (10 classes on 4 devices) are allowed: XLA pads the last shard.

Several hosts: call `initialize_distributed()` first in every process (`python -m dd_jax.main
--distributed`); `jax.devices()` then lists every host's devices, the mesh spans them all, each
process holds the whole dataset and the compiled program reduces across hosts. Every process
computes the same arrays from the same keys (device d samples the real images of its classes),
so the result equals the one-device run to float tolerance.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
      raise ValueError(
        f'num_devices={num_devices}: choose 1..{len(devices)} (the devices jax sees).'
      )
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


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  # Through the host: a process can only hand its own data to a mesh spanning other processes.
  return jax.device_put(np.asarray(jax.device_get(x)), sharding)


def place_state(state: Any, mesh: Mesh) -> Any:
  """Puts a DistillState on `mesh`: images, labels and same-shaped optimizer leaves split by
  class, everything else (step, key, scalar optimizer state) replicated. Every process must pass
  the same values."""
  rows = state.images.shape[0]
  sharding = lambda x: by_class(mesh) if np.ndim(x) and np.shape(x)[0] == rows else replicated(mesh)
  return jax.tree_util.tree_map(lambda x: _put(x, sharding(x)), state)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree to every device of `mesh` (leaves already there are kept as they are)."""
  return jax.tree_util.tree_map(lambda x: _put(x, replicated(mesh)), tree)


class Replicas:
  """Copies of host values on every device of a mesh, made once per source object.

  A step's host-side arguments (the dataset's sampler, fixed extractor parameters) are the same
  objects step after step: `of(source, value)` copies `value` to the mesh the first time it sees
  `source` (by identity) and returns that copy until another source comes.
  """

  def __init__(self, mesh: Mesh):
    self._mesh = mesh
    self._source = None
    self._value = None

  def of(self, source: Any, value: Any) -> Any:
    if self._source is not source:
      self._source, self._value = source, replicate(value, self._mesh)
    return self._value


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array as numpy in every process (gathered from other hosts if it spans them)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """`jax.distributed.initialize` for a multi-process run; call before any other jax use.

  On TPU pods, SLURM and Open MPI clusters the arguments are detected; elsewhere give all three
  (the coordinator is process 0's `host:port`). CPU processes use gloo collectives.

  Args:
    coordinator_address: 'host:port' of process 0, or None to detect.
    num_processes: number of processes, or None to detect.
    process_id: this process's index, or None to detect.
  """
  try:  # CPU collectives across processes (no effect on GPU / TPU computations)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # a jax without the option
    pass
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )

"""Named PRNG streams: every random draw of a run comes from a key derived by name.

A run's keys come from `config.seed` (`run_key(seed, 'init')`, ...); a distillation step with
state step t uses `step_key(run_key(seed, 'distill'), t)` and draws each of its random choices
from `stream(step_key, <name>)`. Every name maps to a fixed number, so adding a stream never
changes what another stream draws, and code on the host (e.g. choosing which pool member goes to
the device) derives exactly the key the jitted step derives by calling the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Streams of a run, derived from the seed. Numbers are fixed forever: append, never renumber.
RUN_STREAMS = {
  'init': 0,  # the initial synthetic images (and the random-real baseline's subset)
  'distill': 1,  # the steps: step t uses fold_in(<this>, t)
  'evaluate': 2,  # evaluation networks, per evaluation point
  'queue': 3,  # IDM's initial model queue
  'validation': 4,  # the validation split (from config.dataset.validation_seed)
  'matcher': 5,  # the IDC family: the initial state of a method's matching term (NCFM's network)
}

# Streams of one distillation step, derived from its step key.
STEP_STREAMS = {
  'networks': 0,  # the random matching networks (DM)
  'real': 1,  # the real batch
  'augment': 2,  # the siamese DSA draws
  'centralization': 3,  # class centralization: e.g. which pool member
  'queue_push': 4,  # IDM: the fresh network pushed into the queue
  'queue_match': 5,  # IDM: which queue network is matched
  'queue_pick': 6,  # IDM: which queue networks are trained
  'queue_train': 7,  # IDM: their real batches
  'calibrate': 8,  # the IDC family's calibration passes: their augmentation draws
  'pool_member': 9,  # the IDC family: which pool member, and its interpolation weight
  'match': 10,  # the IDC family: the matching term's own draws (NCFM's frequencies), per class
  'after_classes': 11,  # the IDC family: draws after the class steps (DSDM's prototype pass)
}


def run_key(seed: int, name: str) -> jax.Array:
  """The typed key of run stream `name` (one of RUN_STREAMS) of a run with `seed`."""
  return jax.random.fold_in(jax.random.key(seed), RUN_STREAMS[name])


def step_key(key_data: jax.Array, step: jax.Array | int) -> jax.Array:
  """The key of the step taken from a state at `step`, from the run's raw 'distill' key data."""
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), step)


def stream(key: jax.Array, name: str) -> jax.Array:
  """The key of step stream `name` (one of STEP_STREAMS) of the step with key `key`."""
  return jax.random.fold_in(key, STEP_STREAMS[name])


def centralization_keys(key: jax.Array, num_nets: int) -> jax.Array:
  """The [num_nets] class-centralization keys of the step with key `key`, one per matching
  network. The step and the host-side member draw both call this."""
  return jax.random.split(stream(key, 'centralization'), num_nets)


def _threefry_bits(shape: tuple[int, ...]):
  """seed uint32[4] -> uint32 bits of `shape` from XLA's ThreeFry. Under `vmap` every seed
  draws its own bits (`lax.rng_bit_generator`'s own rule would draw all rows from the first)."""

  @jax.custom_batching.custom_vmap
  def bits(seed):
    algorithm = jax.lax.RandomAlgorithm.RNG_THREE_FRY
    return jax.lax.rng_bit_generator(seed, shape, jnp.uint32, algorithm=algorithm)[1]

  @bits.def_vmap
  def _(axis_size, in_batched, seed):
    del axis_size
    if not in_batched[0]:
      return bits(seed), False
    return jax.lax.map(bits, seed), True

  return bits


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 draws of `shape` from `key`, for large draws inside a step.

  The bits come from XLA's own ThreeFry generator (`lax.rng_bit_generator`) seeded by four
  words of `key`, not from `jax.random.bits`, whose ThreeFry is built from jnp operations and
  is several times slower on CPU; the bits become normals as `jax.random.normal` makes them
  (uniform in (-1, 1), then sqrt(2) erfinv). Deterministic for a key on one backend and XLA
  version (XLA does not promise the same bits across them), not `jax.random.normal`'s numbers.

  Args:
    key: a typed key.
    shape: the draws' shape.

  Returns:
    float32 [*shape].
  """
  bits = _threefry_bits(tuple(shape))(jax.random.bits(key, (4,), jnp.uint32))
  one = np.array(1.0, np.float32).view(np.uint32)
  unit = jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0  # [0, 1)
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  uniform = jnp.maximum(low, unit * (1.0 - low) + low)
  return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(uniform)

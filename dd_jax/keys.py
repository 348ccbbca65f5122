"""Named PRNG streams: every random draw of a run comes from a key derived by name.

A run's keys come from `config.seed` (`run_key(seed, 'init')`, ...); a distillation step with
state step t uses `step_key(run_key(seed, 'distill'), t)` and draws each of its random choices
from `stream(step_key, <name>)`. Every name maps to a fixed number, so adding a stream never
changes what another stream draws, and code on the host (e.g. choosing which pool member goes to
the device) derives exactly the key the jitted step derives by calling the same function.
"""

from __future__ import annotations

import jax

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

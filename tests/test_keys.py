"""Named PRNG streams (dd_jax.keys)."""

import jax
import numpy as np

from dd_jax import keys


def _data(key):
  return np.asarray(jax.random.key_data(key))


def test_streams_are_distinct_fixed_and_independent_of_each_other():
  assert len(set(keys.STEP_STREAMS.values())) == len(keys.STEP_STREAMS)
  assert len(set(keys.RUN_STREAMS.values())) == len(keys.RUN_STREAMS)
  step_key = keys.step_key(jax.random.key_data(keys.run_key(0, 'distill')), 7)
  drawn = {name: _data(keys.stream(step_key, name)) for name in keys.STEP_STREAMS}
  assert len({d.tobytes() for d in drawn.values()}) == len(drawn)
  # A stream is fold_in(step key, its fixed number): adding a stream changes no other draw.
  np.testing.assert_array_equal(drawn['real'], _data(jax.random.fold_in(step_key, 1)))
  # The run streams keep the derivation of runs recorded before the streams had names.
  np.testing.assert_array_equal(
    _data(keys.run_key(3, 'evaluate')), _data(jax.random.fold_in(jax.random.key(3), 2))
  )


def test_centralization_keys_split_the_centralization_stream():
  step_key = jax.random.key(5)
  cc = keys.centralization_keys(step_key, 3)
  assert cc.shape == (3,)
  np.testing.assert_array_equal(
    _data(cc), _data(jax.random.split(keys.stream(step_key, 'centralization'), 3))
  )

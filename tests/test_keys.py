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


def test_normal_is_standard_normal_deterministic_and_per_key_under_vmap():
  key = jax.random.key(3)
  draws = np.asarray(jax.jit(lambda k: keys.normal(k, (512, 256)))(key))
  assert draws.dtype == np.float32
  np.testing.assert_array_equal(draws, np.asarray(keys.normal(key, (512, 256))))
  # 131072 draws: the moments' standard errors are 0.003 (mean), 0.002 (variance), 0.02 (4th).
  assert abs(draws.mean()) < 0.015 and abs(draws.var() - 1) < 0.01
  assert abs(np.mean(draws**4) - 3) < 0.1
  other = np.asarray(keys.normal(jax.random.fold_in(key, 1), (512, 256)))
  assert abs(np.corrcoef(draws.ravel(), other.ravel())[0, 1]) < 0.015
  # Batched keys draw what each draws alone (XLA's generator's own vmap rule would not).
  split = jax.random.split(key, 6).reshape(2, 3)
  batched = jax.vmap(jax.vmap(lambda k: keys.normal(k, (4, 2))))(split)
  alone = [[keys.normal(k, (4, 2)) for k in row] for row in split]
  np.testing.assert_array_equal(np.asarray(batched), np.asarray(alone))

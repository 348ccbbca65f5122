"""Feature extractors of class centralization: whose features CC pulls towards the class mean.

    extractor = matching_net_extractor                 # the matching network's own features
    extractor = pool_extractor(pool)                   # a pretrained pool, one member per draw

An extractor is used by a distillation step in two places:
- on the host, before the step, `select(params, keys)` picks what the step needs from `params`
  with the step's class-centralization keys (`keys.centralization_keys`): a pool's drawn members,
  so only they go to the device;
- inside the jitted step, `features(selected_i, key_i, syn_images, matching_features)` gives the
  features CC acts on, for matching network i.

The reference (Deng et al., CVPR 2024) draws one member of a pool of 1000 ResNet18, pretrained on
the real training set, per iteration and applies CC to its pooled features.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dd_jax import keys as keys_lib
from dd_jax import pool as pool_lib


@dataclasses.dataclass(frozen=True)
class Extractor:
  """Gives the features class centralization acts on.

  Attributes:
    name: 'matching_net' or 'pool' (for messages and records).
    features: `(params, key, syn_images, matching_features) -> [N, D']`, called inside the jitted
      step with the parameters of this network's draw (see `select`), the network's CC key, the
      augmented synthetic images [N, H, W, C] and the matching network's features of them [N, D].
    params: a pytree (e.g. a pool's stacked variables, on the host) the step's parameters come
      from; handed to the jitted step as an argument, never baked in as a constant. None if
      unused.
    select: None, or `(params, keys) -> selected` run on the host before every step with the
      step's [n] CC keys (one per matching network): the step receives `selected`, whose leaves
      have a leading axis n, and `features` gets entry i with key i. Without `select`, every call
      of `features` gets `params` whole.
  """

  name: str
  features: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
  params: Any = None
  select: Callable[[Any, jax.Array], Any] | None = None

  def step_params(self, key_data: jax.Array, step: jax.Array | int, num_nets: int) -> Any:
    """What the step taken from state (`key_data`, `step`) receives: `params`, or the
    selection for its CC keys (derived exactly as the step derives them)."""
    if self.select is None:
      return self.params
    return self.select(self.params, _host_centralization_keys(key_data, step, num_nets))


@functools.partial(jax.jit, static_argnames='num_nets')
def _host_centralization_keys(key_data, step, num_nets):
  return keys_lib.centralization_keys(keys_lib.step_key(key_data, step), num_nets)


def _matching_features(params, key, syn_images, matching_features):
  del params, key, syn_images
  return matching_features


NAMES = ('matching_net', 'pool')

# CC on the random matching network's own features (no extra forward pass).
matching_net_extractor = Extractor(name='matching_net', features=_matching_features)


def pool_extractor(pool: pool_lib.Pool) -> Extractor:
  """The extractor drawing one pool member per matching network and step.

  Args:
    pool: a trained pool (variables on the host).

  Returns:
    An `Extractor(name='pool')` whose `select` draws member `randint(key, 0, size)` for each CC
    key on the host and hands only those members to the device, and whose `features` are the
    member's pooled features `embed(member, syn_images, train=True)[0]`, [N, D']. train=True
    follows the reference, which keeps the pool network in train mode (only batch-norm members
    differ).
  """
  net, size = pool.net, pool.size
  draw = jax.jit(jax.vmap(lambda key: jax.random.randint(key, (), 0, size)))

  def select(params, keys):
    indices = np.asarray(draw(keys))
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[indices], params)

  def features(member, key, syn_images, matching_features):
    del key, matching_features
    return net.embed(member, syn_images, train=True)[0]

  return Extractor(
    name='pool',
    features=features,
    select=select,
    params=jax.tree_util.tree_map(np.asarray, pool.variables),
  )

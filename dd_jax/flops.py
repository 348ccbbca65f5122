"""Counting the dense FLOPs of a jax program from its jaxpr (for throughput figures)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = np.prod([lhs.shape[d] for d in lhs_contract]) if lhs_contract else 1
  return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(contracted)


def _conv_flops(eqn) -> float:
  kernel = eqn.invars[1].aval
  spec = eqn.params['dimension_numbers']
  # Per output element: (input channels per group) x (window) multiply-adds.
  per_output = kernel.shape[spec.rhs_spec[1]] * np.prod(
    [kernel.shape[d] for d in spec.rhs_spec[2:]]
  )
  return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(per_output)


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else [value]:
      if hasattr(item, 'eqns') or hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        yield item


def dense_flops(jaxpr: Any) -> float:
  """FLOPs of the dot_general and conv_general_dilated operations of a jaxpr.

  Nested programs (jit, custom derivatives, remat) count once, a scan's body `length` times, a
  cond its most expensive branch; a while loop's body counts once (its trip count is unknown).
  Elementwise work is not counted: the figure is what a matmul unit has to do.

  Args:
    jaxpr: a Jaxpr or ClosedJaxpr, e.g. `jax.make_jaxpr(f)(*args)`.

  Returns:
    The FLOP count (a multiply-add is 2 FLOPs).
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'cond':
      total += max(dense_flops(branch) for branch in eqn.params['branches'])
    else:
      repeats = eqn.params.get('length', 1) if name == 'scan' else 1
      total += repeats * sum(dense_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def count(fn, *args, **kwargs) -> float:
  """`dense_flops` of `fn(*args, **kwargs)` (traced, not run)."""
  return dense_flops(jax.make_jaxpr(fn)(*args, **kwargs))

"""The registry of distillation methods, by name (`config.method`).

    method = methods.get('idm')
    methods.names()                      # ('dm', 'idm')

A new method subclasses `base.Method` in its own module and is added to `_REGISTRY` here; the run
loop, the comparison table and the config checks find it by name.
"""

from __future__ import annotations

from dd_jax.distill import base, dm, idm

_REGISTRY: dict[str, base.Method] = {method.name: method for method in (dm.DM(), idm.IDM())}


def names() -> tuple[str, ...]:
  """The registered method names."""
  return tuple(_REGISTRY)


def get(name: str) -> base.Method:
  """The method registered as `name`.

  Raises:
    ValueError: an unknown name, listing the registered ones.
  """
  if name not in _REGISTRY:
    raise ValueError(f'config.method={name!r} is not valid; choose one of {list(names())}.')
  return _REGISTRY[name]

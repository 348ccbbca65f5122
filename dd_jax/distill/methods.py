"""The registry of distillation methods, by name (`config.method`).

    method = methods.get('idm')
    methods.names()                      # ('dm', 'idm')
    methods.register(MyMethod())         # a method defined anywhere, e.g. in a user's module

A new method subclasses `base.Method` (with its `presets`) in its own module and is registered
here or by `register`; the run, the presets (`dd_jax.presets`), the config checks and the
comparison table find it by name.
"""

from __future__ import annotations

from dd_jax.distill import base, dance, dm, dsdm, idm, m3d, ncfm

_REGISTRY: dict[str, base.Method] = {}


def register(method: base.Method) -> base.Method:
  """Adds `method` under `method.name`; returns it.

  Raises:
    ValueError: the name is taken or not a lower-case identifier, or the method's presets are
      incomplete (each message names the method and the fix).
  """
  name = getattr(method, 'name', None)
  if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
    raise ValueError(f'A method needs a lower-case identifier as its name, got {name!r}.')
  if name in _REGISTRY:
    raise ValueError(f'A method named {name!r} is registered already; choose another name.')
  presets = getattr(method, 'presets', None)
  if not isinstance(presets, base.Presets):
    raise ValueError(
      f'Method {name!r} declares no presets: give its class a `presets = base.Presets(...)`.'
    )
  presets.check(name)
  _REGISTRY[name] = method
  return method


def unregister(name: str) -> None:
  """Removes the method registered as `name` (e.g. a test's throwaway method)."""
  _REGISTRY.pop(name, None)


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


register(dm.DM())
register(idm.IDM())
register(m3d.M3D())
register(dance.DANCE())
register(ncfm.NCFM())
register(dsdm.DSDM())

"""Settings dataclasses: range checks declared on the fields, built from a config section.

Every part of dd_jax that a config steers (evaluation, the pool, a distillation method) has a
frozen settings dataclass whose fields carry their checks:

    @dataclasses.dataclass(frozen=True)
    class EvalSettings(settings.Settings):
      epochs: int = settings.field(1000, check=settings.POSITIVE)
      model: str = settings.field('ConvNet', choices=models.network_names)

Constructing one checks every field (`__post_init__`) and raises `SettingError` naming the field.
`from_section` builds one from a config section and re-raises with the config path, so a user
reads `config.eval.lr=-1.0 must be > 0.` whether the value came from a preset, an override or a
grid line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

POSITIVE = 'positive'  # > 0
NON_NEGATIVE = 'non_negative'  # >= 0

_REQUIREMENTS = {
  POSITIVE: (lambda v: v > 0, 'must be > 0'),
  NON_NEGATIVE: (lambda v: v >= 0, 'must be >= 0'),
}

T = TypeVar('T', bound='Settings')


class SettingError(ValueError):
  """A settings field holds a value outside its range or choices.

  Attributes:
    field: the field's name in its settings class.
    value: the rejected value.
    requirement: what the value must satisfy, e.g. 'must be > 0'.
  """

  def __init__(self, field: str, value: Any, requirement: str):
    super().__init__(f'{field}={value!r} {requirement}.')
    self.field, self.value, self.requirement = field, value, requirement


def field(
  default: Any = dataclasses.MISSING,
  *,
  check: str | None = None,
  choices: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
  config_name: str | None = None,
) -> Any:
  """A dataclass field with a declared check.

  Args:
    default: the default value (omit for a required field).
    check: POSITIVE or NON_NEGATIVE, or None.
    choices: the allowed values, or a function returning them (evaluated when checked, e.g. a
      registry's names).
    config_name: the field's name in its config section when it differs from the field's name.
  """
  metadata = {'check': check, 'choices': choices, 'config_name': config_name}
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Base of settings dataclasses: checks every declared field when constructed.

  Subclasses may add cross-field checks in `check()`, raising `SettingError`.
  """

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      check, choices = f.metadata.get('check'), f.metadata.get('choices')
      if check is not None:
        accepts, requirement = _REQUIREMENTS[check]
        if not accepts(value):
          raise SettingError(f.name, value, requirement)
      if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
          raise SettingError(f.name, value, f'is not valid; choose one of {allowed}')
    self.check()

  def check(self) -> None:
    """Cross-field checks; raise `SettingError` naming the field to change."""


def config_name(cls: type, field_name: str) -> str:
  """The name of `cls`'s field `field_name` in its config section."""
  for f in dataclasses.fields(cls):
    if f.name == field_name:
      return f.metadata.get('config_name') or f.name
  return field_name


def from_section(
  cls: type[T],
  section: Any,
  path: str,
  prefix: str = '',
  value_paths: dict[str, str] | None = None,
  **values: Any,
) -> T:
  """Builds `cls` from a config section; every check's message names `config.<path>.<field>`.

  Args:
    cls: a `Settings` subclass.
    section: the config section (an `ml_collections.ConfigDict` or a mapping); field `f` of
      `cls` is read from `section[config_name]` (see `field`), unless given in `values`.
      Fields absent from the section keep their defaults.
    path: the section's dotted path under `config`, e.g. 'eval' or 'idm'.
    prefix: prepended to every config name (e.g. 'train_' reads `idm.train_lr` into `lr`).
    value_paths: the config paths of fields given in `values` that come from elsewhere in the
      config (e.g. {'ipc': 'ipc'}), for messages.
    **values: fields given directly (e.g. built from another section, or nested settings).

  Returns:
    The settings.

  Raises:
    ValueError: a value outside its range or choices, naming `config.<path>.<field>`.
  """
  kwargs = dict(values)
  for f in dataclasses.fields(cls):
    name = prefix + (f.metadata.get('config_name') or f.name)
    if f.name not in kwargs and name in section:
      kwargs[f.name] = section[name]
  try:
    return cls(**kwargs)
  except SettingError as error:
    if value_paths and error.field in value_paths:
      raise ValueError(
        f'config.{value_paths[error.field]}={error.value!r} {error.requirement}.'
      ) from None
    if error.field in values:  # given directly: its own message is the most precise
      raise
    name = prefix + config_name(cls, error.field)
    raise ValueError(f'config.{path}.{name}={error.value!r} {error.requirement}.') from None

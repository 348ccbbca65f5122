"""Settings dataclasses: declared checks, and messages that name the config field."""

import dataclasses

import ml_collections
import pytest

from dd_jax import settings
from dd_jax.settings import NON_NEGATIVE, POSITIVE, field


@dataclasses.dataclass(frozen=True)
class _Inner(settings.Settings):
  lr: float = field(0.1, check=POSITIVE)


@dataclasses.dataclass(frozen=True)
class _Outer(settings.Settings):
  steps: int = field(10, check=POSITIVE)
  decay: float = field(0.0, check=NON_NEGATIVE)
  kind: str = field('a', choices=('a', 'b'))
  batch: int = field(4, check=POSITIVE, config_name='batch_size')
  inner: _Inner = _Inner()
  limit: int = field(100, check=POSITIVE)

  def check(self):
    if self.steps > self.limit:
      raise settings.SettingError('steps', self.steps, f'exceeds limit={self.limit}')


def test_construction_checks_every_declared_field():
  assert _Outer().steps == 10
  for kwargs, message in (
    ({'steps': 0}, r'steps=0 must be > 0\.'),
    ({'decay': -1.0}, r'decay=-1.0 must be >= 0\.'),
    ({'kind': 'c'}, r"kind='c' is not valid; choose one of \['a', 'b'\]"),
    ({'steps': 200}, r'steps=200 exceeds limit=100'),
  ):
    with pytest.raises(settings.SettingError, match=message):
      _Outer(**kwargs)


def test_from_section_reads_config_names_and_names_the_config_field():
  section = ml_collections.ConfigDict(
    {'steps': 3, 'batch_size': 8, 'train_lr': 0.5, 'unrelated': 1}
  )
  inner = settings.from_section(_Inner, section, 'sec', prefix='train_')
  built = settings.from_section(_Outer, section, 'sec', inner=inner)
  assert (built.steps, built.batch, built.inner.lr, built.limit) == (3, 8, 0.5, 100)
  section.batch_size = 0
  with pytest.raises(ValueError, match=r'^config\.sec\.batch_size=0 must be > 0\.$'):
    settings.from_section(_Outer, section, 'sec')
  section.train_lr = -2.0
  with pytest.raises(ValueError, match=r'^config\.sec\.train_lr=-2\.0 must be > 0\.$'):
    settings.from_section(_Inner, section, 'sec', prefix='train_')
  # A field given directly that comes from elsewhere in the config is named by its path.
  with pytest.raises(ValueError, match=r'^config\.top\.steps=0 must be > 0\.$'):
    settings.from_section(_Outer, {}, 'sec', value_paths={'steps': 'top.steps'}, steps=0)

"""One path from a config to the settings of every part of a run, checked before any work.

    settings = validate_config(config)     # raises ValueError naming config.<section>.<field>
    settings.seed, settings.dataset, settings.method, settings.distill, settings.eval,
    settings.pool, settings.compare, settings.lowering

Each settings object is built by its own class from its config section (`dd_jax.settings`), so
its range checks live beside its fields and no field is listed twice. Dataset-dependent checks
(ipc against the smallest class, image sizes) run when the data is opened, still before any work.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from dd_jax import data as data_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import lowering as lowering_lib
from dd_jax import pool as pool_lib
from dd_jax import presets
from dd_jax import settings as settings_lib
from dd_jax.distill import base, methods
from dd_jax.settings import NON_NEGATIVE, POSITIVE, field


@dataclasses.dataclass(frozen=True)
class CompareSettings(settings_lib.Settings):
  """The baselines run beside a config (config section compare; see dd_jax.compare).

  Attributes:
    variants: constraint variants of the config's method (e.g. ('dm', 'dm_cm')).
    random_real: whether to evaluate the random real subset the run starts from.
    full_train_epochs: > 0: also train networks on the full training set this long.
    full_train_num_eval: networks trained on the full training set.
  """

  variants: tuple[str, ...] = ()
  random_real: bool = False
  full_train_epochs: int = field(0, check=NON_NEGATIVE)
  full_train_num_eval: int = field(2, check=POSITIVE)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> CompareSettings:
    variants = tuple(filter(None, config.compare.variants.split(',')))
    for variant in variants:
      presets.variant_config(config, variant)  # raises for a variant of another method
    return settings_lib.from_section(cls, config.compare, 'compare', variants=variants)


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
  """The checked settings of a run.

  Attributes:
    seed: the run's seed (config.seed): every random stream derives from it.
    dataset: the data.
    method: the registered method of config.method.
    distill: its settings (`base.DistillSettings` or the method's subclass).
    eval: the evaluation protocol.
    pool: the pretrained pool of class centralization, with its directory.
    compare: the baselines.
    lowering: the platform's programs (config.compute), resolved once.
  """

  seed: int
  dataset: data_lib.DatasetSettings
  method: base.Method
  distill: base.DistillSettings
  eval: evaluate_lib.EvalSettings
  pool: pool_lib.PoolSettings
  compare: CompareSettings
  lowering: lowering_lib.Lowering

  @property
  def uses_pool(self) -> bool:
    """Whether class centralization acts on the pool."""
    return self.distill.extractor == 'pool' and self.distill.weights.cc > 0

  @property
  def needs_pool(self) -> bool:
    """Whether the run needs the pretrained pool (config.pool): for class centralization, for
    the method's own networks (e.g. DANCE's experts), or as the soft-label teacher."""
    return self.uses_pool or self.method.uses_pool or self.eval.soft_labels


def validate_config(config: ml_collections.ConfigDict) -> ExperimentSettings:
  """Builds (and so checks) every settings object of `config`.

  Raises:
    ValueError: the first bad field, named `config.<section>.<field>`, with the fix.
  """
  if not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f'config.seed={config.seed!r} must be an integer >= 0.')
  dataset = data_lib.DatasetSettings.from_config(config)
  selection = config.eval.get('select_checkpoint', 'last')
  if selection == 'validation' and not dataset.validation_fraction:
    raise ValueError(
      "config.eval.select_checkpoint='validation' chooses among evaluation points on a "
      'validation split: set config.dataset.validation_fraction (e.g. 0.1), then score the '
      'exported set on the test split with python -m dd_jax.evaluate.'
    )
  if selection == 'test' and dataset.validation_fraction:
    raise ValueError(
      "config.eval.select_checkpoint='test' with config.dataset.validation_fraction="
      f'{dataset.validation_fraction} would choose on the validation split: use '
      "select_checkpoint='validation'."
    )
  method = methods.get(config.method)
  return ExperimentSettings(
    seed=config.seed,
    dataset=dataset,
    method=method,
    distill=method.settings(config),
    eval=evaluate_lib.EvalSettings.from_config(config),
    pool=pool_lib.PoolSettings.from_config(config, dataset),
    compare=CompareSettings.from_config(config),
    lowering=lowering_lib.resolve(config.compute.lowering, config.compute.precision),
  )

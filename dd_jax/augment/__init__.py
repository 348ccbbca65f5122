"""Differentiable siamese augmentation for dataset distillation: DM's DSA (`dsa`, exported
here) and IDC's DiffAug (`idc`: `augment.idc.apply`, ...)."""

from dd_jax.augment import idc
from dd_jax.augment.dsa import (
  DEFAULT_STRATEGY,
  OPS,
  VALID_OPS,
  StrategyError,
  apply_op,
  apply_random_op,
  augment,
  parse_strategy,
  sample_params,
)
from dd_jax.augment.ops import (
  brightness,
  color,
  contrast,
  cutout,
  cutout_side,
  flip,
  max_shift,
  rotate,
  saturation,
  scale,
  translate,
)

__all__ = [
  'DEFAULT_STRATEGY',
  'OPS',
  'VALID_OPS',
  'StrategyError',
  'apply_op',
  'apply_random_op',
  'augment',
  'parse_strategy',
  'sample_params',
  'brightness',
  'color',
  'contrast',
  'cutout',
  'cutout_side',
  'flip',
  'idc',
  'max_shift',
  'rotate',
  'saturation',
  'scale',
  'translate',
]

"""Datasets (sklearn digits, TFDS, image folders, npz), normalisation, class-balanced sampling."""

from dd_jax.data.dataset import (
  HELD_OUT_SPLITS,
  KNOWN_STATS,
  DataError,
  Dataset,
  check_ipc,
  compute_channel_stats,
  denormalize,
  hold_out_validation,
  known_dataset_key,
  normalize,
)
from dd_jax.data.folder import default_cache_dir
from dd_jax.data.sampler import (
  ClassSampler,
  first_of_all_classes,
  random_real_subset,
  sample_all_classes,
  sample_class,
  sample_class_indices,
  sample_uniform,
)
from dd_jax.data.sources import SOURCES, DatasetSettings, load_dataset, open_dataset

__all__ = [
  'KNOWN_STATS',
  'SOURCES',
  'ClassSampler',
  'HELD_OUT_SPLITS',
  'DataError',
  'Dataset',
  'DatasetSettings',
  'check_ipc',
  'compute_channel_stats',
  'default_cache_dir',
  'denormalize',
  'hold_out_validation',
  'known_dataset_key',
  'load_dataset',
  'normalize',
  'open_dataset',
  'random_real_subset',
  'first_of_all_classes',
  'sample_all_classes',
  'sample_class',
  'sample_class_indices',
  'sample_uniform',
]

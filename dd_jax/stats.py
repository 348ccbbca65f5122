"""The one summary of repeated accuracies that every table, record and report uses."""

from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1 in the denominator) of `values`.

  Accuracies over seeds x evaluation networks are a sample of the distribution the method
  induces, so the unbiased-variance std is the honest spread; with a single value it is 0.

  Args:
    values: one or more numbers.

  Returns:
    (mean, std) as Python floats.

  Raises:
    ValueError: `values` is empty.
  """
  array = np.asarray(values, dtype=np.float64)
  if array.size == 0:
    raise ValueError('mean_std: no values.')
  std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
  return float(np.mean(array)), std


def format_mean_std(values: Sequence[float]) -> str:
  """'95.38 +- 0.55' for several values; '95.38 (one value: no spread)' for one, where a
  sample std does not exist (`mean_std` reports 0)."""
  mean, std = mean_std(values)
  return f'{mean:.2f} +- {std:.2f}' if len(values) > 1 else f'{mean:.2f} (one value: no spread)'


def count(number: int, noun: str) -> str:
  """'1 network', '5 networks'."""
  return f'{number} {noun}' + ('' if number == 1 else 's')

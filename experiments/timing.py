"""Timing helpers shared by the benchmark scripts (no flags: safe to import from any of them)."""

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dd_jax import lowering as lowering_lib
from dd_jax.models import kernels


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn` after one warm-up call (which compiles)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def alternate(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> dict:
  """Times dd_jax's and PyTorch's calls alternately, so that both see the same machine.

  On a shared machine the speed drifts by more than the ratio's margin between one batch of
  calls and the next; alternating puts each pair of calls within seconds of each other.

  Args:
    ours: one dd_jax call (compiled; its result is waited for).
    theirs: one PyTorch call (synchronous on CPU).
    repeats: pairs of timed calls, after one untimed call of each.

  Returns:
    'ours_s' and 'theirs_s', the medians; 'ratio', the median over pairs of theirs / ours; and
    'ratio_min', 'ratio_max' over the pairs.
  """
  jax.block_until_ready(ours())
  theirs()  # warm up (allocator, thread pool)
  ours_s, theirs_s = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(ours())
    ours_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    theirs()
    theirs_s.append(time.perf_counter() - start)
  ratios = [t / o for o, t in zip(ours_s, theirs_s)]
  return {
    'ours_s': statistics.median(ours_s),
    'theirs_s': statistics.median(theirs_s),
    'ratio': statistics.median(ratios),
    'ratio_min': min(ratios),
    'ratio_max': max(ratios),
  }


def matmul_ceiling(repeats: int) -> tuple[float, int]:
  """The best dense float32 matmul FLOP/s over a few square sizes, and that size."""
  best = (0.0, 0)
  for n in (512, 1024, 2048):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: matmul(a, b), repeats)
    best = max(best, (2.0 * n**3 / seconds, n))
  return best


def cpu_name() -> str:
  """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'): ratios differ between CPUs."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or '?'


def environment() -> dict:
  """The fields every results file starts with: date, jax version, device and machine."""
  device = jax.devices()[0]
  return {
    'date': time.strftime('%Y-%m-%d %H:%M'),
    'jax': jax.__version__,
    'device': f'{device.platform}: {device.device_kind}',
    'machine': f'{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores',
  }


def conv_text(conv: kernels.ConvLowering) -> str:
  """'winograd + folded norm', 'xla', ...: a `ConvLowering` in a table."""
  return conv.impl + (' + folded norm' if conv.fold_norm else '')


def describe(lowering: lowering_lib.Lowering) -> str:
  """The lowering's name and the fields in which it differs from the lowering of that name
  ('cpu'; 'cpu, train_conv im2col + folded norm, microbatch_pixels 0'): what a record was
  traced with."""
  named = lowering_lib.resolve(lowering.name)
  changed = [
    f'{field.name} '
    + (conv_text(value) if isinstance(value, kernels.ConvLowering) else repr(value))
    for field in dataclasses.fields(lowering)
    if (value := getattr(lowering, field.name)) != getattr(named, field.name)
  ]
  return ', '.join([lowering.name, *changed])


def write_results(path: str, results: dict) -> None:
  """Writes `results` to `path` as indented JSON and says where."""
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'\nwrote {path}')

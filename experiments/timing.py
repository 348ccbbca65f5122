"""Timing helpers shared by the benchmark scripts (no flags: safe to import from any of them)."""

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn` after one warm-up call (which compiles)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


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


def environment() -> dict:
  """The fields every results file starts with: date, jax version, device and machine."""
  device = jax.devices()[0]
  return {
    'date': time.strftime('%Y-%m-%d %H:%M'),
    'jax': jax.__version__,
    'device': f'{device.platform}: {device.device_kind}',
    'machine': f'{platform.machine()}, {platform.processor() or "?"}, {os.cpu_count()} cores',
  }


def write_results(path: str, results: dict) -> None:
  """Writes `results` to `path` as indented JSON and says where."""
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'\nwrote {path}')

"""Progress of long jitted loops (training networks for evaluation, pools, baselines).

A whole training run is one XLA program, so the host sees nothing until it ends. The program
instead calls `tick` (a `jax.debug.callback` every `every` steps) and the host advances the
innermost open `bar`. Without an open bar a tick does nothing, so the compiled program is the
same whether or not anyone watches, and its numbers do not depend on it.

    with progress.bar(ticks, 'evaluating 5 ConvNet networks'):
      accuracies = jitted_training(...)   # calls tick() inside
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from tqdm.auto import tqdm

_open_bars: list[tqdm] = []


@contextlib.contextmanager
def bar(ticks: int, description: str) -> Iterator[None]:
  """A progress bar (percentage, elapsed, ETA on stderr) that `tick`s of the block advance.

  Args:
    ticks: the number of ticks the block will make (`ticks_of`).
    description: what is running, e.g. 'evaluating 5 ConvNet networks'.
  """
  progress = tqdm(
    total=ticks,
    desc=description,
    leave=False,
    mininterval=1.0,
    bar_format='{desc}: {percentage:3.0f}% |{bar:20}| {elapsed}<{remaining}',
  )
  _open_bars.append(progress)
  try:
    yield
  finally:
    _open_bars.pop()
    progress.close()


def _advance() -> None:
  if _open_bars:
    _open_bars[-1].update(1)


def tick(step: jax.Array, every: int) -> None:
  """Inside a jitted program: one tick after every `every`-th step (0-based `step`).

  Args:
    step: the step counter (a traced int scalar, the same for all networks trained together).
    every: steps per tick (static, >= 1).
  """
  jax.lax.cond((step + 1) % every == 0, lambda: jax.debug.callback(_advance), lambda: None)


def ticks_of(steps: int, every: int, looped_copies: int = 1) -> int:
  """How many ticks `steps` steps make, when the program runs them `looped_copies` times one
  after another (networks trained in a loop tick each; trained by vmap they tick together)."""
  return steps // every * looped_copies


def every_for(steps: int, ticks_wanted: int = 50) -> int:
  """Steps per tick for about `ticks_wanted` ticks over `steps` steps."""
  return max(1, steps // ticks_wanted)

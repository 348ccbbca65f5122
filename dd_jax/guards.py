"""Numerical guards of a distillation run: non-finite values, a diverging image optimiser, an
evaluation at chance level. Each returns or raises a message that names the step and the fix."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_finite(
  window_metrics: list[dict[str, Any]],
  images: jax.Array,
  step: int,
  workdir: str,
  last_saved: int | None,
) -> None:
  """Stops the run when a loss term or the synthetic images went non-finite.

  Args:
    window_metrics: host metrics of the steps `step - len(window_metrics) + 1 .. step`.
    images: the synthetic images after `step`.
    step: the current step.
    workdir: the run directory (named in the message).
    last_saved: the step of the newest checkpoint, or None.

  Raises:
    FloatingPointError: naming the first step with a non-finite metric (loss terms, grad_norm,
      ...) and those metrics, or else the images; and the checkpoint a rerun would resume from.
  """
  first_step = step - len(window_metrics) + 1
  images_finite = bool(jnp.all(jnp.isfinite(images)))
  problem = None
  for offset, metrics in enumerate(window_metrics):
    bad = sorted(name for name, value in metrics.items() if not np.all(np.isfinite(value)))
    if bad:
      problem = f'{", ".join(bad)} became non-finite at step {first_step + offset}'
      if not images_finite:
        problem += f' (the synthetic images at step {step} are non-finite too)'
      break
  if problem is None and not images_finite:
    problem = (
      f'the synthetic images became non-finite between steps {first_step} and {step} '
      'while every loss term stayed finite'
    )
  if problem is None:
    return
  resume = (
    f'the last checkpoint (step {last_saved}) in {workdir}/checkpoints is intact'
    if last_saved is not None
    else 'no checkpoint was written'
  )
  raise FloatingPointError(
    f'Stopped: {problem}; {resume}. Lower distill.lr or the constraint weights '
    '(constraints.cc.weight, constraints.cm.weight) and rerun: in the same --workdir, the '
    'stopped run is set aside.'
  )


# Divergence guard. DM's images overshoot [0, 1] by a fraction of the range and losses fall or
# wander by small factors; these margins are orders of magnitude beyond that.
IMAGE_OVERSHOOT_WARNING = 10.0  # pixels this many ranges outside [0, 1]: warn
IMAGE_OVERSHOOT_ERROR = 1e3  # ... this many: stop, nothing useful can come of the run
LOSS_GROWTH_WARNING = 100.0  # a logged loss this many times the first one: warn


class DivergenceError(RuntimeError):
  """The synthetic images left any plausible range: the image optimiser diverged."""


def image_overshoot(images: jax.Array, mean, std) -> float:
  """How far normalised images reach outside the pixel range [0, 1], in units of that range.

  Args:
    images: float [..., C], normalised with per-channel `mean` / `std` (C values each).

  Returns:
    max(max pixel - 1, -min pixel, 0) over all pixels of the denormalised images.
  """
  pixels = images * jnp.asarray(std, images.dtype) + jnp.asarray(mean, images.dtype)
  return float(jnp.maximum(jnp.maximum(jnp.max(pixels) - 1.0, -jnp.min(pixels)), 0.0))


def divergence_warnings(
  first_loss: float, loss: float, overshoot: float, step: int, distill_lr: float
) -> dict[str, str]:
  """The divergence guard's verdict on one log window.

  Args:
    first_loss: the mean loss of the run's first log window.
    loss: the mean loss of this window.
    overshoot: `image_overshoot` of the synthetic images after `step`.
    step: the step just logged.
    distill_lr: config.distill.lr, named in the messages.

  Returns:
    {kind: warning} (possibly empty), kinds 'images' (more than IMAGE_OVERSHOOT_WARNING ranges
    outside [0, 1]) and 'loss' (grown by more than LOSS_GROWTH_WARNING times).

  Raises:
    DivergenceError: images more than IMAGE_OVERSHOOT_ERROR ranges outside [0, 1].
  """
  advice = f'distill.lr={distill_lr:g} is probably too large; lower it and rerun'
  if overshoot > IMAGE_OVERSHOOT_ERROR:
    raise DivergenceError(
      f'Stopped at step {step}: the synthetic pixels reach {overshoot:.3g} times the pixel '
      f'range outside [0, 1]: the image optimiser diverged. {advice}: in the same --workdir, the '
      'stopped run is set aside.'
    )
  warnings = {}
  if overshoot > IMAGE_OVERSHOOT_WARNING:
    warnings['images'] = (
      f'WARNING step {step}: the synthetic pixels reach {overshoot:.3g} times the pixel range '
      f'outside [0, 1]; {advice}.'
    )
  if first_loss > 0 and loss > LOSS_GROWTH_WARNING * first_loss:
    warnings['loss'] = (
      f'WARNING step {step}: the loss grew from {first_loss:.4g} to {loss:.4g} '
      f'(x{loss / first_loss:.3g}); {advice}.'
    )
  return warnings


def chance_level_warning(accuracies: list[float], num_classes: int, what: str) -> str | None:
  """A warning when every network of an evaluation scored at most chance (+ 1 point)."""
  chance = 100.0 / num_classes
  if max(accuracies) > chance + 1.0:
    return None
  return (
    f'WARNING: {what}: every evaluation network is at chance level ({max(accuracies):.2f}% '
    f'at best, chance {chance:.2f}%): they did not learn. Check eval.lr (too large diverges, '
    'too small does not move) and, for a distilled set, the synthetic images (distill.lr).'
  )

"""How a run's computations are lowered on its platform: decided once, passed explicitly.

The numbers do not depend on the lowering (beyond float rounding, tested); the speed does.
XLA:CPU and the accelerators want different programs:

    lowering = resolve('auto')            # 'cpu' on a CPU backend, 'accelerator' elsewhere
    net = models.get_network('ConvNet', 10, conv=lowering.train_conv)
    step = dm.make_dm_step(net, settings, spec, lowering)

Every part of dd_jax that chooses between such programs (networks, the distillation steps, the
trainer, the pool, evaluation) takes a `Lowering`; nothing reads the backend elsewhere, so the
accelerator path runs in the CPU test suite with `resolve('accelerator')`. A run resolves it
from `config.compute` (`lowering`, `precision`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax

from dd_jax.models import kernels

NAMES = ('auto', 'cpu', 'accelerator')
# jax's matmul / convolution precisions of float32 operands (`jax.default_matmul_precision`);
# 'default' leaves the platform's own (TF32 on recent GPUs, one bfloat16 pass on TPUs).
PRECISIONS = ('auto', 'default', 'tensorfloat32', 'float32')


@dataclasses.dataclass(frozen=True)
class Lowering:
  """A platform's programs for the same numbers. Hashable: a static argument of `jax.jit`.

  Attributes:
    name: 'cpu' or 'accelerator'.
    train_conv: the convolutions of networks trained by SGD (evaluation, the pool, IDM's queue
      and matching networks). CPU: Winograd and im2col (XLA:CPU runs a convolution's backward
      pass 15-50x slower inside `lax.scan`, jax-ml/jax#12868) with the first norm folded.
    real_conv: the matching network on the real images (forward only; DM and the IDC family):
      XLA's.
    synthetic_conv: DM's matching network on the synthetic images (forward and image
      gradient). CPU: XLA's with the first norm folded.
    microbatch_pixels: input pixels per gradient pass of an SGD step (`microbatch`); 0: the whole
      batch in one pass.
    loop_networks: networks trained together run in a loop (`lax.map`, faster on XLA:CPU), else
      under `vmap`.
    loop_classes: DM's siamese DSA runs class by class (each class's drawn op alone), else under
      `vmap` (every op computed, one selected).
    real_chunk_max: DM embeds its real images in chunks of the largest divisor of all of them up
      to this; 0: a class per chunk.
    chunk_synthetic: DM embeds its synthetic images in unrolled chunks (`synthetic_chunk`), else
      all at once.
    precision: `jax.default_matmul_precision` inside the jitted programs; None: the platform's.
  """

  name: str
  train_conv: kernels.ConvLowering
  real_conv: kernels.ConvLowering
  synthetic_conv: kernels.ConvLowering
  microbatch_pixels: int
  loop_networks: bool
  loop_classes: bool
  real_chunk_max: int
  chunk_synthetic: bool
  precision: str | None

  def precision_scope(self) -> contextlib.AbstractContextManager:
    """The matmul precision for the computations traced inside the block."""
    if self.precision is None:
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.precision)

  def microbatch(self, images_shape: tuple[int, ...], has_batch_stats: bool) -> int:
    """Images per gradient pass of an SGD step on [N, H, W, C] images (`train.sgd_step`).

    Returns:
      0 (one pass over the whole batch) for batch-norm networks, whose statistics are over the
      batch, and without `microbatch_pixels`; else as many images as hold `microbatch_pixels`
      input pixels (CPU: 16 at 32x32, 20 at 28x28, 256 at 8x8), at least one.
    """
    if has_batch_stats or not self.microbatch_pixels:
      return 0
    return max(1, self.microbatch_pixels // math.prod(images_shape[1:-1]))

  def real_chunk(self, total: int, per_class: int) -> int:
    """Real images DM embeds at once, of `total` (a multiple of `per_class`)."""
    if not self.real_chunk_max:
      return per_class
    return largest_divisor_up_to(total, self.real_chunk_max)

  def synthetic_chunk(self, total: int) -> int:
    """Synthetic images DM embeds at once, of `total`: all of them, or on CPU the largest divisor
    up to 64 or a tenth of them (which bounds the unrolled passes at 10)."""
    if not self.chunk_synthetic:
      return total
    return largest_divisor_up_to(total, max(64, total // 10))


def largest_divisor_up_to(total: int, bound: int) -> int:
  """The largest divisor of `total` that is at most `bound` (at least 1)."""
  return max(d for d in range(1, min(total, bound) + 1) if total % d == 0)


# Measured on 2-core x86 CPUs (docs/results.md): Winograd layers take 15-25% off a ConvNet
# training step, the folded first norm 13-23% off IDM steps and evaluation epochs, passes of 16
# CIFAR-sized images 11-22% off SGD steps, looped networks and classes 5-27%, chunks of 64 real
# images 1.4x against a class of 256.
CPU = Lowering(
  name='cpu',
  train_conv=kernels.ConvLowering('winograd', fold_norm=True),
  real_conv=kernels.ConvLowering('xla'),
  synthetic_conv=kernels.ConvLowering('xla', fold_norm=True),
  microbatch_pixels=16 * 32 * 32,
  loop_networks=True,
  loop_classes=True,
  real_chunk_max=64,
  chunk_synthetic=True,
  precision=None,
)
# XLA's convolutions, networks and classes batched, whole batches: what GPUs and TPUs run well.
# float32 operands pass through TF32 (GPU) or three bfloat16 passes (TPU), as the reference's
# cuDNN convolutions did, rather than one bfloat16 pass.
ACCELERATOR = Lowering(
  name='accelerator',
  train_conv=kernels.ConvLowering('xla'),
  real_conv=kernels.ConvLowering('xla'),
  synthetic_conv=kernels.ConvLowering('xla'),
  microbatch_pixels=0,
  loop_networks=False,
  loop_classes=False,
  real_chunk_max=0,
  chunk_synthetic=False,
  precision='tensorfloat32',
)


def resolve(name: str = 'auto', precision: str = 'auto') -> Lowering:
  """The lowering named `name` ('auto': of the default backend), with `precision`.

  Args:
    name: one of NAMES; 'auto' is 'cpu' on a CPU backend and 'accelerator' elsewhere.
    precision: one of PRECISIONS; 'auto' keeps the lowering's, 'default' the platform's.

  Raises:
    ValueError: an unknown name or precision, naming the config field.
  """
  if name not in NAMES:
    raise ValueError(f'config.compute.lowering={name!r} is not valid; choose one of {NAMES}.')
  if precision not in PRECISIONS:
    raise ValueError(
      f'config.compute.precision={precision!r} is not valid; choose one of {PRECISIONS}.'
    )
  if name == 'auto':
    name = 'cpu' if jax.default_backend() == 'cpu' else 'accelerator'
  lowering = CPU if name == 'cpu' else ACCELERATOR
  if precision != 'auto':
    lowering = dataclasses.replace(
      lowering, precision=None if precision == 'default' else precision
    )
  return lowering

"""Where a ConvNet training step's time goes on CPU, and the bound its matrix products set.

  python experiments/probes/bench_train_gemms.py          # 100 images (IPC 10 evaluation batch)
  python experiments/probes/bench_train_gemms.py --images=256 --pytorch
  python experiments/probes/bench_train_gemms.py --out=experiments/results/bench_train_gemms.json

On CPU, dd_jax trains ConvNets (evaluation, the IDM queue, the CC pool) with its convolutions as
im2col (`models.kernels.conv2d_im2col`): gathered patches, then one matrix product per layer. One
SGD step of the reference ConvNet (3 x [conv 3x3 128, instance norm, ReLU, 2x2 avg pool], CIFAR
32x32x3 inputs) is then eight matrix products (each layer's forward and weight gradient, and
the input gradient of layers 2 and 3; the images get none) plus memory-bound work: the patch
gathering and its transpose, the norm, ReLU, pooling, the loss and the SGD update.

This times, interleaved repeat by repeat in one process so that a load change hits all alike:

- `step, im2col in a scan`: --steps SGD steps (momentum 0.9) in one `lax.scan`, as evaluation
  and the IDM queue run them (no DSA, which costs a few percent);
- `step, Winograd layers 2 and 3`: the same scan with `ConvLowering('winograd')`, dd_jax's CPU
  default (`models.kernels.conv2d_winograd` for the 16x16 and 8x8 layers, im2col for the first,
  whose 3 input channels leave nothing to save). Its FLOP/s are effective: the direct
  convolution's FLOPs over its time (Winograd does 16 instead of 36 products per 2x2 output
  tile);
- `step, XLA convolution, no loop`: one jitted SGD step with `lax.conv_general_dilated`, called
  from Python: the way around XLA:CPU's slow convolution backward inside loops;
- `step, XLA conv forward and input gradient, im2col weight gradient, in a scan`: the scanned step
  with a custom VJP (`conv_xla_im2col_weight_grad`) that leaves the forward and the input gradient
  to XLA's own convolution (on CPU jax 0.10 fuses both into YNNPACK kernels, fast inside loops;
  the input gradient is a stride-1 convolution with the flipped kernel) and computes only the
  weight gradient, the convolution XLA:CPU is slow at in loops, as patches^T @ dy. It removes
  the patch gradient and its scatter back to the image;
- each of the eight matrix products alone at its shape (random operands), and their sum. No
  im2col step can be faster than that sum, whatever the rest costs;
- `2.0 * x` of the first layer's activation ([images, 32, 32, 128]): the memory bandwidth the
  memory-bound half of a step gets;
- with --pytorch (the `bench` extra): one SGD step of the PyTorch baseline ConvNet
  (experiments/torch_baseline.py, oneDNN convolutions, all cores) on the same number of images.

The steps' networks keep the first layer's instance norm unfolded (`ConvLowering(...,
fold_norm=False)`): the eight products above. dd_jax's CPU lowering folds it into the first
convolution (`kernels.conv_instance_norm`), which `bench_speed.py --before_fold_norm=false` times
against this.

FLOP/s of a step are its matrix products' FLOPs (2 M K N each; the classifier's are < 0.1%)
over its time; the ceiling is the dense float32 matmul FLOP/s measured in the same run.
Prints a markdown table and writes --out (JSON: date, jax version, machine, load, the figures).
"""

import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from dd_jax import models
from dd_jax import train as train_lib
from dd_jax.models import kernels

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # noqa: E402  experiments/timing.py

_IMAGES = flags.DEFINE_integer('images', 100, 'Images per SGD step (CIFAR-shaped, 32x32x3).')
_STEPS = flags.DEFINE_integer('steps', 4, 'SGD steps per timed call of the scanned step.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per variant after the compiling one.')
_PYTORCH = flags.DEFINE_bool(
  'pytorch', False, 'Also time the PyTorch baseline step (experiments/torch_baseline.py).'
)
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_bench_train_gemms.json'),
  'Results file (the committed record: --out=experiments/results/bench_train_gemms.json).',
)

NUM_CLASSES, IMAGE_SHAPE, WIDTH, DEPTH = 10, (32, 32, 3), 128, 3
COPY = 'memory: 2 x the layer-1 activation'
WINOGRAD = "step, Winograd layers 2 and 3 (ConvLowering 'winograd', the CPU default), in a scan"
HYBRID = 'step, XLA conv forward and input gradient, im2col weight gradient, in a scan'


def step_gemms(images: int) -> list[tuple[str, int, int, int]]:
  """(name, M, K, N) of the matrix products of one im2col SGD step of the reference ConvNet."""
  shapes = []
  side, channels = IMAGE_SHAPE[0], IMAGE_SHAPE[2]
  for layer in range(1, DEPTH + 1):
    pixels, patch = images * side * side, 9 * channels
    shapes.append((f'conv{layer} forward', pixels, patch, WIDTH))
    shapes.append((f'conv{layer} weight gradient', patch, pixels, WIDTH))
    if layer > 1:  # the images themselves get no gradient
      shapes.append((f'conv{layer} input gradient', pixels, WIDTH, patch))
    side, channels = side // 2, WIDTH
  return shapes


def _xla_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((padding, padding),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_xla_im2col_weight_grad(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """Stride-1 NHWC convolution: XLA's forward and input gradient, an im2col weight gradient."""
  return _xla_conv(x, kernel, padding)


def _conv_forward(x, kernel, padding):
  return _xla_conv(x, kernel, padding), (x, kernel)


def _conv_backward(padding, residuals, dy):
  x, kernel = residuals
  kh, kw, c_in, c_out = kernel.shape
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = _xla_conv(dy, flipped, kh - 1 - padding)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h, w = dy.shape[1:3]
  patches = jnp.concatenate(
    [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
  )
  dkernel = jnp.einsum('nhwk,nhwo->ko', patches, dy).reshape(kh, kw, c_in, c_out)
  return dx, dkernel


conv_xla_im2col_weight_grad.defvjp(_conv_forward, _conv_backward)


@contextlib.contextmanager
def _im2col_replaced_by_hybrid():
  """While tracing, the im2col ConvNet's convolutions take conv_xla_im2col_weight_grad."""
  original = kernels.conv2d_im2col

  def hybrid(x, kernel, stride, padding):
    assert stride == 1, 'the ConvNet has stride-1 convolutions only'
    return conv_xla_im2col_weight_grad(x, kernel, padding)

  kernels.conv2d_im2col = hybrid
  try:
    yield
  finally:
    kernels.conv2d_im2col = original


def _sgd_step_fn(net: models.Network, images: jax.Array, labels: jax.Array):
  optimizer = optax.sgd(0.01, momentum=0.9)

  def step(variables, opt_state):
    return train_lib.sgd_step(net, optimizer, variables, opt_state, images, labels)[:2]

  return step, optimizer


def make_calls(images: jax.Array, labels: jax.Array) -> dict[str, tuple]:
  """Variant name -> (zero-argument call, SGD steps per call or None for a single product)."""
  calls = {}
  im2col_net = models.get_network('ConvNet', NUM_CLASSES, conv=kernels.ConvLowering('im2col'))
  variables = im2col_net.init(jax.random.key(1), (1, *IMAGE_SHAPE))
  optimizer = _sgd_step_fn(im2col_net, images, labels)[1]
  opt_state = optimizer.init(variables['params'])

  def scanned_steps(impl):
    net = models.get_network('ConvNet', NUM_CLASSES, conv=kernels.ConvLowering(impl))
    step = _sgd_step_fn(net, images, labels)[0]

    def scan_steps(variables, opt_state):
      carry, _ = jax.lax.scan(
        lambda c, _: (step(*c), None), (variables, opt_state), None, _STEPS.value
      )
      return carry

    return scan_steps

  scan_steps = scanned_steps('im2col')
  scanned = jax.jit(scan_steps)
  calls['step, im2col in a scan'] = (lambda: scanned(variables, opt_state), _STEPS.value)
  winograd = jax.jit(scanned_steps('winograd'))
  calls[WINOGRAD] = (lambda: winograd(variables, opt_state), _STEPS.value)
  # Traced and compiled while the replacement is in place; a new function object, so that jax
  # cannot reuse the im2col trace.
  with _im2col_replaced_by_hybrid():
    hybrid = jax.jit(lambda v, o: scan_steps(v, o)).lower(variables, opt_state).compile()
  calls[HYBRID] = (lambda: hybrid(variables, opt_state), _STEPS.value)
  xla_net = models.get_network('ConvNet', NUM_CLASSES, conv=kernels.ConvLowering('xla'))
  xla_step = jax.jit(_sgd_step_fn(xla_net, images, labels)[0])
  calls['step, XLA convolution, no loop'] = (lambda: xla_step(variables, opt_state), 1)
  matmul = jax.jit(jnp.matmul)
  for index, (name, m, k, n) in enumerate(step_gemms(images.shape[0])):
    a = jax.random.normal(jax.random.key(2 * index), (m, k))
    b = jax.random.normal(jax.random.key(2 * index + 1), (k, n))
    calls[name] = (lambda a=a, b=b: matmul(a, b), None)
  activation = jax.random.normal(jax.random.key(0), (images.shape[0], *IMAGE_SHAPE[:2], WIDTH))
  double = jax.jit(lambda x: 2.0 * x)
  calls[COPY] = (lambda: double(activation), None)
  return calls


def _torch_step_call(num_images: int):
  import torch  # pylint: disable=import-outside-toplevel
  import torch_baseline  # pylint: disable=import-outside-toplevel

  generator = torch.Generator().manual_seed(0)
  images = torch.randn(num_images, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2], generator=generator)
  labels = torch.arange(num_images) % NUM_CLASSES
  net = torch_baseline.ConvNet(IMAGE_SHAPE[2], NUM_CLASSES, image_size=IMAGE_SHAPE[0])
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

  def step():
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return step


def main(argv):
  del argv
  ceiling, size = timing.matmul_ceiling(_REPEATS.value)
  images = jax.random.normal(jax.random.key(0), (_IMAGES.value, *IMAGE_SHAPE))
  labels = jnp.arange(_IMAGES.value) % NUM_CLASSES
  calls = make_calls(images, labels)
  if _PYTORCH.value:
    calls['step, PyTorch baseline'] = (_torch_step_call(_IMAGES.value), 1)
  for call, _ in calls.values():
    jax.block_until_ready(call())  # compiles / warms up
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  times = {name: [] for name in calls}
  for _ in range(_REPEATS.value):
    for name, (call, _) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)

  gemms = {name: 2.0 * m * k * n for name, m, k, n in step_gemms(_IMAGES.value)}
  step_flops = sum(gemms.values())
  rows = []
  copy_seconds = statistics.median(times.pop(COPY))
  # Read once, written once (a fresh output buffer, as every XLA op allocates).
  activation_bytes = _IMAGES.value * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * WIDTH * 4
  bandwidth = 2 * activation_bytes / copy_seconds
  for name, steps in ((name, steps) for name, (_, steps) in calls.items() if name != COPY):
    seconds = statistics.median(times[name]) / (steps or 1)
    flops = step_flops if steps else gemms[name]
    rows.append(
      {
        'variant': name,
        'ms': 1e3 * seconds,
        'flop_per_s': flops / seconds,
        'fraction_of_matmul': flops / seconds / ceiling,
      }
    )
  gemm_ms = sum(row['ms'] for row in rows if row['variant'] in gemms)
  rows.append(
    {
      'variant': 'the matrix products alone (sum)',
      'ms': gemm_ms,
      'flop_per_s': step_flops / gemm_ms * 1e3,
      'fraction_of_matmul': step_flops / gemm_ms * 1e3 / ceiling,
    }
  )
  results = {
    **timing.environment(),
    'load_average_at_start': load,
    'images': _IMAGES.value,
    'steps': _STEPS.value,
    'repeats': _REPEATS.value,
    'matmul_flop_per_s': ceiling,
    'matmul_size': size,
    'step_flops': step_flops,
    'memory_bytes_per_s': bandwidth,
    'rows': rows,
  }
  print(
    f'ConvNet SGD step, {_IMAGES.value} images 32x32x3, {step_flops / 1e9:.1f} GFLOP, median '
    f'of {_REPEATS.value} (load {load}); matmul ceiling {ceiling / 1e9:.0f} GFLOP/s '
    f'({size}^3):\n\n| variant | ms | GFLOP/s | of ceiling |\n|---|---|---|---|'
  )
  for row in rows:
    print(
      f'| {row["variant"]} | {row["ms"]:.1f} | {row["flop_per_s"] / 1e9:.0f} | '
      f'{100 * row["fraction_of_matmul"]:.0f}% |'
    )
  print(
    f'\nmemory bandwidth (2 x the layer-1 activation, {activation_bytes / 1e6:.0f} MB read and '
    f'written): {bandwidth / 1e9:.1f} GB/s'
  )
  timing.write_results(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)

"""How many images per gradient pass make a ConvNet SGD step fastest (`train.sgd_step(microbatch)`).

  python experiments/probes/bench_microbatch.py                # batches 64, 100, 244, 256
  python experiments/probes/bench_microbatch.py --batches=256 --microbatches=0,16,32,64
  python experiments/probes/bench_microbatch.py --image_size=8 --channels=1     # digits shapes
  python experiments/probes/bench_microbatch.py --out=experiments/results/bench_microbatch.json

For every batch size (the training shapes: IDM's real batch 64 and 256, evaluation's 100 images
at IPC 10 and the 256 + 244 minibatches at IPC 50) and every micro-batch size (0: the whole batch
in one pass, the step before micro-batching), --steps SGD steps of the reference ConvNet
(CIFAR-10 shapes by default, momentum 0.9, no DSA) in one `lax.scan`, as evaluation and the IDM
queue run them, with the CPU lowering's convolutions (`lowering.CPU.train_conv`). The variants
of one batch size are timed interleaved, --repeats times, median per step; each is checked
against the whole-batch step (largest parameter difference after the steps: float rounding).
Prints a markdown table and writes --out (JSON).
"""

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from dd_jax import lowering, models
from dd_jax import train as train_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # noqa: E402  experiments/timing.py

_BATCHES = flags.DEFINE_list('batches', ['64', '100', '244', '256'], 'Images per SGD step.')
_MICROBATCHES = flags.DEFINE_list(
  'microbatches', ['0', '16', '25', '32', '50', '64'], 'Images per pass (0: the whole batch).'
)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Side of the square images (digits: 8).')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Image channels (digits: 1).')
_STEPS = flags.DEFINE_integer('steps', 5, 'SGD steps per timed call (one lax.scan).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per variant (median).')
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_bench_microbatch.json'),
  'Results file (the committed record: --out=experiments/results/bench_microbatch.json).',
)

NUM_CLASSES = 10


def scanned_steps(net: models.Network, batch: int, microbatch: int, image_shape: tuple[int, ...]):
  """A jitted call of --steps SGD steps on `batch` fixed images, `microbatch` images per pass."""
  images = jax.random.normal(jax.random.key(0), (batch, *image_shape))
  labels = jnp.arange(batch) % NUM_CLASSES
  optimizer = optax.sgd(0.01, momentum=0.9)

  def steps(variables):
    def step(carry, _):
      variables, opt_state, _ = train_lib.sgd_step(
        net, optimizer, *carry, images, labels, microbatch=microbatch
      )
      return (variables, opt_state), None

    carry = (variables, optimizer.init(variables['params']))
    return jax.lax.scan(step, carry, None, _STEPS.value)[0][0]

  return jax.jit(steps)


def main(argv):
  del argv
  net = models.get_network('ConvNet', NUM_CLASSES, conv=lowering.CPU.train_conv)
  image_shape = (_IMAGE_SIZE.value, _IMAGE_SIZE.value, _CHANNELS.value)
  variables = net.init(jax.random.key(1), (1, *image_shape))
  rows = []
  for batch in map(int, _BATCHES.value):
    sizes = sorted({min(int(m), batch) % batch for m in _MICROBATCHES.value})  # batch -> 0
    calls = {size: scanned_steps(net, batch, size, image_shape) for size in sizes}
    outputs = {size: jax.block_until_ready(call(variables)) for size, call in calls.items()}
    times = {size: [] for size in sizes}
    for _ in range(_REPEATS.value):
      for size, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call(variables))
        times[size].append((time.perf_counter() - start) / _STEPS.value)
    whole_ms = 1e3 * statistics.median(times[0])
    for size in sizes:
      difference = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
          jax.tree_util.tree_leaves(outputs[size]), jax.tree_util.tree_leaves(outputs[0])
        )
      )
      step_ms = 1e3 * statistics.median(times[size])
      rows.append(
        {
          'batch': batch,
          'microbatch': size or batch,
          'step_ms': step_ms,
          'relative_to_whole_batch': step_ms / whole_ms,
          'max_parameter_difference': difference,
          'step_ms_all': [1e3 * t for t in times[size]],
        }
      )
      print(
        f'batch {batch:4d}, {size or batch:4d} images per pass: {step_ms:7.1f} ms per step '
        f'({step_ms / whole_ms:.2f}x the whole batch), parameters within {difference:.1e}',
        flush=True,
      )
  results = {
    **timing.environment(),
    'conv': timing.conv_text(net.conv),
    'image_shape': image_shape,
    'steps': _STEPS.value,
    'repeats': _REPEATS.value,
    'rows': rows,
  }
  print('\n| batch | images per pass | ms per step | vs whole batch |\n|---|---|---|---|')
  for row in rows:
    print(
      f'| {row["batch"]} | {row["microbatch"]} | {row["step_ms"]:.1f} | '
      f'{row["relative_to_whole_batch"]:.2f}x |'
    )
  timing.write_results(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)

"""Cost of instance norm in ConvNet training and DM-style image gradients on CPU.

  python experiments/bench_norm.py                       # 100 CIFAR-shaped images, 5 repeats
  python experiments/bench_norm.py --out=experiments/results/bench_norm.json

dd_jax's instance norm (`models.layers.instance_norm`) has a hand-written backward pass. This
times the reference ConvNet (3 x [conv 128, instance norm, ReLU, avg pool], the CPU default
convolutions) with three norms, each on the same weights and data, interleaved repeat by repeat in
one process so that a busy machine slows all of them alike:

- `instance_norm`: dd_jax's layer (custom VJP; ConvNet's ReLU inside it);
- `flax_group_norm`: Flax's `GroupNorm(num_groups=C)` and `nn.relu` differentiated by autodiff
  (dd_jax before the custom VJP), swapped in with `flax.linen.intercept_methods`;
- `none`: no norm at all, the bound on what any norm implementation could save.

Two workloads: `train`, --steps SGD steps (momentum 0.9) on --images images in one `lax.scan`
(evaluation, the IDM queue and the pool train this way), and `image_grad`, the gradient of the
squared mean embedding with respect to the images (the shape of a DM step's backward pass). Both
norms compute the same function; their float32 image gradients are also compared with a float64
one (relative error of the whole gradient).
Prints a markdown table and writes --out (JSON: date, jax version, machine, load, the figures).
"""

import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing  # experiments/timing.py (the script's folder is on sys.path)
from absl import app, flags

from dd_jax import models
from dd_jax.models import layers

_IMAGES = flags.DEFINE_integer('images', 100, 'CIFAR-shaped (32x32x3) random images.')
_STEPS = flags.DEFINE_integer('steps', 8, 'SGD steps per timed train call (one lax.scan).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per variant after the compiling one.')
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_bench_norm.json'),
  'Results file (the committed record: --out=experiments/results/bench_norm.json).',
)

NUM_CLASSES, IMAGE_SHAPE = 10, (32, 32, 3)
NORMS = ('instance_norm', 'flax_group_norm', 'none')


def _flax_group_norm(next_fun, args, kwargs, context):
  """Replaces every InstanceNorm call by Flax's GroupNorm on the same scale and bias."""
  if not (isinstance(context.module, layers.InstanceNorm) and context.method_name == '__call__'):
    return next_fun(*args, **kwargs)
  (x,) = args
  group_norm = nn.GroupNorm(
    num_groups=x.shape[-1], epsilon=layers.NORM_EPS, use_fast_variance=False
  )
  y = group_norm.apply({'params': context.module.variables['params']}, x)
  # ConvNet fuses its ReLU into the norm (InstanceNorm(relu=True)): autodiff's ReLU here.
  return nn.relu(y) if context.module.relu else y


def _network(norm: str) -> models.Network:
  return models.get_network('ConvNet' if norm != 'none' else 'ConvNetNN', NUM_CLASSES)


def _apply_with(norm: str):
  """`fn -> fn` running `fn` with the norm variant's interceptor, if any."""

  def wrap(fn):
    def wrapped(*args):
      if norm == 'flax_group_norm':
        with nn.intercept_methods(_flax_group_norm):
          return fn(*args)
      return fn(*args)

    return wrapped

  return wrap


def _float64():
  enable = getattr(jax, 'enable_x64', None)
  if enable is None:  # older jax
    from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top

    return enable_x64()
  return enable(True)


def make_workloads(norm: str, images: jax.Array, labels: jax.Array, dtype=jnp.float32):
  """The jitted (train, image_grad) calls of one norm variant, with their arguments bound."""
  net = _network(norm)
  variables = net.init(jax.random.key(2), (1, *IMAGE_SHAPE))
  variables = jax.tree_util.tree_map(lambda leaf: leaf.astype(dtype), variables)
  optimizer = optax.sgd(0.01, momentum=0.9)

  def loss(params):
    logits = net.apply({**variables, 'params': params}, images)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  @jax.jit
  @_apply_with(norm)
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value

    (params, _), values = jax.lax.scan(
      step, (params, optimizer.init(params)), None, length=_STEPS.value
    )
    return params, values

  @jax.jit
  @_apply_with(norm)
  def image_grad(images):
    return jax.grad(lambda x: jnp.sum(jnp.mean(net.embed(variables, x)[0], axis=0) ** 2))(images)

  return {
    'train': lambda: train(variables['params']),
    'image_grad': lambda: image_grad(images),
  }


def main(argv):
  del argv
  images = jax.random.normal(jax.random.key(0), (_IMAGES.value, *IMAGE_SHAPE))
  labels = jnp.arange(_IMAGES.value) % NUM_CLASSES
  calls = {norm: make_workloads(norm, images, labels) for norm in NORMS}
  outputs = {}
  for norm, workloads in calls.items():
    for workload, call in workloads.items():
      outputs[norm, workload] = jax.block_until_ready(call())  # compiles
  # Both norms compute the same function. Their float32 image gradients are compared with a
  # float64 one (Flax's GroupNorm, where float64 leaves no visible rounding).
  with _float64():
    reference = np.asarray(
      make_workloads('flax_group_norm', jnp.asarray(images, jnp.float64), labels, jnp.float64)[
        'image_grad'
      ]()
    )
  errors = {}
  for norm in ('instance_norm', 'flax_group_norm'):
    difference = np.asarray(outputs[norm, 'image_grad'], np.float64) - reference
    error = np.linalg.norm(difference) / np.linalg.norm(reference)
    errors[norm] = float(error)
    print(f'image_grad with {norm}: relative error against float64 {errors[norm]:.2e}')
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  times = {key: [] for key in outputs}
  for _ in range(_REPEATS.value):  # interleaved, so that load changes hit every variant
    for norm, workloads in calls.items():
      for workload, call in workloads.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        times[norm, workload].append(time.perf_counter() - start)
  rows = []
  for (norm, workload), seconds in times.items():
    per_call = statistics.median(seconds)
    per_step = per_call / (_STEPS.value if workload == 'train' else 1)
    baseline = statistics.median(times['flax_group_norm', workload])
    rows.append(
      {
        'norm': norm,
        'workload': workload,
        'ms_per_step': 1e3 * per_step,
        'min_ms_per_step': 1e3 * min(seconds) / (_STEPS.value if workload == 'train' else 1),
        'time_vs_flax_group_norm': per_call / baseline,
      }
    )
  results = {
    **timing.environment(),
    'load_average_at_start': load,
    'images': _IMAGES.value,
    'steps': _STEPS.value,
    'repeats': _REPEATS.value,
    'image_grad_relative_error_vs_float64': errors,
    'rows': rows,
  }
  print(
    f'ConvNet, {_IMAGES.value} images 32x32x3, median of {_REPEATS.value} (load {load}):\n\n'
    '| workload | norm | ms per step | time vs Flax GroupNorm |\n|---|---|---|---|'
  )
  for row in rows:
    print(
      f'| {row["workload"]} | {row["norm"]} | {row["ms_per_step"]:.1f} | '
      f'{row["time_vs_flax_group_norm"]:.3f} |'
    )
  timing.write_results(_OUT.value, results)


if __name__ == '__main__':
  app.run(main)

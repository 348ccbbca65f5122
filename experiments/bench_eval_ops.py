"""Cost of per-network DSA ops in evaluation: shared vs per-network ops, looped vs vmapped networks.

  python experiments/bench_eval_ops.py                   # 5 ConvNets, 1 epoch on 500 images
  python experiments/bench_eval_ops.py --repeats=3 --out=/tmp/bench_eval_ops.json

Networks trained together either share each minibatch's DSA op (`share_augment_op=True`) or draw
their own (the default). `train.over_networks` loops over the networks on CPU (lax.map), where a
per-network op is still one `lax.switch` branch per network; under `vmap` (the accelerator path,
forced here with `batched=True`) a per-network op index is batched and `lax.switch` computes
every op of the strategy for every network. This times one epoch of --num_eval ConvNets on
--images random CIFAR-shaped (32x32x3) images for the four combinations, and the DSA ops alone
(--ops_epochs epochs' minibatches, no network) to show what the switch costs by itself.

Prints a markdown table and writes --out (JSON: date, jax version, machine, the figures).
"""

import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import timing  # experiments/timing.py (the script's folder is on sys.path)
from absl import app, flags

from dd_jax import augment as augment_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import models
from dd_jax import train as train_lib

_NUM_EVAL = flags.DEFINE_integer('num_eval', 5, 'Networks trained together.')
_IMAGES = flags.DEFINE_integer('images', 500, 'Training images (CIFAR-shaped, random).')
_MODEL = flags.DEFINE_string('model', 'ConvNet', 'Architecture.')
_REPEATS = flags.DEFINE_integer(
  'repeats', 1, 'Timed epochs per variant after the compiling one (median).'
)
_OPS_EPOCHS = flags.DEFINE_integer(
  'ops_epochs', 20, 'Epochs of minibatches the ops-alone timing draws ops for.'
)
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_bench_eval_ops.json'),
  'Results file (the committed record: --out=experiments/results/bench_eval_ops.json).',
)

NUM_CLASSES, IMAGE_SHAPE = 10, (32, 32, 3)
VARIANTS = [(batched, shared) for batched in (False, True) for shared in (True, False)]


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(seconds of the first call, compilation included; median seconds of `repeats` more)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _settings(shared: bool) -> train_lib.TrainSettings:
  return evaluate_lib.EvalSettings(
    epochs=1, num_eval=_NUM_EVAL.value, schedule='constant', share_augment_op=shared
  ).train_settings()


def time_epoch(images, labels, net, batched: bool, shared: bool) -> tuple[float, float]:
  """One training epoch of the stacked networks (train.make_epoch_fn over the networks)."""
  settings = _settings(shared)
  keys = jax.random.split(jax.random.key(1), _NUM_EVAL.value)
  carry = train_lib.init_networks(keys, net, IMAGE_SHAPE, settings.recipe.optimizer())
  epoch = jax.jit(
    train_lib.over_networks(train_lib.make_epoch_fn(net, images, labels, settings), batched=batched)
  )
  return _timed(lambda: epoch(carry, jnp.asarray(0), jax.random.key(2)), _REPEATS.value)


def time_ops_alone(images, batched: bool, shared: bool) -> tuple[float, float]:
  """The DSA ops of --ops_epochs epochs' minibatches for the stacked networks, no networks.

  Many draws, so that the time does not hang on which ops a few draws happened to pick.
  """
  settings = _settings(shared)
  batch_size = settings.recipe.batch_size
  num_batches = -(-images.shape[0] // batch_size)
  num_draws = num_batches * _OPS_EPOCHS.value
  batches = jnp.resize(images, (num_batches, batch_size, *IMAGE_SHAPE))  # full batches

  def one_network(network_key, shared_key):
    op_keys = jax.random.split(shared_key if shared else network_key, num_draws)
    param_keys = jax.random.split(jax.random.fold_in(network_key, 1), num_draws)

    def augment(total, inputs):
      op_key, param_key, draw = inputs
      out = augment_lib.apply_random_op(
        op_key, param_key, batches[draw % num_batches], settings.augment_strategy, siamese=False
      )
      return total + jnp.sum(out), None

    return jax.lax.scan(augment, 0.0, (op_keys, param_keys, jnp.arange(num_draws)))[0]

  keys = jax.random.split(jax.random.key(1), _NUM_EVAL.value)
  ops = jax.jit(train_lib.over_networks(one_network, batched=batched))
  return _timed(lambda: ops(keys, jax.random.key(2)), max(_REPEATS.value, 3))


def main(argv):
  del argv
  net = models.get_network(_MODEL.value, NUM_CLASSES)
  images = jax.random.normal(jax.random.key(0), (_IMAGES.value, *IMAGE_SHAPE))
  labels = jnp.arange(_IMAGES.value) % NUM_CLASSES
  results = {
    **timing.environment(),
    'load_average_at_start': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
    'model': _MODEL.value,
    'num_eval': _NUM_EVAL.value,
    'images': _IMAGES.value,
    'strategy': _settings(False).augment_strategy,
    'repeats': _REPEATS.value,
    'ops_epochs': _OPS_EPOCHS.value,
    'variants': [],
  }
  for batched, shared in VARIANTS:
    first, epoch_seconds = time_epoch(images, labels, net, batched, shared)
    ops_first, ops_seconds = time_ops_alone(images, batched, shared)
    record = {
      'networks': 'vmap' if batched else 'loop',
      'ops': 'shared' if shared else 'per-network',
      'epoch_s': epoch_seconds,
      'first_epoch_s': first,
      'ops_alone_ms_per_epoch': 1e3 * ops_seconds / _OPS_EPOCHS.value,
    }
    results['variants'].append(record)
    print(json.dumps(record), flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
    f.write('\n')
  print(format_table(results))
  print(f'wrote {_OUT.value}')


def format_table(results: dict) -> str:
  lines = [
    f'{results["device"]} ({results["machine"]}), jax {results["jax"]}, '
    f'{results["date"]}: {results["num_eval"]} {results["model"]}s x 1 epoch on '
    f'{results["images"]} 32x32x3 images, DSA {results["strategy"]}',
    '',
    '| networks | DSA ops | s / epoch | first call (compiles) | ops alone (ms / epoch) |',
    '|---|---|---|---|---|',
  ]
  for r in results['variants']:
    lines.append(
      f'| {r["networks"]} | {r["ops"]} | {r["epoch_s"]:.2f} | '
      f'{r["first_epoch_s"]:.2f} | {r["ops_alone_ms_per_epoch"]:.1f} |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)

"""The cost of the scale-free CC forms' unit: the real batch under the CC extractor.

  python experiments/bench_cc_real_spread.py            # CIFAR-10 shapes, budget=cpu batch

The 'relative' and 'threshold' CC forms divide by the real batch's within-class spread under the
CC extractor. On the matching network that spread comes from features the step already has; on a
pool member the step embeds the real batch through the member as well (forward only: the real
side carries no gradient). This prints, per extractor and CC form, the DM step's dense FLOPs
(dot products and convolutions from its jaxpr) and its median time over --repeats calls, both
forms measured in this one run, and writes them to --out.

Data: random images shaped like CIFAR-10 (the cost does not depend on pixels); the pool: --pool
randomly initialised ConvNets (trained weights cost the same).
"""

import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from dd_jax import data as data_lib
from dd_jax import extractors, flops, losses, models
from dd_jax import pool as pool_lib
from dd_jax.distill import base, dm

_IPC = flags.DEFINE_integer('ipc', 10, 'Synthetic images per class.')
_BATCH_REAL = flags.DEFINE_integer('batch_real', 64, 'Real images per class per step.')
_POOL = flags.DEFINE_integer('pool', 2, 'Pool members (randomly initialised ConvNets).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per setting (after one warm-up).')
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_cc_real_spread_cost.json'),
  'Results file (JSON; the committed record: --out=experiments/results/cc_real_spread_cost.json).',
)


def _dataset(num_classes=10, per_class=128):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(num_classes), per_class)
  images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
  return data_lib.Dataset(
    name='random-cifar10-shapes',
    train_images=images,
    train_labels=labels,
    test_images=images[:num_classes],
    test_labels=labels[:num_classes],
    class_names=tuple(str(k) for k in range(num_classes)),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
  )


def _random_pool(net, size):
  members = [net.init(jax.random.key(i), (1, 32, 32, 3)) for i in range(size)]
  variables = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *members)
  return pool_lib.Pool(net=net, variables=variables, metadata={})


def _measure(dataset, net, extractor, form):
  settings = base.DistillSettings(
    ipc=_IPC.value,
    batch_real=_BATCH_REAL.value,
    strategy='color_crop_cutout_flip_scale_rotate',
    model=net.name,
    lr=1.0,
    momentum=0.5,
    weights=losses.ObjectiveWeights(cc=0.1, cm=0.01, cc_form=form),
  )
  step = dm.make_dm_step(net, settings, base.DataSpec.of(dataset), extractor)
  labels = np.repeat(np.arange(dataset.num_classes), settings.ipc)
  images = jax.random.normal(jax.random.key(0), (len(labels), 32, 32, 3))
  state = base.init_state(images, labels, settings.image_optimizer(), jax.random.key(1))
  sampler = data_lib.ClassSampler.from_dataset(dataset)
  dense_flops = flops.count(step.jitted, *step.arguments(state, sampler))
  state, metrics = step(state, sampler)  # compiles
  jax.block_until_ready(metrics)
  seconds = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    state, metrics = step(state, sampler)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  return {'gflops': dense_flops / 1e9, 'ms': 1e3 * statistics.median(seconds)}


def main(argv):
  del argv
  dataset = _dataset(per_class=max(2 * _BATCH_REAL.value, 16))
  net = models.get_network('ConvNet', dataset.num_classes)
  candidates = {
    'matching_net': extractors.matching_net_extractor,
    'pool': extractors.pool_extractor(_random_pool(net, _POOL.value)),
  }
  rows = []
  for name, extractor in candidates.items():
    for form in ('squared', 'relative'):
      result = _measure(dataset, net, extractor, form)
      rows.append({'extractor': name, 'form': form, **result})
      print(f'{name} {form}: {result["gflops"]:.1f} GFLOP, {result["ms"]:.0f} ms', flush=True)
  lines = [
    f'DM step, ConvNet, 32x32x3, 10 classes, IPC {_IPC.value}, real batch {_BATCH_REAL.value} '
    f'per class; median of {_REPEATS.value} calls on {jax.devices()[0].device_kind}',
    '',
    '| CC extractor | form | dense GFLOP | ms / step | FLOP ratio | time ratio |',
    '|---|---|---|---|---|---|',
  ]
  for row in rows:
    squared = next(r for r in rows if r['extractor'] == row['extractor'] and r['form'] == 'squared')
    lines.append(
      f'| {row["extractor"]} | {row["form"]} | {row["gflops"]:.1f} | {row["ms"]:.0f} | '
      f'{row["gflops"] / squared["gflops"]:.2f} | {row["ms"] / squared["ms"]:.2f} |'
    )
  print('\n'.join(lines))
  with open(_OUT.value, 'w') as f:
    json.dump(
      {
        'rows': rows,
        'ipc': _IPC.value,
        'batch_real': _BATCH_REAL.value,
        'repeats': _REPEATS.value,
        'device': jax.devices()[0].device_kind,
        'machine': platform.machine(),
        'date': time.strftime('%Y-%m-%d'),
        'jax': jax.__version__,
      },
      f,
      indent=1,
    )
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)

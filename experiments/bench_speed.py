"""Speed benchmark: the jitted distillation step and the evaluation program at CIFAR-10 shapes.

  python experiments/bench_speed.py                       # DM, DM + IID, IDM + IID x IPC 1/10/50
  python experiments/bench_speed.py --ipcs=10 --methods=dm_iid --repeats=3
  python experiments/bench_speed.py --pytorch --ipcs=10     # and the PyTorch baseline, side by side
  python experiments/bench_speed.py --pytorch --ipcs=10 --methods=dm,m3d,dance --skip_eval

Data: random uint8 images shaped like CIFAR-10 (10 classes x `--per_class` 32x32x3 images; the
speed does not depend on the pixels), written once as an npz dataset so the steps are built by
the library's own `run.build_method`. IDM + IID uses CC on the matching network (no pool to
train); everything else is the config's (ConvNet, DSA, batch_real).

The IDC family (--methods m3d, dance, m3d_iid, dance_iid): the step of `distill.family` with the
method's presets (factor-2 multi-formation, "mix" initialisation, IDC DiffAug color_crop_cutout
with one draw per class, one SGD step per class, momentum 0.5; M3D's Gaussian MMD on a random
ConvNet re-drawn every 5 iterations; DANCE's interpolated pool member and its calibration pass),
except batch_real, which is --batch_real for every method (the presets' are 64 for M3D and 128
for DANCE). DANCE's pool is not trained: 5 members whose "initial" weights are those
`pool.initial_variables` draws and whose "final" weights are another draw of the same
initialiser (pool seed + 1), handed to the step as a loaded pool would be. The step's work does
not depend on the weights, only on their shapes. The `_iid` variants add the reference CC
(squared, 0.05) and CM (0.01) on the matching network.

Per method and IPC: milliseconds per step (median of --repeats after one warm-up call that
compiles), real images embedded per second, the step's dense FLOPs (dot products and
convolutions counted from its jaxpr traced with im2col convolutions, scans multiplied out: the
backbone's FLOPs on real and synthetic images, forward and backward, as direct convolution
does them; Winograd layers multiply less, so their FLOP/s are effective ones) and FLOP/s; the
ceiling is the dense float32 matmul FLOP/s measured in the same run (median over a few square
sizes, best size reported); peak memory is XLA's compile-time estimate (arguments + outputs +
temporaries), and the device's measured peak where the backend reports one (GPU).

Evaluation: one epoch of --num_eval networks trained together (train.over_networks: vmap on
accelerators, a loop on CPU, as `Lowering.loop_networks` says; each network draws its own DSA
ops) vs the same networks one at a time, on --eval_images synthetic images (default 500 = IPC
50), median of repeats.

--pytorch (needs the `bench` extra: pip install -e '.[bench]'): the same steps and the same
evaluation epoch (one network) in a straightforward PyTorch implementation of the reference
code's per-class loops (experiments/torch_baseline.py, same shapes and work, all cores), called
alternately with their dd_jax counterparts, --repeats pairs each (`timing.alternate`: on a shared
machine the speed drifts between batches of calls); the table gives both medians and the median
ratio PyTorch / dd_jax over the pairs, with its lowest and highest. DM + IID uses the reference
weights on both sides (the squared CC form). The family's PyTorch steps (`m3d_step`,
`dance_step`, `ncfm_step`, `dsdm_step`) compute an iteration as the official codes do: images in
[0, 1] clamped and normalised inside the augmentation, a Python loop over classes with
`optimizer.step()` per class (DANCE, NCFM: twice, match and calibration passes), decode by
`F.interpolate`, the pool's state dicts interpolated (DSDM: a member's final weights) and loaded
per iteration (in memory; the official DANCE reads two checkpoints from disk every iteration,
which is not timed here). NCFM: config.ncfm.num_frequencies (4096) Gaussian frequencies drawn
per class step, every class's first --batch_real images, AdamW, and ReduceLROnPlateau stepped
per iteration (timed; cheap); DSDM: [D, D] covariances, SGD, then the no-grad prototype pass.

The programs follow the run's lowering (--lowering, `dd_jax.lowering`; records name it with
the fields a variant changes). The --before_* flags time a variant of it in the same run, built
with `dataclasses.replace` and passed to the steps and the evaluation explicitly:
--before_conv_impl=im2col: the IDM steps and the evaluation again, with the trained networks'
convolutions (`Lowering.train_conv`) as im2col (the CPU code before Winograd layers).
--before_microbatch=0: the same, with every SGD step's gradient in one pass over its batch (the
CPU code before micro-batching, `train.sgd_step`; n > 0: passes of n 32x32 images,
`Lowering.microbatch_pixels`).
--before_fold_norm=false: every step (DM's too) and the evaluation again, with the first layer's
instance norm applied to its output instead of folded into it (`kernels.conv_instance_norm`;
`fold_norm` of `train_conv` and `synthetic_conv`). The three flags combine.

Writes --out (JSON) and prints a markdown table.
"""

import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import timing  # experiments/timing.py (the script's folder is on sys.path)
from absl import app, flags

from dd_jax import config as config_lib
from dd_jax import evaluate as evaluate_lib
from dd_jax import experiment, models, presets, protocols, run
from dd_jax import flops as flops_lib
from dd_jax import lowering as lowering_lib
from dd_jax import pool as pool_lib
from dd_jax import settings as settings_lib
from dd_jax import train as train_lib
from dd_jax.distill import base, methods
from dd_jax.models import kernels

_IPCS = flags.DEFINE_list('ipcs', ['1', '10', '50'], 'Images per class.')
_METHODS = flags.DEFINE_list(
  'methods',
  ['dm', 'dm_iid', 'idm_iid'],
  'Step variants to time: dm, dm_iid, idm_iid (and idm), m3d, dance, ncfm, dsdm (and their _iid '
  'variants).',
)
_BATCH_REAL = flags.DEFINE_integer('batch_real', 256, 'Real images per class and step.')
_PER_CLASS = flags.DEFINE_integer('per_class', 300, 'Random training images per class.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (median).')
_NUM_EVAL = flags.DEFINE_integer('num_eval', 5, 'Evaluation networks.')
_EVAL_IMAGES = flags.DEFINE_integer('eval_images', 500, 'Images the evaluation trains on.')
_SYN_ONE_PASS = flags.DEFINE_bool(
  'syn_one_pass',
  False,
  'DM steps embed the synthetic images in one pass (distill.syn_chunk = all), not in the '
  "CPU default's chunks: the code before chunking.",
)
_LOWERING = flags.DEFINE_enum(
  'lowering',
  'auto',
  lowering_lib.NAMES,
  "The programs' lowering (config.compute.lowering; 'auto': the default backend's).",
)
_BEFORE_CONV_IMPL = flags.DEFINE_enum(
  'before_conv_impl',
  None,
  kernels.CONV_IMPLS,
  "Also time the IDM steps and the evaluation with the trained networks' convolutions "
  "(Lowering.train_conv) as this ('im2col': the CPU code before Winograd), in the same run; "
  'the table gives both.',
)
_BEFORE_MICROBATCH = flags.DEFINE_integer(
  'before_microbatch',
  None,
  'Also time the IDM steps and the evaluation with this many images per gradient pass of the '
  "networks' SGD steps (Lowering.microbatch_pixels; 0: the whole batch, the code before "
  'micro-batching), in the same run.',
)
_BEFORE_FOLD_NORM = flags.DEFINE_bool(
  'before_fold_norm',
  None,
  "Also time the steps and the evaluation with this fold_norm in the lowering's train_conv and "
  "synthetic_conv (false: the first layer's instance norm applied to its output, the code "
  'before folding), in the same run.',
)
_CLASS_GRADIENTS = flags.DEFINE_enum(
  'class_gradients',
  None,
  ['together', 'one_by_one'],
  "The IDC family's per-class gradients (config.family.class_gradients; default the config's).",
)
_SKIP_EVAL = flags.DEFINE_bool('skip_eval', False, 'Do not time the evaluation program.')
_EVAL_PROTOCOLS = flags.DEFINE_list(
  'eval_protocols',
  ['dm'],
  'The evaluation protocols (dd_jax.protocols) whose training epoch is timed; the first is the '
  "one --before_* and --pytorch compare, e.g. dm,idc (idc: batch 64, IDC's augmentation per "
  'image, CutMix 0.5).',
)
_PYTORCH = flags.DEFINE_bool(
  'pytorch', False, 'Also time the PyTorch baseline (experiments/torch_baseline.py; bench extra).'
)
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(tempfile.gettempdir(), 'dd_jax_bench_speed.json'),
  'Results file (the committed record: --out=experiments/results/bench_speed.json).',
)

NUM_CLASSES, IMAGE_SHAPE = 10, (32, 32, 3)
FAMILY_METHODS = ('m3d', 'dance', 'ncfm', 'dsdm')  # the IDC family's methods (`distill.family`)
TORCH_FAMILY_BASELINES = ('m3d', 'dance', 'ncfm', 'dsdm')  # with a step in torch_baseline.py
BENCH_POOL_SIZE = 5  # the pooled methods' untrained pool: the members an iteration draws from


# ----------------------------------------------------------------------------------- timing


def _lowering() -> lowering_lib.Lowering:
  """The lowering of the timed programs (--lowering)."""
  return lowering_lib.resolve(_LOWERING.value)


def _before(lowering: lowering_lib.Lowering) -> lowering_lib.Lowering | None:
  """`lowering` as the --before_* flags change it; None without them."""
  changes = {}
  train_conv, synthetic_conv = lowering.train_conv, lowering.synthetic_conv
  if _BEFORE_CONV_IMPL.value is not None:
    train_conv = dataclasses.replace(train_conv, impl=_BEFORE_CONV_IMPL.value)
  if _BEFORE_FOLD_NORM.value is not None:
    train_conv = dataclasses.replace(train_conv, fold_norm=_BEFORE_FOLD_NORM.value)
    synthetic_conv = dataclasses.replace(synthetic_conv, fold_norm=_BEFORE_FOLD_NORM.value)
    changes['synthetic_conv'] = synthetic_conv
  if _BEFORE_CONV_IMPL.value is not None or _BEFORE_FOLD_NORM.value is not None:
    changes['train_conv'] = train_conv
  if _BEFORE_MICROBATCH.value is not None:
    changes['microbatch_pixels'] = _BEFORE_MICROBATCH.value * IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
  return dataclasses.replace(lowering, **changes) if changes else None


def _direct(lowering: lowering_lib.Lowering) -> lowering_lib.Lowering:
  """`lowering` with its convolutions as direct convolution does them, to count FLOPs: Winograd
  layers as im2col (Winograd multiplies less), no folded norm (which adds a little)."""
  direct = lambda conv: kernels.ConvLowering('im2col' if conv.impl == 'winograd' else conv.impl)
  return dataclasses.replace(
    lowering,
    train_conv=direct(lowering.train_conv),
    real_conv=direct(lowering.real_conv),
    synthetic_conv=direct(lowering.synthetic_conv),
  )


def _memory(compiled) -> float | None:
  try:
    analysis = compiled.memory_analysis()
    return float(
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
  except Exception:  # pylint: disable=broad-except
    return None


def _device_peak() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None


def _dataset_npz(directory: str) -> str:
  rng = np.random.default_rng(0)
  count = NUM_CLASSES * _PER_CLASS.value
  path = os.path.join(directory, 'bench.npz')
  np.savez(
    path,
    x_train=rng.integers(0, 256, (count, *IMAGE_SHAPE), np.uint8),
    y_train=np.repeat(np.arange(NUM_CLASSES), _PER_CLASS.value),
    x_test=rng.integers(0, 256, (100, *IMAGE_SHAPE), np.uint8),
    y_test=np.arange(100) % NUM_CLASSES,
  )
  return path


def _config(dataset_path: str, method: str, ipc: int):
  config = config_lib.default_config()
  config.dataset.name = f'npz:{dataset_path}'
  config.dataset.normalization = 'cifar10'
  config.compute.lowering = _LOWERING.value
  config.ipc = ipc
  presets.set_method(config, method, iid='reference')
  config.constraints.cc.extractor = 'matching_net'
  config.distill.batch_real = _BATCH_REAL.value
  config.idm.train_batch_size = _BATCH_REAL.value
  if methods.get(config.method).uses_pool:  # `_untrained_pool` stands in for the trained one
    config.pool.size = BENCH_POOL_SIZE
    config.family.pool_members = BENCH_POOL_SIZE
  if _SYN_ONE_PASS.value:
    config.distill.syn_chunk = NUM_CLASSES * ipc
  if _CLASS_GRADIENTS.value:
    config.family.class_gradients = _CLASS_GRADIENTS.value
  return config


def _untrained_pool(
  settings: experiment.ExperimentSettings, data: run.PreparedData
) -> pool_lib.Pool:
  """DANCE's pool without training: the members' initial weights as `pool.initial_variables`
  draws them, and as their "final" weights another draw of the same initialiser (the pool's
  seed + 1). The step's work depends on the weights' shapes only."""
  pool_settings, dataset = settings.pool, data.dataset
  net = models.get_network(
    pool_settings.model, dataset.num_classes, conv=settings.lowering.train_conv
  )
  shape = tuple(dataset.image_shape)
  other = dataclasses.replace(pool_settings, seed=pool_settings.seed + 1)
  return pool_lib.Pool(
    net=net,
    variables=pool_lib.initial_variables(other, net, shape),
    metadata={'image_shape': list(shape)},
    settings=pool_settings,
  )


def _prepare_data(settings: experiment.ExperimentSettings) -> run.PreparedData:
  """`run.prepare_data`, with `_untrained_pool` as the pool of a method that uses one (DANCE):
  `run.pool_of` then finds it instead of training one."""
  data = run.prepare_data(settings)
  if settings.method.uses_pool:
    data.pools[settings.pool.directory] = _untrained_pool(settings, data)
  return data


def _step(settings: experiment.ExperimentSettings, data: run.PreparedData) -> base.Step:
  """The configured method's step on `data`, with `settings.lowering`."""
  method, distill, lowering = settings.method, settings.distill, settings.lowering
  net = method.network(distill, data.dataset.num_classes, lowering)
  extractor = run.centralization_extractor(settings, data)
  pool = {'pool': run.pool_of(settings, data)} if method.uses_pool else {}
  return method.make_step(net, distill, base.DataSpec.of(data.dataset), lowering, extractor, **pool)


def time_step(
  config, method: str, ipc: int, lowering: lowering_lib.Lowering | None = None
) -> tuple[dict, Callable[[], Any]]:
  """The step's record (ms per step, FLOPs, memory) and a function that runs one more step.

  `lowering`: the programs' (default: the config's, --lowering).
  """
  settings = experiment.validate_config(config)
  if lowering is not None:
    settings = dataclasses.replace(settings, lowering=lowering)
  data = _prepare_data(settings)
  prepared = run.build_method(settings, data)
  calls = {'state': prepared.state}

  def one_step():
    calls['state'], metrics = prepared.step(calls['state'], data.sampler)
    return metrics

  seconds = timing.median_seconds(one_step, _REPEATS.value)
  jitted, args = prepared.step.jitted, prepared.step.arguments(calls['state'], data.sampler)
  compiled_bytes = _memory(jitted.lower(*args).compile())
  record = {
    'method': method,
    'ipc': ipc,
    'lowering': timing.describe(settings.lowering),
    'ms_per_step': 1e3 * seconds,
    'real_images_per_s': NUM_CLASSES * _BATCH_REAL.value / seconds,
  }
  # The work of direct convolutions, whatever the implementation: Winograd's products are fewer
  # (its FLOP/s are effective ones), the folded norm adds a little.
  direct = _step(dataclasses.replace(settings, lowering=_direct(settings.lowering)), data)
  record['flops'] = flops_lib.dense_flops(jax.make_jaxpr(direct.jitted)(*args))
  record['flop_per_s'] = record['flops'] / seconds
  record['compiled_bytes'] = compiled_bytes
  record['device_peak_bytes'] = _device_peak()
  return record, one_step


def _train_fn(lowering: lowering_lib.Lowering, images, labels, protocol: str = 'dm'):
  """keys -> one training epoch of `protocol` (at a constant lr) of a ConvNet per key, as
  `lowering` says."""
  net = models.get_network('ConvNet', NUM_CLASSES, conv=lowering.train_conv)
  # One epoch at a constant lr (the protocols' schedules change the lr between epochs only).
  section = protocols.resolve(
    {'protocol': protocol, 'epochs': 1, 'num_eval': _NUM_EVAL.value, 'schedule': 'constant',
     'milestones': (), 'gamma': train_lib.MULTISTEP_GAMMA, 'eval_every': 0}
  )  # fmt: skip
  recipe = settings_lib.from_section(train_lib.OptimizerRecipe, section, 'eval')
  settings = settings_lib.from_section(
    evaluate_lib.EvalSettings, section, 'eval', recipe=recipe
  ).train_settings()

  def train(keys):
    with lowering.precision_scope():
      return train_lib.train_networks(keys, images, labels, net, settings, lowering)

  return train


def time_evaluation(
  repeats: int, lowering: lowering_lib.Lowering, protocol: str = 'dm'
) -> tuple[dict, Callable[[], Any]]:
  """The record of one training epoch of `protocol` and a function that trains one network for
  one more epoch."""
  images = jax.random.normal(jax.random.key(0), (_EVAL_IMAGES.value, *IMAGE_SHAPE))
  labels = jnp.arange(_EVAL_IMAGES.value) % NUM_CLASSES
  keys = jax.random.split(jax.random.key(1), _NUM_EVAL.value)
  train = jax.jit(_train_fn(lowering, images, labels, protocol))
  together = timing.median_seconds(lambda: train(keys), repeats)
  alone = _NUM_EVAL.value * timing.median_seconds(lambda: train(keys[:1]), repeats)
  # One network's epoch, as direct convolutions count it (as for the steps).
  flops = flops_lib.dense_flops(
    jax.make_jaxpr(_train_fn(_direct(lowering), images, labels, protocol))(keys[:1])
  )
  return {
    'protocol': protocol,
    'lowering': timing.describe(lowering),
    'num_eval': _NUM_EVAL.value,
    'images': _EVAL_IMAGES.value,
    'together_s_per_epoch': together,
    'one_at_a_time_s_per_epoch': alone,
    'speedup': alone / together,
    'flops_per_network_epoch': flops,
    'flop_per_s_one_at_a_time': flops * _NUM_EVAL.value / alone,
  }, lambda: train(keys[:1])


# ------------------------------------------------------------------------- PyTorch baseline


def torch_step(config, method: str, ipc: int) -> Callable[[], float]:
  """The PyTorch baseline's step of `method` at `ipc` on random data of the bench's shapes."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_baseline  # pylint: disable=import-outside-toplevel

  if method.startswith(FAMILY_METHODS):
    return torch_family_step(config, method, ipc)
  generator = torch.Generator().manual_seed(0)
  real_by_class = [
    torch.randn(_PER_CLASS.value, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2], generator=generator)
    for _ in range(NUM_CLASSES)
  ]
  images = torch.randn(NUM_CLASSES * ipc, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2], generator=generator)
  images.requires_grad_(True)
  cc, cm = config.constraints.cc.weight, config.constraints.cm.weight
  weights = torch_baseline.Weights(cc=cc, cm=cm)
  if method.startswith('idm'):
    optimizer = torch.optim.SGD([images], lr=config.distill.lr, momentum=config.distill.momentum)
    queue = [
      torch_baseline.queue_net(IMAGE_SHAPE[2], NUM_CLASSES, IMAGE_SHAPE[0])
      for _ in range(config.idm.queue_init)
    ]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(_PER_CLASS.value)
    step = lambda: torch_baseline.idm_step(
      images,
      optimizer,
      real_by_class,
      (torch.cat(real_by_class), labels),
      queue,
      _BATCH_REAL.value,
      weights,
      generator,
      ce_weight=config.idm.ce_weight,
      train_nets=config.idm.train_nets,
      train_steps=config.idm.train_steps,
      train_batch=config.idm.train_batch_size,
    )
  else:
    optimizer = torch.optim.SGD([images], lr=config.distill.lr, momentum=config.distill.momentum)
    step = lambda: torch_baseline.dm_step(
      images, optimizer, real_by_class, _BATCH_REAL.value, weights, generator
    )
  return step


def torch_family_step(config, method: str, ipc: int) -> Callable[[], float]:
  """The PyTorch baseline's M3D, DANCE, NCFM or DSDM iteration at `ipc`: random pixels in [0, 1]
  (the codes keep images in pixel space and normalise inside the augmentation), the config's
  image optimizer (config.distill.optimizer: SGD with momentum, or AdamW; its lr and weight
  decay), factor, network_every, calibration passes, pool members, fixed real subset and plateau
  schedule (NCFM's ReduceLROnPlateau, stepped once per iteration), and the ncfm / dsdm sections.
  NCFM's sampling network has no baseline."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_baseline  # pylint: disable=import-outside-toplevel

  generator = torch.Generator().manual_seed(0)
  channels, side = IMAGE_SHAPE[2], IMAGE_SHAPE[0]
  real_by_class = [
    torch.rand(_PER_CLASS.value, channels, side, side, generator=generator)
    for _ in range(NUM_CLASSES)
  ]
  images = torch.rand(NUM_CLASSES * ipc, channels, side, side, generator=generator)
  images.requires_grad_(True)
  distill = config.distill
  if distill.optimizer == 'adamw':
    optimizer = torch.optim.AdamW(
      [images], lr=distill.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=distill.weight_decay
    )
  else:  # coupled weight decay, as optax's add_decayed_weights before sgd
    optimizer = torch.optim.SGD(
      [images], lr=distill.lr, momentum=distill.momentum, weight_decay=distill.weight_decay
    )
  weights = torch_baseline.Weights(cc=config.constraints.cc.weight, cm=config.constraints.cm.weight)
  family = config.family
  if method.startswith('m3d'):
    networks = torch_baseline.RandomNetworks(
      channels, NUM_CLASSES, side, every=family.network_every
    )
    return lambda: torch_baseline.m3d_step(
      images,
      optimizer,
      real_by_class,
      _BATCH_REAL.value,
      networks,
      generator,
      weights,
      factor=family.factor,
    )
  pool = torch_baseline.dance_pool(channels, NUM_CLASSES, side, members=family.pool_members)
  if method.startswith('dsdm'):
    dsdm, prototypes = config.dsdm, torch_baseline.Prototypes()
    return lambda: torch_baseline.dsdm_step(
      images,
      optimizer,
      real_by_class,
      _BATCH_REAL.value,
      pool,
      prototypes,
      generator,
      weights,
      factor=family.factor,
      covariance_weight=dsdm.covariance_weight,
      prototype_weight=dsdm.prototype_weight,
      prototype_momentum=dsdm.prototype_momentum,
    )
  if method.startswith('ncfm'):
    ncfm = config.ncfm
    if ncfm.sampling_net:
      raise app.UsageError('--pytorch: the NCFM baseline has no sampling network.')
    scheduler = None
    if family.plateau_factor:
      scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode='min', factor=family.plateau_factor, patience=family.plateau_patience
      )
    return lambda: torch_baseline.ncfm_step(
      images,
      optimizer,
      real_by_class,
      _BATCH_REAL.value,
      pool,
      generator,
      weights,
      factor=family.factor,
      calibration_passes=family.calibration_passes,
      num_frequencies=ncfm.num_frequencies,
      amplitude_weight=ncfm.amplitude_weight,
      phase_weight=ncfm.phase_weight,
      scale=ncfm.scale,
      fixed_real=family.fixed_real,
      scheduler=scheduler,
    )
  return lambda: torch_baseline.dance_step(
    images,
    optimizer,
    real_by_class,
    _BATCH_REAL.value,
    pool,
    generator,
    weights,
    factor=family.factor,
    calibration_passes=family.calibration_passes,
  )


def torch_evaluation_epoch() -> Callable[[], float]:
  """One evaluation epoch of one ConvNet in the PyTorch baseline (per network-epoch)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_baseline  # pylint: disable=import-outside-toplevel

  generator = torch.Generator().manual_seed(0)
  images = torch.randn(_EVAL_IMAGES.value, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2], generator=generator)
  labels = torch.arange(_EVAL_IMAGES.value) % NUM_CLASSES
  net = torch_baseline.ConvNet(IMAGE_SHAPE[2], NUM_CLASSES, image_size=IMAGE_SHAPE[0])
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  return lambda: torch_baseline.evaluation_epoch(net, optimizer, images, labels, generator)


def main(argv):
  del argv
  ceiling, size = timing.matmul_ceiling(_REPEATS.value)
  device = jax.devices()[0]
  lowering, before = _lowering(), _before(_lowering())
  results = {
    'date': time.strftime('%Y-%m-%d'),
    'device': f'{device.platform}: {device.device_kind}',
    'host': f'{platform.machine()}, {timing.cpu_name()}, {os.cpu_count()} cores',
    'jax': jax.__version__,
    'lowering': timing.describe(lowering),
    'batch_real': _BATCH_REAL.value,
    'syn_one_pass': _SYN_ONE_PASS.value,
    'matmul_flop_per_s': ceiling,
    'matmul_size': size,
    'steps': [],
  }
  print(
    f'{results["device"]} ({results["host"]}, jax {jax.__version__}): dense matmul '
    f'{ceiling / 1e9:.1f} GFLOP/s (float32, {size}x{size})',
    flush=True,
  )
  with tempfile.TemporaryDirectory() as directory:
    dataset_path = _dataset_npz(directory)
    for method in _METHODS.value:
      for ipc in map(int, _IPCS.value):
        config = _config(dataset_path, method, ipc)
        record, one_step = time_step(config, method, ipc)
        if 'flop_per_s' in record:
          record['fraction_of_matmul'] = record['flop_per_s'] / ceiling
        results['steps'].append(record)
        print(json.dumps(record), flush=True)
        # The trained networks' convolutions and micro-batches only change IDM's steps.
        if before is not None and (method.startswith('idm') or _BEFORE_FOLD_NORM.value is not None):
          record, _ = time_step(config, method, ipc, before)
          record['fraction_of_matmul'] = record['flop_per_s'] / ceiling
          results.setdefault('before_steps', []).append(record)
          print(json.dumps({'before': record}), flush=True)
        if _PYTORCH.value:
          pair = timing.alternate(one_step, torch_step(config, method, ipc), _REPEATS.value)
          record = {'method': method, 'ipc': ipc, **_milliseconds(pair)}
          results.setdefault('pytorch_steps', []).append(record)
          print(json.dumps({'pytorch': record}), flush=True)
  if not _SKIP_EVAL.value:
    first, *others = _EVAL_PROTOCOLS.value
    results['evaluation'], one_network_epoch = time_evaluation(
      max(2, _REPEATS.value // 2), lowering, first
    )
    for protocol in others:
      record, _ = time_evaluation(max(2, _REPEATS.value // 2), lowering, protocol)
      results.setdefault('other_evaluations', []).append(record)
    for record in [results['evaluation'], *results.get('other_evaluations', [])]:
      record['fraction_of_matmul'] = record['flop_per_s_one_at_a_time'] / ceiling
      print(json.dumps(record), flush=True)
    if before is not None:
      results['before_evaluation'], _ = time_evaluation(max(2, _REPEATS.value // 2), before)
      results['before_evaluation']['fraction_of_matmul'] = (
        results['before_evaluation']['flop_per_s_one_at_a_time'] / ceiling
      )
      print(json.dumps({'before': results['before_evaluation']}), flush=True)
    if _PYTORCH.value:
      pair = timing.alternate(one_network_epoch, torch_evaluation_epoch(), _REPEATS.value)
      results['pytorch_evaluation'] = {'images': _EVAL_IMAGES.value, **pair}
      print(json.dumps({'pytorch': results['pytorch_evaluation']}), flush=True)
  with open(_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
    f.write('\n')
  print(format_table(results))
  print(f'wrote {_OUT.value}')


def _milliseconds(pair: dict) -> dict:
  """A step's `timing.alternate` record in the table's units."""
  return {
    'ms_per_step': 1e3 * pair['theirs_s'],
    'dd_jax_ms_per_step': 1e3 * pair['ours_s'],
    **{key: pair[key] for key in ('ratio', 'ratio_min', 'ratio_max')},
  }


def _ratio_text(record: dict) -> str:
  return f'{record["ratio"]:.2f}x ({record["ratio_min"]:.2f}-{record["ratio_max"]:.2f})'


def format_table(results: dict) -> str:
  lines = [
    f'{results["device"]}, {results["host"]}, jax {results["jax"]}, {results["date"]}; '
    f'batch_real {results["batch_real"]}; dense matmul ceiling '
    f'{results["matmul_flop_per_s"] / 1e9:.1f} GFLOP/s',
    '',
    '| method | IPC | ms / step | real img / s | GFLOP / step | GFLOP/s | of matmul | '
    'memory (XLA est.) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in results['steps'] + results.get('before_steps', []):
    flops = r.get('flops')
    memory = r.get('compiled_bytes')
    lines.append(
      f'| {r["method"]} ({r.get("lowering", "?")}) | {r["ipc"]} | {r["ms_per_step"]:.0f} | '
      f'{r["real_images_per_s"]:.0f} | '
      + (
        f'{flops / 1e9:.1f} | {r["flop_per_s"] / 1e9:.1f} | {100 * r["fraction_of_matmul"]:.0f}% | '
        if flops
        else '- | - | - | '
      )
      + (f'{memory / 2**20:.0f} MiB |' if memory else '- |')
    )
  if 'evaluation' in results:
    e = results['evaluation']
    lines += [
      '',
      f'Evaluation, one epoch on {e["images"]} images: {e["num_eval"]} ConvNets '
      f'together {e["together_s_per_epoch"]:.2f} s, one at a time '
      f'{e["one_at_a_time_s_per_epoch"]:.2f} s ({e["speedup"]:.2f}x).',
    ]
  evaluations = [results[k] for k in ('evaluation', 'before_evaluation') if k in results]
  for e in evaluations + results.get('other_evaluations', []):
    if e:
      lines.append(
        f'Evaluation ({e.get("protocol", "dm")} protocol) with lowering {e.get("lowering", "?")}: '
        f'{e["one_at_a_time_s_per_epoch"] / e["num_eval"]:.3f} s per network-epoch'
        + (
          f', {e["flops_per_network_epoch"] / 1e9:.1f} GFLOP, '
          f'{e["flop_per_s_one_at_a_time"] / 1e9:.1f} GFLOP/s, '
          f'{100 * e["fraction_of_matmul"]:.0f}% of matmul.'
          if 'fraction_of_matmul' in e
          else '.'
        )
      )
  if 'pytorch_steps' in results or 'pytorch_evaluation' in results:
    lines += [
      '',
      'PyTorch baseline (experiments/torch_baseline.py) on the same machine, same run:',
      '',
      'Calls alternated, dd_jax then PyTorch; medians, and the median ratio over the pairs '
      '(lowest - highest).',
      '',
      '| workload | PyTorch | dd_jax | PyTorch / dd_jax |',
      '|---|---|---|---|',
    ]
    for r in results.get('pytorch_steps', []):
      lines.append(
        f'| {r["method"]} step, IPC {r["ipc"]} | {r["ms_per_step"]:.0f} ms | '
        f'{r["dd_jax_ms_per_step"]:.0f} ms | {_ratio_text(r)} |'
      )
    if 'pytorch_evaluation' in results:
      r = results['pytorch_evaluation']
      lines.append(
        f'| evaluation, {r["images"]} images, per network-epoch | {r["theirs_s"]:.3f} s | '
        f'{r["ours_s"]:.3f} s | {_ratio_text(r)} |'
      )
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)

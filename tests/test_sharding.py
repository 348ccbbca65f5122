"""The DM step split across 4 simulated CPU devices equals the one-device step.

jax fixes its device count at start-up, so the comparison runs in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (this file's __main__).
"""

import json
import os
import subprocess
import sys

import pytest

STEPS = 3


def _compare(num_nets: int, num_devices: int) -> dict:
  """Runs STEPS DM + IID steps on one device and on a mesh; returns the largest differences."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from dd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dd_jax import losses  # pylint: disable=g-import-not-at-top
  from dd_jax import models  # pylint: disable=g-import-not-at-top
  from dd_jax import sharding  # pylint: disable=g-import-not-at-top
  from dd_jax.distill import dm  # pylint: disable=g-import-not-at-top

  digits = data_lib.load_dataset('digits')
  ipc = 2
  net = models.get_network('ConvNetW32', digits.num_classes)
  settings = dm.DMSettings(num_classes=digits.num_classes, ipc=ipc, batch_real=8,
                           num_nets=num_nets, strategy='color_crop_cutout_scale_rotate',
                           weights=losses.ObjectiveWeights(cc=0.05, cm=0.01),
                           mean=digits.mean, std=digits.std)
  optimizer = optax.sgd(1.0, momentum=0.5)
  labels = np.repeat(np.arange(digits.num_classes), ipc)
  images = jax.random.normal(jax.random.key(0), (len(labels), 8, 8, 1))
  sampler = data_lib.ClassSampler.from_dataset(digits)

  def run(mesh):
    state = dm.init_state(images, labels, optimizer, jax.random.key(1))
    if mesh is not None:
      state = sharding.place_state(state, mesh)
    step = dm.make_dm_step(net, settings, optimizer, mesh=mesh)
    history = []
    for _ in range(STEPS):
      state, metrics = step(state, sampler)
      history.append({k: float(v) for k, v in metrics.items()})
    return state, history

  single, single_metrics = run(None)
  mesh = sharding.class_mesh(num_devices, num_nets=num_nets)
  split, split_metrics = run(mesh)
  shard_rows = sorted({shard.data.shape[0] for shard in split.images.addressable_shards})
  # A checkpoint of the split state restores with the same values and placement.
  import tempfile  # pylint: disable=g-import-not-at-top
  from dd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = checkpoint.Checkpointer(directory)
    checkpointer.save(STEPS, split)
    restored = checkpointer.restore_latest(split)
    checkpointer.close()
  restored_ok = (restored.images.sharding == split.images.sharding and
                 bool(np.array_equal(restored.images, split.images)))
  return {
      'devices': len(jax.devices()),
      'mesh': dict(mesh.shape),
      'image_devices': len(split.images.sharding.device_set),
      'shard_rows': shard_rows,
      'restored_ok': restored_ok,
      'max_image_difference': float(np.max(np.abs(np.asarray(split.images) -
                                                  np.asarray(single.images)))),
      'max_image_magnitude': float(np.max(np.abs(np.asarray(single.images)))),
      'max_relative_metric_difference': max(
          abs(a[k] - b[k]) / max(abs(a[k]), 1e-6)
          for a, b in zip(single_metrics, split_metrics) for k in a),
  }


@pytest.mark.parametrize('num_nets, expected_mesh, expected_rows', [
    # 20 image rows on 4 devices; inside the step the 10 classes split unevenly (3, 3, 3, 1).
    (1, {'nets': 1, 'classes': 4}, [5]),
    (2, {'nets': 2, 'classes': 2}, [10]),  # 2 networks on 2 devices, classes on 2
])
def test_four_device_step_equals_one_device(num_nets, expected_mesh, expected_rows):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, __file__, str(num_nets)], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert found['devices'] == 4
  assert found['mesh'] == expected_mesh
  assert found['image_devices'] == 4
  # Each device holds only its rows (replicated over the nets axis when it is > 1).
  assert found['shard_rows'] == expected_rows
  assert found['restored_ok']
  assert found['max_image_difference'] <= 1e-4 * max(1.0, found['max_image_magnitude'])
  assert found['max_relative_metric_difference'] < 1e-4


if __name__ == '__main__':
  print(json.dumps(_compare(num_nets=int(sys.argv[1]), num_devices=4)))

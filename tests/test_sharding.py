"""The DM step split across devices and processes equals the one-device step.

jax fixes its devices at start-up, so the comparisons run in subprocesses (this file's
__main__): one process with 4 simulated CPU devices, and two processes with one CPU device each
joined by jax.distributed (gloo collectives), as on two hosts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.integration  # several devices and processes, as subprocesses

STEPS = 3


def _compare(num_nets: int, num_devices: int, checkpoint_dir: str) -> dict:
  """Runs STEPS DM + IID steps on one device and on a mesh; returns the largest differences."""
  # pylint: disable=g-import-not-at-top
  import jax

  from dd_jax import checkpoint, losses, models, sharding
  from dd_jax import data as data_lib
  from dd_jax.distill import base, dm
  from dd_jax.lowering import CPU
  # pylint: enable=g-import-not-at-top

  digits = data_lib.load_dataset('digits')
  ipc = 2
  net = models.get_network('ConvNetW32', digits.num_classes)
  settings = base.DistillSettings(
    ipc=ipc,
    batch_real=8,
    num_nets=num_nets,
    strategy='color_crop_cutout_scale_rotate',
    model='ConvNetW32',
    weights=losses.ObjectiveWeights(cc=0.05, cm=0.01),
  )
  labels = np.repeat(np.arange(digits.num_classes), ipc)
  images = jax.random.normal(jax.random.key(0), (len(labels), 8, 8, 1))
  sampler = data_lib.ClassSampler.from_dataset(digits)

  def run(mesh):
    spec = base.DataSpec.of(digits)
    state = base.init_state(images, labels, settings.image_optimizer(spec), jax.random.key(1))
    if mesh is not None:
      state = sharding.place_state(state, mesh)
    step = dm.make_dm_step(net, settings, base.DataSpec.of(digits), CPU, mesh=mesh)
    history = []
    for _ in range(STEPS):
      state, metrics = step(state, sampler)
      history.append({k: float(v) for k, v in metrics.items()})
    return state, history

  single, single_metrics = run(None)
  mesh = sharding.class_mesh(num_devices, num_nets=num_nets)
  split, split_metrics = run(mesh)
  # A checkpoint of the split state restores with the same values and placement.
  checkpointer = checkpoint.Checkpointer(checkpoint_dir)
  checkpointer.save(STEPS, split)
  restored = checkpointer.restore_latest(split)
  checkpointer.close()
  single_images, split_images = np.asarray(single.images), sharding.to_host(split.images)
  return {
    'devices': jax.device_count(),
    'processes': jax.process_count(),
    'mesh': dict(mesh.shape),
    'image_devices': len(split.images.sharding.device_set),
    'shard_rows': sorted({s.data.shape[0] for s in split.images.addressable_shards}),
    'restored_ok': (
      restored.images.sharding == split.images.sharding
      and bool(np.array_equal(sharding.to_host(restored.images), split_images))
    ),
    'max_image_difference': float(np.max(np.abs(split_images - single_images))),
    'max_image_magnitude': float(np.max(np.abs(single_images))),
    'max_relative_metric_difference': max(
      abs(a[k] - b[k]) / max(abs(a[k]), 1e-6)
      for a, b in zip(single_metrics, split_metrics)
      for k in a
    ),
  }


def _check(found, devices, mesh, rows):
  assert found['devices'] == devices
  assert found['mesh'] == mesh
  assert found['image_devices'] == devices
  # Each device holds only its rows (replicated over the nets axis when it is > 1).
  assert found['shard_rows'] == rows
  assert found['restored_ok']
  assert found['max_image_difference'] <= 1e-4 * max(1.0, found['max_image_magnitude'])
  assert found['max_relative_metric_difference'] < 1e-4


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
  'num_nets, expected_mesh, expected_rows',
  [
    # 20 image rows on 4 devices; inside the step the 10 classes split unevenly (3, 3, 3, 1).
    (1, {'nets': 1, 'classes': 4}, [5]),
    (2, {'nets': 2, 'classes': 2}, [10]),  # 2 networks on 2 devices, classes on 2
  ],
)
def test_four_device_step_equals_one_device(tmp_path, num_nets, expected_mesh, expected_rows):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, __file__, 'devices', str(num_nets), str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  found = _last_json(result.stdout)
  _check(found, 4, expected_mesh, expected_rows)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # 84 s on 2 cores; the four-device steps stay in the fast suite
def test_two_processes_equal_one(tmp_path, tiny_config):
  """Two jax processes (one CPU device each) run the step and a whole tiny run together."""
  from dd_jax import run as run_lib  # noqa: PLC0415  (jax fixes devices at import in __main__)

  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  processes = [
    subprocess.Popen(
      [sys.executable, __file__, 'processes', str(pid), str(port), str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in (0, 1)
  ]
  outputs = [p.communicate(timeout=900) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  found = [_last_json(stdout) for stdout, _ in outputs]
  for result in found:
    _check(result['step'], 2, {'nets': 1, 'classes': 2}, [10])
    assert result['step']['processes'] == 2
  # The whole run: only process 0 wrote files; the synthetic set equals a one-process run.
  reference = run_lib.run(tiny_config(), str(tmp_path / 'one_process'))
  np.testing.assert_allclose(
    np.load(tmp_path / 'run' / 'synthetic.npz')['images'],
    np.load(tmp_path / 'one_process' / 'synthetic.npz')['images'],
    atol=1e-4,
  )
  assert found[0]['results'] == found[1]['results']
  assert found[0]['results']['eval']['accuracies'] == pytest.approx(
    reference['eval']['accuracies'], abs=1.5
  )  # one test image is 0.22 points


def _processes_main(pid: int, port: int, directory: str) -> dict:
  from dd_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.initialize_distributed(f'localhost:{port}', 2, pid)
  step = _compare(num_nets=1, num_devices=2, checkpoint_dir=os.path.join(directory, 'ckpt'))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top

  from dd_jax import run as run_lib  # pylint: disable=g-import-not-at-top

  results = run_lib.run(make_tiny_config(), os.path.join(directory, 'run'))
  return {'step': step, 'results': results}


if __name__ == '__main__':
  if sys.argv[1] == 'devices':
    print(
      json.dumps(
        _compare(
          num_nets=int(sys.argv[2]), num_devices=4, checkpoint_dir=os.path.join(sys.argv[3], 'ckpt')
        )
      )
    )
  else:
    print(json.dumps(_processes_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))

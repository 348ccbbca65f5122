"""One command for a machine with an accelerator: environment, tests, speed, a short real run.

  python experiments/gpu_check.py --out=/tmp/gpu_check            # on a GPU: ~8 minutes
  python experiments/gpu_check.py --out=/tmp/gpu_check --smoke    # anywhere: under 3 minutes

Steps, each a subprocess with its own time limit (a failing step is recorded, the rest still run):
1. environment: Python, jax, the devices and their memory, and the lowering a run resolves on
   them (`dd_jax.lowering.resolve('auto')`: 'accelerator' on a GPU);
2. tests: the device-relevant part of the suite (sharding, networks, the DM and IDM steps);
3. speed: `bench_speed.py` for DM, DM + IID and IDM + IID at IPC 1 / 10 / 50 with the device's
   peak memory, and evaluation of 5 networks trained together (vmap) against one at a time;
4. a short CIFAR-10 IPC 10 run from the JPEG archive (`--archive`, unpacked under --out): DM and
   DM + IID (iid=default) at the CPU budget (400 iterations, real batch 64, 3 networks x 301
   epochs), so its table compares with the CPU numbers of experiments/results/.
`--smoke` shrinks every step (IPC 1, one repeat, digits instead of CIFAR-10, a few iterations) to
prove the script works where no accelerator is. Everything lands in --out: each step's log,
bench_speed.json, the run's workdir, and summary.md (also printed).
"""

import json
import os
import subprocess
import sys
import tarfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OUT = flags.DEFINE_string('out', None, 'Output folder (created).', required=True)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny versions of every step (CPU, < 3 minutes).')
_ARCHIVE = flags.DEFINE_string(
  'archive',
  os.path.join(REPO, '..', 'shared', 'data', 'cifar10_jpeg.tar.gz'),
  'The CIFAR-10 JPEG archive (cifar10/train/<class>/*.jpg, cifar10/test/...).',
)

ENVIRONMENT = """
import json, sys, jax
from dd_jax import lowering
devices = jax.devices()
memory = {}
for device in devices:
  stats = device.memory_stats() or {}
  memory[str(device)] = stats.get('bytes_limit')
print(json.dumps({'python': sys.version.split()[0], 'jax': jax.__version__,
                  'backend': jax.default_backend(),
                  'lowering': lowering.resolve('auto').name,
                  'devices': [f'{d.device_kind} ({d.platform})' for d in devices],
                  'memory_bytes_limit': memory}))
"""


def steps(out: str, smoke: bool) -> list[tuple[str, list[str], int]]:
  """(name, command, time limit in seconds) of every step."""
  python = sys.executable
  if smoke:
    tests = ['tests/test_losses.py', '-k', 'by_class or mean_matching']
    bench = ['--ipcs=1', '--methods=dm', '--repeats=1', '--per_class=16', '--batch_real=8']
    bench += ['--num_eval=2', '--eval_images=10']
    run = ['--config=configs/digits.py:ipc=2', '--config.distill.iterations=4']
    run += ['--config.distill.eval_every=4', '--config.distill.log_every=2']
    run += ['--config.distill.checkpoint_every=4', '--config.eval.epochs=2']
    run += ['--config.eval.num_eval=2', '--config.compare.random_real=False']
    run += ['--config.compare.full_train_epochs=0']
    limits = (60, 60, 120, 120)
  else:
    tests = ['tests/test_sharding.py', 'tests/test_models.py', 'tests/test_dm.py']
    tests += ['tests/test_idm.py', 'tests/test_train.py']
    bench = ['--ipcs=1,10,50', '--methods=dm,dm_iid,idm_iid', '--repeats=3']
    data = os.path.join(out, 'data', 'cifar10')
    run = ['--config=configs/paper.py:dataset=cifar10,ipc=10,method=dm_iid,budget=cpu,iid=default']
    run += [f'--config.dataset.name=folder:{data}', '--config.compare.variants=dm']
    run += [f'--config.dataset.cache_dir={os.path.join(out, "cache")}']
    limits = (60, 150, 180, 240)
  return [
    ('environment', [python, '-c', ENVIRONMENT], limits[0]),
    ('tests', [python, '-m', 'pytest', '-q', '-m', 'not slow', *tests], limits[1]),
    (
      'speed',
      [python, 'experiments/bench_speed.py', f'--out={os.path.join(out, "bench_speed.json")}']
      + bench,
      limits[2],
    ),
    (
      'run',
      [python, '-m', 'dd_jax.main', f'--workdir={os.path.join(out, "run")}', *run],
      limits[3],
    ),
  ]


def unpack(archive: str, out: str) -> str:
  """Unpacks the CIFAR-10 archive under <out>/data once; returns the folder-source root."""
  root = os.path.join(out, 'data', 'cifar10')
  if not os.path.isdir(root):
    if not os.path.isfile(archive):
      raise FileNotFoundError(f'--archive={archive} does not exist; give the CIFAR-10 archive.')
    with tarfile.open(archive) as tar:
      tar.extractall(os.path.join(out, 'data'), filter='data')
  return root


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  if not _SMOKE.value:
    unpack(_ARCHIVE.value, out)
  lines = ['# gpu_check' + (' (smoke)' if _SMOKE.value else ''), '']
  records = []
  start_all = time.perf_counter()
  for name, command, limit in steps(out, _SMOKE.value):
    print(f'--- {name} (limit {limit} s): {" ".join(command[:4])} ...', flush=True)
    start = time.perf_counter()
    try:
      result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=limit, check=False
      )
      status, output = (
        ('ok' if result.returncode == 0 else f'exit {result.returncode}'),
        (result.stdout + result.stderr),
      )
    except subprocess.TimeoutExpired as error:
      status = f'timed out after {limit} s'
      output = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or '')
    seconds = time.perf_counter() - start
    with open(os.path.join(out, f'{name}.log'), 'w') as f:
      f.write(output)
    records.append({'step': name, 'status': status, 'seconds': round(seconds, 1)})
    print(f'{name}: {status} ({seconds:.0f} s)', flush=True)
    tail = [line for line in output.strip().splitlines() if line.strip()][-12:]
    lines += [f'## {name}: {status} ({seconds:.0f} s)', '', '```', *tail, '```', '']
  lines.append(f'Total {time.perf_counter() - start_all:.0f} s.')
  summary = '\n'.join(lines)
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(summary + '\n')
  with open(os.path.join(out, 'steps.json'), 'w') as f:
    json.dump(records, f, indent=1)
  print(summary)
  if any(record['status'] != 'ok' for record in records):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)

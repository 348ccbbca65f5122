"""experiments/gpu_check.py works before an accelerator is ever available (its --smoke mode)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # the GPU check script, smoke mode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_runs_every_step(tmp_path):
  result = subprocess.run(
    [sys.executable, 'experiments/gpu_check.py', '--smoke', f'--out={tmp_path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  steps = json.loads((tmp_path / 'steps.json').read_text())
  assert [(s['step'], s['status']) for s in steps] == [
    ('environment', 'ok'),
    ('tests', 'ok'),
    ('speed', 'ok'),
    ('run', 'ok'),
  ]
  environment = json.loads((tmp_path / 'environment.log').read_text().strip().splitlines()[-1])
  assert environment['backend'] and environment['devices']
  speed = json.loads((tmp_path / 'bench_speed.json').read_text())
  assert speed['steps'] and speed['steps'][0]['ms_per_step'] > 0
  assert (tmp_path / 'run' / 'results.json').exists()
  assert '# gpu_check (smoke)' in (tmp_path / 'summary.md').read_text()

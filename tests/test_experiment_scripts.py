"""The experiment scripts: no default output over committed records; their FLOP counts hold."""

import ast
import functools
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import float64

from dd_jax import flops, models, train
from dd_jax.models import kernels

pytestmark = pytest.mark.integration  # the experiment scripts as subprocesses

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / 'experiments'
PROBES = EXPERIMENTS / 'probes'  # CPU speed probes (experiments/probes/README.md)
SCRIPTS = sorted([*EXPERIMENTS.glob('*.py'), *PROBES.glob('*.py')])


def _flag_defaults(path: pathlib.Path) -> dict[str, ast.expr]:
  """Flag name -> the default expression of every `flags.DEFINE_*(name, default, ...)`."""
  defaults = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr.startswith('DEFINE_')
      and len(node.args) >= 2
      and isinstance(node.args[0], ast.Constant)
    ):
      defaults[node.args[0].value] = node.args[1]
  return defaults


def test_the_scripts_are_found():
  names = {path.name for path in SCRIPTS}
  assert {'bench_speed.py', 'kill_resume.py', 'grid.py', 'profile_train_step.py'} <= names
  assert _flag_defaults(EXPERIMENTS / 'bench_speed.py')  # the parser sees the flags


@pytest.mark.parametrize('path', SCRIPTS, ids=lambda path: path.name)
def test_no_default_output_inside_the_committed_results(path):
  for name, default in _flag_defaults(path).items():
    text = ast.unparse(default)
    assert 'experiments/results' not in text, (
      f'{path.name}: --{name} defaults to {text}, which overwrites a committed record; '
      'default to a temporary path and name the record in the help text.'
    )


MODULES = sorted(
  [*SCRIPTS, *(EXPERIMENTS.parent / 'configs').glob('*.py')]
  + list((EXPERIMENTS.parent / 'dd_jax').rglob('*.py'))
)


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.name)
def test_docstring_commands_keep_their_line_breaks(path):
  # A lone backslash at a line end inside a docstring joins the lines (--help then prints
  # '... --root=/tmp/grid       --extra=...'); write it as '\\' so the text shows '\'.
  docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ''
  joined = re.search(r'\S {4,}--', docstring)
  assert joined is None, f'{path.name}: a docstring command lost its line break: {joined.group()}'


@functools.cache  # once per script: a second import would define its absl flags twice
def _load(name: str, folder: pathlib.Path = EXPERIMENTS):
  sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their sibling `timing`
  try:
    spec = importlib.util.spec_from_file_location(name, folder / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(EXPERIMENTS))
  return module


def test_bench_train_gemms_counts_the_products_of_the_real_step():
  # The benchmark's bound is the sum of the step's matrix products at the shapes it lists: they
  # must be the products the im2col SGD step actually runs (the counter reads its jaxpr), which
  # add only the classifier's forward, weight and feature gradients.
  # The benchmark's steps keep the first norm unfolded (the folded one adds a small per-sample
  # patch covariance, counted in test_flops).
  bench = _load('bench_train_gemms', PROBES)
  images = 3
  net = models.get_network('ConvNet', 10, conv=kernels.ConvLowering('im2col'))
  variables = net.init(jax.random.key(0), (1, 32, 32, 3))
  optimizer = optax.sgd(0.01, momentum=0.9)
  x, y = jnp.ones((images, 32, 32, 3)), jnp.arange(images)

  def step(variables, opt_state):
    return train.sgd_step(net, optimizer, variables, opt_state, x, y)[:2]

  counted = flops.count(step, variables, optimizer.init(variables['params']))
  listed = sum(2 * m * k * n for _, m, k, n in bench.step_gemms(images))
  classifier = 3 * 2 * images * 2048 * 10
  assert counted == listed + classifier


def test_bench_train_gemms_hybrid_convolution_has_the_gradients_of_xla_convolution():
  # The benchmark's alternative step must compute the same convolution and gradients as XLA's
  # (float64 so that a wrong flip or padding cannot hide in rounding).
  bench = _load('bench_train_gemms', PROBES)
  with float64():
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3), jnp.float64)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4), jnp.float64)
    dy = jax.random.normal(jax.random.key(2), (2, 6, 5, 4), jnp.float64)
    for padding in (0, 1):
      dy_p = dy[:, : 6 - 2 * (1 - padding), : 5 - 2 * (1 - padding)]
      y, vjp = jax.vjp(
        lambda a, b, p=padding: bench.conv_xla_im2col_weight_grad(a, b, p), x, kernel
      )
      y_ref, vjp_ref = jax.vjp(lambda a, b, p=padding: bench._xla_conv(a, b, p), x, kernel)
      np.testing.assert_allclose(y, y_ref, rtol=1e-12)
      for got, want in zip(vjp(dy_p), vjp_ref(dy_p)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_timing_alternate_pairs_each_call_with_the_next_one(monkeypatch):
  # A fake clock: each call advances it by its own duration. The ratios are those of the pairs
  # (not of the medians), the calls alternate after one untimed call of each, and a drift that
  # slows both sides alike leaves the ratio unchanged.
  timing = _load('timing')
  clock, calls = [0.0], []
  ours_durations, theirs_durations = iter([9.0, 1.0, 2.0, 4.0]), iter([9.0, 2.0, 6.0, 12.0])

  def call(name, durations):
    calls.append(name)
    clock[0] += next(durations)
    return jnp.zeros(())

  monkeypatch.setattr(timing.time, 'perf_counter', lambda: clock[0])
  result = timing.alternate(
    lambda: call('ours', ours_durations), lambda: call('theirs', theirs_durations), repeats=3
  )
  assert calls == ['ours', 'theirs'] * 4
  assert result == {
    'ours_s': 2.0,
    'theirs_s': 6.0,
    'ratio': 3.0,
    'ratio_min': 2.0,
    'ratio_max': 3.0,
  }


def _run_script(name: str, *flags: str) -> subprocess.CompletedProcess:
  """Runs experiments/`name` with `flags` in a subprocess; asserts that it exits 0."""
  completed = subprocess.run(
    [sys.executable, str(EXPERIMENTS / name), *flags],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert completed.returncode == 0, completed.stderr[-2000:]
  return completed


def test_profile_train_step_attributes_the_step_time_to_its_ops(tmp_path):
  # The profile is read back from jax.profiler's trace: every op it lists is a compiled op of
  # the step with its shape and jax operation, and the first layer's forward (convolution and
  # instance norm, folded into one on CPU) is among them.
  out = tmp_path / 'profile.json'
  completed = _run_script(
    'probes/profile_train_step.py', '--images=4', '--image_size=8', '--steps=2', f'--out={out}'
  )
  assert '| ms per step | share | op |' in completed.stdout
  results = json.loads(out.read_text())
  assert results['step_ms'] > 0 and results['ops_ms_sum'] > 0
  ops = results['ops']
  assert all(
    op['ms_per_step'] >= 0 and op['shape'].startswith(('f32', 's32', 'u32', '(')) for op in ops
  )
  assert any(op['jax_op'].startswith('jvp(ConvNet)/conv0') for op in ops)
  assert any(op['jax_op'].startswith('transpose(jvp(ConvNet))') for op in ops)


def test_bench_microbatch_times_the_split_steps_and_checks_them(tmp_path):
  # 6 images in passes of 4: one full pass and a partial one, against the whole batch.
  out = tmp_path / 'microbatch.json'
  completed = _run_script(
    'probes/bench_microbatch.py',
    '--batches=6',
    '--microbatches=0,4',
    '--steps=1',
    '--repeats=1',
    f'--out={out}',
  )
  assert '| batch | images per pass | ms per step | vs whole batch |' in completed.stdout
  rows = json.loads(out.read_text())['rows']
  assert [(row['batch'], row['microbatch']) for row in rows] == [(6, 6), (6, 4)]
  assert rows[0]['max_parameter_difference'] == 0
  assert rows[1]['max_parameter_difference'] < 1e-5  # float rounding
  assert all(row['step_ms'] > 0 for row in rows)


def test_bench_speed_times_the_family_steps(tmp_path):
  # M3D and DANCE (DANCE on the script's untrained pool) at the smallest shapes the script
  # takes, and their PyTorch baseline where torch is installed (the `bench` extra).
  out = tmp_path / 'bench.json'
  with_torch = importlib.util.find_spec('torch') is not None
  completed = _run_script(
    'bench_speed.py',
    '--methods=m3d,dance',
    '--ipcs=1',
    '--per_class=8',
    '--batch_real=4',
    '--repeats=1',
    '--skip_eval',
    *(['--pytorch'] if with_torch else []),
    f'--out={out}',
  )
  results = json.loads(out.read_text())
  assert [(r['method'], r['ipc']) for r in results['steps']] == [('m3d', 1), ('dance', 1)]
  assert all(r['ms_per_step'] > 0 and r['flops'] > 0 for r in results['steps'])
  if with_torch:
    assert [r['method'] for r in results['pytorch_steps']] == ['m3d', 'dance']
    assert '| dance step, IPC 1 |' in completed.stdout


@pytest.mark.slow  # ~15 s of compiling; the dm epoch runs in test_gpu_check's smoke run
def test_bench_speed_times_an_idc_protocol_epoch(tmp_path):
  out = tmp_path / 'bench.json'
  completed = _run_script(
    'bench_speed.py',
    '--methods=',
    '--eval_images=20',
    '--num_eval=1',
    '--repeats=1',
    '--eval_protocols=idc',
    f'--out={out}',
  )
  assert json.loads(out.read_text())['evaluation']['protocol'] == 'idc'
  assert 'Evaluation (idc protocol) with lowering' in completed.stdout

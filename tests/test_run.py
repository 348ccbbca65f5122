"""The resumable run (dd_jax.run) on tiny digits configs: files, resume, refusals."""

import dataclasses
import errno
import os
import re
import shutil
import struct
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import experiment, guards
from dd_jax import run as run_lib
from dd_jax import workdir as workdir_lib


def test_run_writes_workdir_and_resumes_to_the_same_synthetic_set(
  tmp_path, tiny_config, wrap_steps, interrupt, capsys
):
  config = tiny_config()
  reference = run_lib.run(config, str(tmp_path / 'uninterrupted'))
  assert set(reference['eval']) >= {'accuracies', 'mean', 'std'}
  assert (reference['method'], reference['base_method']) == ('DM + IID (reference)', 'dm')
  workdir = tmp_path / 'uninterrupted'
  for name in (
    'config.json',
    'metrics.jsonl',
    'synthetic.npz',
    'results.json',
    'images/step_000006.png',
  ):
    assert (workdir / name).exists(), name
  exported = np.load(workdir / 'synthetic.npz')
  assert exported['images'].shape == (20, 8, 8, 1)
  assert 0.0 <= exported['images'].min() and exported['images'].max() <= 1.0
  np.testing.assert_array_equal(exported['labels'], np.repeat(np.arange(10), 2))
  assert list(exported['class_names']) == [str(i) for i in range(10)]

  # Killed after the checkpoint of step 4 (as step 5 starts), then the same command again.
  wrap_steps(interrupt(4))
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, str(tmp_path / 'resumed'))
  assert not (tmp_path / 'resumed' / 'synthetic.npz').exists()
  wrap_steps(None)
  resumed = run_lib.run(config, str(tmp_path / 'resumed'))
  np.testing.assert_array_equal(
    np.load(tmp_path / 'resumed' / 'synthetic.npz')['images'], exported['images']
  )
  assert resumed['eval']['accuracies'] == reference['eval']['accuracies']
  steps = [
    m['step']
    for m in run_lib.workdir_lib.read_metrics(str(tmp_path / 'resumed' / 'metrics.jsonl'))
    if 'loss' in m
  ]
  assert steps == [2, 4, 6]  # no duplicated lines after the resume

  # A finished run is not recomputed (also when only the tabulated baselines change); a
  # different config is refused.
  capsys.readouterr()
  assert run_lib.run(config, str(workdir)) == reference
  assert f'{workdir} has finished its 6 steps.' in capsys.readouterr().out  # not 'Resuming'
  assert run_lib.run(tiny_config(**{'compare.full_train_epochs': 3}), str(workdir)) == reference
  with pytest.raises(ValueError, match=r'different config[\s\S]*ipc: 2 -> 3'):
    run_lib.run(tiny_config(ipc=3), str(workdir))


def test_bad_batch_real_is_refused_before_work(tmp_path, tiny_config):
  with pytest.raises(ValueError, match=r'distill.batch_real=500.*smallest class'):
    run_lib.run(tiny_config(**{'distill.batch_real': 500}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_pool_extractor_is_what_cc_sees(tmp_path, tiny_config):
  """cc.extractor='pool' must route CC through the pool: a pool of all-zero networks has
  constant features and hence CC exactly 0, while the matching network's CC is positive."""
  config = tiny_config(
    **{
      'constraints.cc.extractor': 'pool',
      'pool.model': 'ConvNetD1',
      'pool.size': 2,
      'pool.epochs': 1,
      'pool.parallel': 2,
      'pool.dir': str(tmp_path / 'pool'),
    }
  )
  settings = experiment.validate_config(config)
  data = run_lib.prepare_data(settings)
  trained = run_lib.build_method(settings, data)  # trains and saves the tiny pool
  assert (tmp_path / 'pool' / 'metadata.json').exists()
  pool = data.pools[str(tmp_path / 'pool')]
  data.pools[str(tmp_path / 'pool')] = dataclasses.replace(
    pool, variables=jax.tree_util.tree_map(jnp.zeros_like, pool.variables)
  )
  zeroed = run_lib.build_method(settings, data)
  matching_config = tiny_config()
  matching = run_lib.build_method(experiment.validate_config(matching_config), data)
  metrics = {
    name: prepared.step(prepared.state, data.sampler)[1]
    for name, prepared in [('trained', trained), ('zeroed', zeroed), ('matching', matching)]
  }
  assert float(metrics['zeroed']['cc']) == 0.0
  assert float(metrics['matching']['cc']) > 0.0
  assert float(metrics['trained']['cc']) > 0.0
  assert not np.isclose(float(metrics['trained']['cc']), float(metrics['matching']['cc']))
  # DM and CM still come from the random matching network.
  for name in ('match', 'cm'):
    np.testing.assert_allclose(metrics['zeroed'][name], metrics['matching'][name], rtol=1e-6)
  # A run through the loop reuses the saved pool.
  results = run_lib.run(config, str(tmp_path / 'run'))
  assert results['cc_extractor'] == 'pool'


def test_too_little_disk_is_refused_before_work(tmp_path, monkeypatch, tiny_config):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(run_lib.shutil, 'disk_usage', lambda path: usage._replace(free=1000))
  with pytest.raises(
    OSError,
    match=r'has 0.0 MiB free, but checkpoints and the export of '
    r'this run need about',
  ):
    run_lib.run(tiny_config(), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_disk_needed_covers_what_a_run_writes(tmp_path, tiny_config):
  config = tiny_config()
  settings = experiment.validate_config(config)
  data = run_lib.prepare_data(settings)
  prepared = run_lib.build_method(settings, data)
  state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(prepared.state))
  image_bytes = prepared.training_set(prepared.state)[0].nbytes
  needed = run_lib.disk_needed(settings, data)
  assert needed >= 1.1 * (3 * state_bytes + 2 * image_bytes)
  run_lib.run(config, str(tmp_path), data, settings)
  written = sum(path.stat().st_size for path in tmp_path.rglob('*') if path.is_file())
  checkpoint = sum(p.stat().st_size for p in (tmp_path / 'checkpoints' / '6').rglob('*'))
  # At its peak a run holds one more checkpoint (and temporary copies) than it leaves.
  assert needed >= 2 * (written + checkpoint)


def _without_space(path):
  return OSError(errno.ENOSPC, 'No space left on device', path)


def test_a_full_disk_stops_in_one_line_and_the_rerun_resumes(
  tmp_path, tiny_config, monkeypatch, capsys
):
  config = tiny_config()
  reference = run_lib.run(config, str(tmp_path / 'reference'))
  save = run_lib.checkpoint_lib.Checkpointer.save

  def save_until_full(self, step, state):
    if step == 4:  # as Orbax reports it: wrapped in another exception
      try:
        raise _without_space(None)
      except OSError as error:
        raise RuntimeError('checkpoint save failed') from error
    save(self, step, state)

  monkeypatch.setattr(run_lib.checkpoint_lib.Checkpointer, 'save', save_until_full)
  workdir = tmp_path / 'run'
  with pytest.raises(workdir_lib.DiskFullError) as stopped:
    run_lib.run(config, str(workdir))
  assert str(stopped.value) == (
    f'the disk of --workdir={workdir} is full (no space left); free some space or move the '
    'workdir to a larger disk, then rerun the same command: it resumes from the last checkpoint.'
  )
  monkeypatch.setattr(
    workdir_lib, 'write_json', lambda path, value: (_ for _ in ()).throw(_without_space(path))
  )
  monkeypatch.setattr(run_lib.checkpoint_lib.Checkpointer, 'save', save)
  capsys.readouterr()
  with pytest.raises(workdir_lib.DiskFullError, match=r'no space left writing .*results.json'):
    run_lib.run(config, str(workdir))
  assert f'Resuming {workdir} from step 2.' in capsys.readouterr().out
  monkeypatch.undo()
  assert run_lib.run(config, str(workdir)) == reference
  assert 'results.json is missing, unreadable or outdated; rewriting' in capsys.readouterr().out
  np.testing.assert_array_equal(
    np.load(workdir / 'synthetic.npz')['images'],
    np.load(tmp_path / 'reference' / 'synthetic.npz')['images'],
  )


@pytest.fixture
def small_filesystem(tmp_path):
  """A 128 KiB tmpfs (`resize(kib)` remounts it), or a skip where mounting is not permitted."""
  mount_point = tmp_path / 'small_disk'
  mount_point.mkdir()
  mount = lambda *options: subprocess.run(
    ['mount', '-t', 'tmpfs', *options, 'tmpfs', str(mount_point)], capture_output=True
  )
  if os.geteuid() != 0 or mount('-o', 'size=128k').returncode != 0:
    pytest.skip('mounting a tmpfs needs root')
  try:
    yield mount_point, lambda kib: mount('-o', f'remount,size={kib}k')
  finally:
    subprocess.run(['umount', '--lazy', str(mount_point)], check=True)


def test_a_small_filesystem_is_refused_before_work_or_stops_in_one_line(
  tmp_path, tiny_config, monkeypatch, small_filesystem
):
  mount_point, resize = small_filesystem
  config = tiny_config(**{'distill.iterations': 40, 'distill.eval_every': 40})
  workdir = mount_point / 'run'
  with pytest.raises(OSError, match=r'has 0.1 MiB free, but .* need about'):
    run_lib.run(config, str(workdir))
  assert not (workdir / 'checkpoints').exists()
  # Past the estimate (patched away), a real ENOSPC: one line, and a workdir that resumes.
  monkeypatch.setattr(run_lib, 'check_free_space', lambda *args, **kwargs: None)
  with pytest.raises(workdir_lib.DiskFullError, match=r'is full .* resumes from the last'):
    run_lib.run(config, str(workdir))
  monkeypatch.undo()
  assert resize(64 * 1024).returncode == 0
  resumed = run_lib.run(config, str(workdir))
  reference = run_lib.run(config, str(tmp_path / 'reference'))
  assert resumed == reference
  np.testing.assert_array_equal(
    np.load(workdir / 'synthetic.npz')['images'],
    np.load(tmp_path / 'reference' / 'synthetic.npz')['images'],
  )


def test_a_finished_run_rebuilds_missing_or_damaged_exports_without_recomputing(
  tmp_path, tiny_config, monkeypatch, capsys
):
  config = tiny_config()
  results = run_lib.run(config, str(tmp_path))
  exported = dict(np.load(tmp_path / 'synthetic.npz'))
  results_text = (tmp_path / 'results.json').read_text()
  monkeypatch.setattr(run_lib, 'evaluate_images', None)  # nothing is evaluated again
  synthetic = tmp_path / 'synthetic.npz'
  damages = {
    'is unreadable': lambda: synthetic.write_bytes(synthetic.read_bytes()[:100]),
    'is missing': synthetic.unlink,
    'differs from the last checkpoint': lambda: np.savez(synthetic, **{**exported, 'labels': 0}),
  }
  for problem, damage in damages.items():
    damage()
    capsys.readouterr()
    assert run_lib.run(config, str(tmp_path)) == results
    assert re.search(
      f'{synthetic} {problem}( \\(.*\\))?; rewriting it from the last checkpoint.',
      capsys.readouterr().out,
    )
    restored = np.load(synthetic)
    assert set(restored.files) == set(exported)
    for key, value in exported.items():
      np.testing.assert_array_equal(restored[key], value)
  (tmp_path / 'results.json').write_text(results_text[:20])
  assert run_lib.run(config, str(tmp_path)) == results
  assert 'results.json is missing, unreadable or outdated; rewriting' in capsys.readouterr().out
  assert (tmp_path / 'results.json').read_text() == results_text
  assert run_lib.run(config, str(tmp_path)) == results  # intact: nothing said, nothing written
  assert 'rewriting' not in capsys.readouterr().out


@pytest.mark.parametrize('poison', ['loss_term', 'images'])
def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
  tmp_path, tiny_config, wrap_steps, poison
):
  def poisoned(step, state, sampler):
    state, metrics = step(state, sampler)
    # Checkpoints and log lines every 2 steps: step 5 or 6 goes bad, step 4 is the last good.
    if poison == 'loss_term' and int(state.step) == 5:
      metrics = {**metrics, 'cm': metrics['cm'] * jnp.nan}
      state = state.replace(images=state.images * jnp.nan)
    if poison == 'images' and int(state.step) == 6:  # only the images: the loss was finite
      state = state.replace(images=state.images * jnp.nan)
    return state, metrics

  wrap_steps(poisoned)
  workdir = tmp_path / 'run'
  expected = (
    r'cm became non-finite at step 5 \(the synthetic images at step 6 are non-finite '
    r'too\)'
    if poison == 'loss_term'
    else r'synthetic images became non-finite between steps 5 and 6'
  )
  with pytest.raises(FloatingPointError, match=expected + r'.*last checkpoint \(step 4\)'):
    run_lib.run(tiny_config(), str(workdir))
  assert not (workdir / 'synthetic.npz').exists()
  logged = run_lib.workdir_lib.read_metrics(str(workdir / 'metrics.jsonl'))
  assert [m['step'] for m in logged] == [2, 4]  # nothing non-finite was logged
  config = tiny_config()
  settings = experiment.validate_config(config)
  initial = run_lib.build_method(settings, run_lib.prepare_data(settings)).state
  restored = run_lib.checkpoint_lib.Checkpointer(str(workdir / 'checkpoints')).restore_latest(
    initial
  )
  assert int(restored.step) == 4 and np.all(np.isfinite(restored.images))


def test_unwritable_workdir_is_refused_before_work(tmp_path, tiny_config):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(
    ValueError, match=r'--workdir=.*a_file is a file, not a directory; choose another --workdir'
  ):
    run_lib.run(tiny_config(), str(blocker))
  with pytest.raises(
    ValueError,
    match=r'--workdir=.*a_file/run/sub cannot be created: .*a_file is a file, not a directory',
  ):
    run_lib.run(tiny_config(), str(blocker / 'run' / 'sub'))
  if os.geteuid() != 0:  # root writes regardless of permission bits
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match='locked is not writable'):
      run_lib.run(tiny_config(), str(locked))


def test_image_overshoot_in_pixel_ranges():
  mean, std = (0.5,), (0.25,)
  normalised = lambda pixels: (jnp.asarray(pixels, jnp.float32)[..., None] - 0.5) / 0.25
  assert guards.image_overshoot(normalised([0.0, 0.3, 1.0]), mean, std) == 0.0
  assert guards.image_overshoot(normalised([0.2, 3.5]), mean, std) == pytest.approx(2.5)
  assert guards.image_overshoot(normalised([-4.0, 0.5]), mean, std) == pytest.approx(4.0)


def test_divergence_warnings_and_error():
  assert guards.divergence_warnings(2.0, 150.0, 5.0, 40, 1.0) == {}
  warnings = guards.divergence_warnings(2.0, 250.0, 20.0, 40, 1.0)
  assert set(warnings) == {'images', 'loss'}
  assert 'from 2 to 250 (x125)' in warnings['loss'] and 'distill.lr=1' in warnings['loss']
  assert 'reach 20 times' in warnings['images']
  with pytest.raises(guards.DivergenceError, match=r'step 40: .* 2e\+03 times .*distill.lr=1e\+30'):
    guards.divergence_warnings(2.0, 2.0, 2e3, 40, 1e30)


def test_chance_level_warning():
  assert guards.chance_level_warning([10.0, 10.5, 12.0], 10, 'x') is None
  warning = guards.chance_level_warning([10.0, 10.0, 10.9], 10, '20 training images')
  assert '20 training images' in warning and 'chance 10.00%' in warning and 'eval.lr' in warning


def test_a_stopped_run_is_refused_again_and_set_aside_by_another_config(
  tmp_path, tiny_config, capsys
):
  diverging = tiny_config(**{'distill.lr': 1e6, 'constraints.cc.weight': 0.0})
  with pytest.raises((guards.DivergenceError, FloatingPointError), match='distill.lr'):
    run_lib.run(diverging, str(tmp_path))
  assert not (tmp_path / 'results.json').exists()
  # The same config would stop the same way: refused before any step, naming why.
  with pytest.raises(ValueError, match=r'stopped \(Stopped.*the same config stops the same way'):
    run_lib.run(diverging, str(tmp_path))
  # Another config starts afresh in the same workdir; the stopped run is kept aside.
  fixed = tiny_config(**{'constraints.cc.weight': 0.0})
  capsys.readouterr()
  results = run_lib.run(fixed, str(tmp_path))
  assert f'moved its files to {tmp_path}/stopped_runs/1' in capsys.readouterr().out
  aside = tmp_path / 'stopped_runs' / '1'
  assert {p.name for p in aside.iterdir()} >= {'config.json', 'checkpoints', 'stopped.json'}
  assert workdir_lib.read_json(str(aside / 'config.json'))['distill']['lr'] == 1e6
  assert results == run_lib.run(fixed, str(tmp_path / 'fresh'))


def _tensorboard_scalars(directory):
  """{tag: [(step, value), ...]} from every event file in `directory` (TFRecord framing:
  8-byte length, 4-byte CRC, the Event proto, 4-byte CRC), honouring purge markers."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(directory.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        for tag in scalars:  # a resumed run: forget what it is about to recompute
          scalars[tag] = [(s, v) for s, v in scalars[tag] if s < event.step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_holds_the_loss_terms_and_accuracies_once_after_a_resume(
  tmp_path, tiny_config, wrap_steps, interrupt
):
  config = tiny_config()
  wrap_steps(interrupt(5))
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, str(tmp_path))
  wrap_steps(None)
  run_lib.run(config, str(tmp_path))
  scalars = _tensorboard_scalars(tmp_path / 'tensorboard')
  assert {'distill/loss', 'distill/match', 'distill/cc', 'distill/cm'} <= set(scalars)
  assert [step for step, _ in scalars['distill/loss']] == [2, 4, 6]  # no duplicate after resume
  logged = [m for m in workdir_lib.read_metrics(str(tmp_path / 'metrics.jsonl')) if 'loss' in m]
  np.testing.assert_allclose([v for _, v in scalars['distill/match']], [m['match'] for m in logged])
  results = workdir_lib.read_json(str(tmp_path / 'results.json'))
  assert scalars['eval/test_accuracy'][-1] == (6, pytest.approx(results['eval']['mean']))


@pytest.mark.parametrize('split', ['validation', 'test'])
def test_the_checkpoint_chosen_on_a_split_is_labelled_and_exported(tmp_path, tiny_config, split):
  config = tiny_config(
    **{'distill.eval_every': 2, 'eval.select_checkpoint': split},
    **({'dataset.validation_fraction': 0.1} if split == 'validation' else {}),
  )
  workdir = tmp_path / 'run'
  results = run_lib.run(config, str(workdir))
  evaluations = {
    m['step']: m['eval']
    for m in run_lib.workdir_lib.read_metrics(str(workdir / 'metrics.jsonl'))
    if 'eval' in m
  }
  assert sorted(evaluations) == [2, 4, 6]
  best = max(sorted(evaluations), key=lambda step: evaluations[step]['mean'])
  assert results['checkpoint'] == {'chosen_on': split, 'step': best}
  assert results['eval'] == evaluations[best] and results['eval']['split'] == split
  assert results['method'].endswith(f' [checkpoint chosen on {split}]')
  exported, kept = (
    np.load(workdir / 'synthetic.npz'),
    np.load(workdir / f'evaluated/step_{best:06d}.npz'),
  )
  assert int(exported['step']) == best
  for key in kept.files:
    np.testing.assert_array_equal(exported[key], kept[key])
  assert run_lib.run(config, str(workdir)) == results  # a finished run: the same choice


@pytest.mark.parametrize(
  ('split', 'fraction', 'message'),
  [
    ('validation', 0.0, r"'validation' chooses among evaluation points on a validation split"),
    ('test', 0.1, r"'test' with config.dataset.validation_fraction=0.1 would choose on the"),
  ],
)
def test_a_checkpoint_choice_on_the_wrong_split_is_refused(tiny_config, split, fraction, message):
  config = tiny_config(**{'eval.select_checkpoint': split, 'dataset.validation_fraction': fraction})
  with pytest.raises(ValueError, match=message):
    run_lib.experiment.validate_config(config)

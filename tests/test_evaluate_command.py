"""`python -m dd_jax.evaluate`: any set file, checked before training, reproducing a run's row."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_tiny_config

from dd_jax import compare
from dd_jax import run as run_lib
from dd_jax.evaluate import command, sets

NETS = ('ConvNetW32',)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A tiny DM + IID run with the random real baseline: (workdir, config, comparison)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = make_tiny_config(**{'compare.random_real': True})
  comparison = compare.run_with_baselines(config, workdir)
  return workdir, config, comparison


def _row(comparison, label_start):
  [row] = [r for r in comparison['rows'] if r['label'].startswith(label_start)]
  return row


def test_a_runs_synthetic_npz_reproduces_its_rows_exactly(finished_run, tmp_path):
  workdir, config, comparison = finished_run
  result = command.evaluate_file(
    os.path.join(workdir, 'synthetic.npz'),
    config,
    str(tmp_path / 'out'),
    architectures=NETS,
  )
  rows = result['rows']
  assert (
    rows['synthetic/ConvNetW32']['eval']['accuracies'] == _row(comparison, 'DM + IID')['accuracies']
  )
  assert (
    rows['random_real/ConvNetW32']['eval']['accuracies']
    == _row(comparison, 'random real')['accuracies']
  )
  assert '| synthetic (20 stored, 20 decoded) | ConvNetW32 |' in result['table']
  assert 'under protocol dm (3 epochs' in result['table']
  # Resumable: the same command again trains nothing; another one on the same --out is refused.
  again = command.evaluate_file(
    os.path.join(workdir, 'synthetic.npz'),
    config,
    str(tmp_path / 'out'),
    architectures=NETS,
  )
  assert again['rows'] == rows
  other = make_tiny_config(**{'eval.epochs': 3})
  with pytest.raises(command.RefusedError, match=r'other settings \(differing: eval\)'):
    command.evaluate_file(
      os.path.join(workdir, 'synthetic.npz'), other, str(tmp_path / 'out'), architectures=NETS
    )


@pytest.mark.parametrize('scale', ['auto', 'normalized'])
def test_a_plain_npz_of_normalised_images_is_detected_or_declared(
  finished_run, tmp_path, scale, digits
):
  workdir, config, _ = finished_run
  with np.load(os.path.join(workdir, 'synthetic.npz')) as saved:
    normalized, labels, pixels = saved['normalized_images'], saved['labels'], saved['images']
  # NCHW, as PyTorch codes keep them.
  np.savez(tmp_path / 'set.npz', images=normalized.transpose(0, 3, 1, 2), labels=labels)
  read = sets.read_set(str(tmp_path / 'set.npz'), digits, scale=scale, protocol_factor=2, factor=1)
  assert (read.source, read.scale, read.factor) == ('npz', 'normalized', 1)
  np.testing.assert_array_equal(read.images, normalized)
  # The exported pixels ([0, 1], clipped) are told apart and normalised.
  np.savez(tmp_path / 'pixels.npz', images=pixels, labels=labels)
  read = sets.read_set(str(tmp_path / 'pixels.npz'), digits, scale='auto', factor=1)
  assert read.scale == 'pixels'
  expected = (pixels - np.asarray(digits.mean)) / np.asarray(digits.std)
  np.testing.assert_allclose(read.images, expected, rtol=1e-6)


def test_a_foreign_set_is_decoded_with_the_protocols_factor(digits, tmp_path):
  # One stored 8x8 image per class whose quadrants are constant 1, 2, 3, 4 (normalised units).
  quadrants = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((4, 4)))[None, :, :, None]
  images = np.repeat(quadrants, 10, axis=0).astype(np.float32)
  np.savez(tmp_path / 'stored.npz', images=images, labels=np.arange(10))
  read = sets.read_set(str(tmp_path / 'stored.npz'), digits, scale='normalized', protocol_factor=2)
  assert (read.stored, read.factor, read.ipc, len(read.images)) == (10, 2, 1, 40)
  # Class 0's four decoded images are the constant quadrants, in row-major order.
  np.testing.assert_allclose(read.images[:4].reshape(4, -1).mean(axis=1), [1, 2, 3, 4])
  np.testing.assert_array_equal(read.labels[:8], [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize(
  ('images', 'labels', 'message'),
  [
    (np.zeros((10, 16, 16, 1)), np.arange(10), r'images are \(16, 16, 1\).*are \(8, 8, 1\)'),
    (np.zeros((10, 8, 8, 3)), np.arange(10), r'images are \(8, 8, 3\)'),
    (np.zeros((10, 8, 8, 1)), np.arange(10) + 5, r'labels span 5..14 but digits has 10 classes'),
    (np.zeros((10, 8, 8, 1)), np.arange(9), r'9 labels of type int64 for 10 images'),
  ],
)
def test_a_set_that_does_not_fit_the_dataset_is_refused_before_training(
  tmp_path, images, labels, message, monkeypatch
):
  np.savez(tmp_path / 'bad.npz', images=images, labels=labels)
  monkeypatch.setattr(run_lib, 'evaluate_images', lambda *a: pytest.fail('trained'))
  with pytest.raises(command.RefusedError, match=message):
    command.evaluate_file(str(tmp_path / 'bad.npz'), make_tiny_config(), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out' / 'evaluation.json')


def test_a_pt_file_in_dms_layout_is_evaluated(finished_run, tmp_path, digits):
  torch = pytest.importorskip('torch', reason='torch is optional: .pt files need it')
  workdir, _, _ = finished_run
  with np.load(os.path.join(workdir, 'synthetic.npz')) as saved:
    normalized, labels = saved['normalized_images'], saved['labels']
  # DatasetCondensation's main.py: torch.save({'data': data_save, 'accs_all_exps': ...}), with
  # data_save a list of [image_syn (NCHW, normalised), label_syn] per experiment.
  pair = [torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)]
  torch.save({'data': [pair, pair], 'accs_all_exps': {}}, tmp_path / 'res_DM.pt')
  read = sets.read_set(str(tmp_path / 'res_DM.pt'), digits, index=1)
  assert (read.source, read.scale, read.factor) == ('torch', 'normalized', 1)
  np.testing.assert_array_equal(read.images, normalized)


def test_the_command_refuses_in_one_line(tmp_path):
  np.savez(tmp_path / 'bad.npz', images=np.zeros((10, 32, 32, 3)), labels=np.arange(10))
  result = subprocess.run(
    [sys.executable, '-m', 'dd_jax.evaluate', f'--synthetic={tmp_path / "bad.npz"}',
     '--dataset=digits', f'--out={tmp_path / "out"}'],
    capture_output=True, text=True, check=False, timeout=120,
  )  # fmt: skip
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    f'dd_jax: error: --synthetic={tmp_path / "bad.npz"}: images are (32, 32, 3) (H, W, C) but '
    'digits images are (8, 8, 1): wrong --dataset?'
  ]


def test_several_architectures_report_the_largest_drop_and_skip_the_unfit(finished_run, tmp_path):
  workdir, config, _ = finished_run
  result = command.evaluate_file(
    os.path.join(workdir, 'synthetic.npz'),
    config,
    str(tmp_path / 'out'),
    architectures=('ConvNetW32', 'MLP', 'ResNet18'),
    random_real=False,
    skip_unfit=True,
  )
  assert sorted(result['rows']) == ['synthetic/ConvNetW32', 'synthetic/MLP']
  assert 'too small' in result['skipped']['ResNet18']  # 8x8 inputs: listed, not fatal
  means = {name: row['eval']['mean'] for name, row in result['rows'].items()}
  drop = means['synthetic/ConvNetW32'] - means['synthetic/MLP']
  assert result['largest_drop'] == {'model': 'MLP', 'drop': drop}
  assert f'largest drop from ConvNetW32: {drop:.2f} points (MLP)' in result['table']
  # Without skip_unfit the unfit network is refused before any training.
  with pytest.raises(command.RefusedError, match='too small'):
    command.evaluate_file(
      os.path.join(workdir, 'synthetic.npz'), config, str(tmp_path / 'other'),
      architectures=('ConvNetW32', 'ResNet18'),
    )  # fmt: skip


def test_cross_arch_script_is_the_command_with_several_networks(finished_run, tmp_path):
  workdir, _, _ = finished_run
  result = subprocess.run(
    [sys.executable, 'experiments/cross_arch.py', f'--synthetic={workdir}/synthetic.npz',
     '--dataset=digits', '--architectures=ConvNetW32,ResNet18', '--epochs=1', '--num_eval=1',
     f'--out={tmp_path / "out"}'],
    capture_output=True, text=True, check=False, timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert '| synthetic (20 stored, 20 decoded) | ConvNetW32 |' in result.stdout
  assert 'ResNet18: skipped' in result.stdout
  assert 'random real' not in result.stdout


def test_soft_labels_come_from_the_pools_first_member(finished_run, tmp_path, monkeypatch):
  workdir, _, _ = finished_run
  config = make_tiny_config(
    **{'eval.soft_labels': True, 'eval.hard_label_epochs': 1, 'eval.epochs': 3,
       'pool.model': 'ConvNetW32', 'pool.size': 1, 'pool.epochs': 1,
       'pool.dir': str(tmp_path / 'pool')}
  )  # fmt: skip
  seen = []
  original = run_lib.train_lib.soft_targets
  monkeypatch.setattr(
    run_lib.train_lib, 'soft_targets', lambda *a: seen.append(original(*a)) or seen[-1]
  )
  result = command.evaluate_file(
    os.path.join(workdir, 'synthetic.npz'), config, str(tmp_path / 'out'), architectures=NETS
  )
  assert [len(targets) for targets in seen] == [20, 20]  # the set and the random real subset
  assert all(row['eval']['labels'] == 'soft' for row in result['rows'].values())
  assert 'soft labels' in result['table']

"""The run-and-baselines table (dd_jax.compare)."""

import os
import shutil

import numpy as np
import pytest

from dd_jax import compare, experiment, presets
from dd_jax import data as data_lib
from dd_jax import pool as pool_lib
from dd_jax import run as run_lib


def test_method_labels(tiny_config):
  config = tiny_config()
  assert presets.method_label(config) == 'DM + IID (reference)'
  assert presets.method_label(presets.variant_config(config, 'dm')) == 'DM'
  assert presets.method_label(presets.variant_config(config, 'dm_cm')) == 'DM + CM'
  idm_config = tiny_config(
    method='idm', **{'constraints.cc.weight': 0.0, 'constraints.cm.weight': 0.0}
  )
  assert presets.method_label(idm_config) == 'IDM'
  assert (
    presets.method_label(presets.variant_config(idm_config, 'idm_iid')) == 'IDM + IID (reference)'
  )
  pooled = tiny_config(**{'constraints.cc.extractor': 'pool'})
  assert presets.method_label(pooled).startswith('DM + IID (reference, CC on pool: 1000 ResNet18')
  scale_free = {
    ('relative', 0.1, 1.0): 'DM + IID (CC relative 0.1)',
    ('threshold', 1.0, 0.5): 'DM + IID (CC threshold 1 tau 0.5)',
    ('calibrated', 0.3, 1.0): 'DM + IID (CC calibrated rho 0.3)',
  }
  for (form, weight, tau), label in scale_free.items():
    overrides = {'constraints.cc.form': form, 'constraints.cc.weight': weight}
    assert presets.method_label(tiny_config(**overrides, **{'constraints.cc.tau': tau})) == label
  assert presets.method_label(tiny_config(**{'constraints.cm.weight': 0.02})) == (
    'DM + IID (CM 0.02)'
  )


def test_run_with_baselines_prints_table(tmp_path, capsys, tiny_config):
  config = tiny_config(
    **{
      'compare.variants': 'dm',
      'compare.random_real': True,
      'compare.full_train_epochs': 1,
      'compare.full_train_num_eval': 1,
    }
  )
  comparison = compare.run_with_baselines(config, str(tmp_path))
  table = comparison['table']
  assert [row['label'] for row in comparison['rows']] == [
    'random real (ipc 2)',
    'DM',
    'DM + IID (reference)',
    'full training set (1347 images, 1 epoch, 1 network)',
  ]
  assert comparison['rows'][1]['mean'] == pytest.approx(
    np.mean(comparison['rows'][1]['accuracies'])
  )
  for label in ('random real (ipc 2)', '| DM |', '| DM + IID (reference) |', 'full training set'):
    assert label in table
  # One network has no sample std: the table says so instead of '+- 0.00'.
  assert table.splitlines()[-1].endswith('(one value: no spread) |')
  assert '+- 0.00' not in table.splitlines()[-1]
  assert table in capsys.readouterr().out
  assert (tmp_path / 'table.md').exists()
  assert os.path.exists(tmp_path / 'compare' / 'dm' / 'synthetic.npz')


def test_cached_baselines_are_recomputed_when_their_settings_change(tmp_path, capsys, tiny_config):
  overrides = {'compare.random_real': True, 'compare.full_train_epochs': 1}
  first = compare.run_with_baselines(
    tiny_config(**overrides, **{'compare.full_train_num_eval': 1}), str(tmp_path)
  )
  assert [len(row['accuracies']) for row in first['rows']] == [2, 2, 1]
  capsys.readouterr()
  again = compare.run_with_baselines(
    tiny_config(**overrides, **{'compare.full_train_num_eval': 2}), str(tmp_path)
  )
  out = capsys.readouterr().out
  assert 'full_train.json: computed with other settings (differing: full_train_num_eval)' in out
  assert 'random_real.json' not in out  # its settings did not change: reused
  assert again['rows'][0] == first['rows'][0]
  assert again['rows'][-1]['label'] == 'full training set (1347 images, 1 epoch, 2 networks)'
  assert len(again['rows'][-1]['accuracies']) == 2  # recomputed, not the cached single network


def test_a_validation_run_reports_validation_accuracy_and_trains_without_it(tmp_path, tiny_config):
  config = tiny_config(
    **{
      'compare.variants': '',
      'compare.random_real': False,
      'compare.full_train_epochs': 1,
      'compare.full_train_num_eval': 1,
      'dataset.validation_fraction': 0.1,
    }
  )
  comparison = compare.run_with_baselines(config, str(tmp_path))
  assert '| method | validation accuracy, last epoch (%) |' in comparison['table']
  assert {row['split'] for row in comparison['rows']} == {'validation'}
  # digits has 1347 training images; 10% of each class, rounded, is held out.
  counts = data_lib.load_dataset('digits').train_class_counts()
  kept = int(sum(counts - np.round(0.1 * counts)))
  assert kept < 1347 - 100
  assert comparison['rows'][-1]['label'].startswith(f'full training set ({kept} images')


def test_a_variant_of_another_method_is_refused_before_work(tmp_path, tiny_config):
  with pytest.raises(ValueError, match=r"'idm' is not a variant of a method='dm' config"):
    compare.run_with_baselines(tiny_config(**{'compare.variants': 'idm'}), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_an_unwritable_workdir_is_refused_before_the_baselines(tmp_path, capsys, tiny_config):
  (tmp_path / 'a_file').write_text('not a directory')
  config = tiny_config(**{'compare.random_real': True, 'compare.variants': 'dm'})
  with pytest.raises(ValueError, match=r'a_file/run cannot be created: .*a_file is a file'):
    compare.run_with_baselines(config, str(tmp_path / 'a_file' / 'run'))
  assert 'random real' not in capsys.readouterr().out


def test_too_little_disk_is_refused_before_the_baselines(
  tmp_path, capsys, monkeypatch, tiny_config
):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(run_lib.shutil, 'disk_usage', lambda path: usage._replace(free=1000))
  config = tiny_config(**{'compare.random_real': True, 'compare.variants': 'dm'})
  with pytest.raises(OSError, match=r'the 2 unfinished run\(s\) of this comparison need about'):
    compare.run_with_baselines(config, str(tmp_path / 'run'))
  assert 'random real' not in capsys.readouterr().out
  assert not (tmp_path / 'run' / 'config.json').exists()  # the workdir stays reusable


def test_an_evaluation_network_too_small_is_refused_before_work(tmp_path, capsys, tiny_config):
  config = tiny_config(**{'compare.random_real': True, 'eval.model': 'LeNet'})
  with pytest.raises(ValueError, match=r"config.eval.model='LeNet' cannot take the 8x8x1 images"):
    compare.run_with_baselines(config, str(tmp_path / 'run'))
  assert 'random real' not in capsys.readouterr().out
  assert not (tmp_path / 'run').exists()  # nothing written: the workdir stays free


def test_a_changed_config_names_the_whole_workdir_before_work(tmp_path, capsys, tiny_config):
  compare.run_with_baselines(tiny_config(**{'compare.variants': 'dm'}), str(tmp_path))
  capsys.readouterr()
  changed = tiny_config(**{'compare.variants': 'dm', 'distill.lr': 2.0})
  with pytest.raises(ValueError, match=rf'delete {tmp_path} \(everything in it\)') as error:
    compare.run_with_baselines(changed, str(tmp_path))
  assert 'distill.lr' in str(error.value) and 'compare' not in str(error.value)
  assert 'Distilling' not in capsys.readouterr().out


def test_a_pool_for_other_data_is_refused_before_the_baselines(
  tmp_path, capsys, monkeypatch, tiny_config
):
  def refuse(*args, **kwargs):
    raise ValueError('/pools/x holds a pool built for different data or settings')

  monkeypatch.setattr(pool_lib, 'get_or_train_pool', refuse)
  config = tiny_config(**{'compare.random_real': True, 'constraints.cc.extractor': 'pool'})
  with pytest.raises(ValueError, match='built for different data'):
    compare.run_with_baselines(config, str(tmp_path))
  assert 'random real' not in capsys.readouterr().out


def test_every_run_validates_its_config_once(tmp_path, monkeypatch, tiny_config):
  """The main run and its variant: two runs, two validations (none repeated downstream)."""
  calls = []
  validate = experiment.validate_config
  monkeypatch.setattr(
    experiment, 'validate_config', lambda config: calls.append(config.method) or validate(config)
  )
  compare.run_with_baselines(tiny_config(**{'compare.variants': 'dm'}), str(tmp_path))
  assert len(calls) == 2

"""The run-and-baselines table (dd_jax.compare)."""

import os

import numpy as np
import pytest

from dd_jax import compare
from dd_jax import config as config_lib


def test_method_labels(tiny_config):
  config = tiny_config()
  assert compare.method_label(config) == 'DM + IID'
  assert compare.method_label(config_lib.variant_config(config, 'dm')) == 'DM'
  assert compare.method_label(config_lib.variant_config(config, 'dm_cm')) == 'DM + CM'
  idm_config = tiny_config(
    method='idm', **{'constraints.cc.weight': 0.0, 'constraints.cm.weight': 0.0}
  )
  assert compare.method_label(idm_config) == 'IDM'
  assert compare.method_label(config_lib.variant_config(idm_config, 'idm_iid')) == 'IDM + IID'
  pooled = tiny_config(**{'constraints.cc.extractor': 'pool'})
  assert compare.method_label(pooled).startswith('DM + IID (CC on pool: 1000 ResNet18')


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
    'DM + IID',
    'full training set (1347 images, 1 epochs, 1 networks)',
  ]
  assert comparison['rows'][1]['mean'] == pytest.approx(
    np.mean(comparison['rows'][1]['accuracies'])
  )
  for label in ('random real (ipc 2)', '| DM |', '| DM + IID |', 'full training set'):
    assert label in table
  assert table in capsys.readouterr().out
  assert (tmp_path / 'table.md').exists()
  assert os.path.exists(tmp_path / 'compare' / 'dm' / 'synthetic.npz')


def test_a_variant_of_another_method_is_refused_before_work(tmp_path, tiny_config):
  with pytest.raises(ValueError, match=r"'idm' is not a variant of a method='dm' config"):
    compare.run_with_baselines(tiny_config(**{'compare.variants': 'idm'}), str(tmp_path))
  assert not os.listdir(tmp_path)

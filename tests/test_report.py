"""The report: aggregation over seeds and networks, markdown, figures written."""

import os

import numpy as np
import pytest
from PIL import Image

from dd_jax import report, stats
from dd_jax import workdir as workdir_lib


def _fake_grid(root):
  """Two seeds of one DM + IID run at IPC 1 and 10, each with a DM variant."""
  records = []
  for ipc in (1, 10):
    for seed in (0, 1):
      name = f'ipc{ipc}_s{seed}'
      config = {'dataset': {'name': 'folder:/data/cifar10'}, 'ipc': ipc, 'seed': seed}
      workdir_lib.write_json(os.path.join(root, name, 'config.json'), config)
      for directory, scale in (
        (os.path.join(root, name), 1.0),
        (os.path.join(root, name, 'compare', 'dm'), 2.0),
      ):
        workdir_lib.write_metrics(
          os.path.join(directory, 'metrics.jsonl'),
          [
            {'step': s, 'loss': 9.0 / s, 'match': scale / s, 'cc': 3.0 / s, 'cm': 0.0}
            for s in (10, 20, 30)
          ]
          + [{'step': 30, 'eval': {}}],
        )
      rows = [
        {'label': f'random real (ipc {ipc})', 'accuracies': [10.0 + seed, 12.0 + seed]},
        {'label': 'DM', 'accuracies': [20.0 + ipc + seed, 22.0 + ipc + seed]},
        {'label': 'DM + IID', 'accuracies': [30.0 + ipc, 30.0 + ipc]},
      ]
      records.append({'name': name, 'spec': '...', 'seconds': 1.0, 'rows': rows})
  workdir_lib.write_metrics(os.path.join(root, 'results.jsonl'), records)


def test_report_aggregates_and_draws(tmp_path):
  _fake_grid(str(tmp_path / 'grid'))
  written = report.build_report([str(tmp_path / 'grid')], str(tmp_path / 'out'))
  summary = report.summarize(report.collect([str(tmp_path / 'grid')]))
  dm_ipc10 = summary[('cifar10', 10, 'DM')]
  expected = [30.0, 32.0, 31.0, 33.0]  # seeds 0 and 1, two networks each
  assert dm_ipc10['mean'] == pytest.approx(np.mean(expected))
  assert dm_ipc10['std'] == pytest.approx(np.std(expected, ddof=1))
  assert (dm_ipc10['seeds'], dm_ipc10['networks']) == (2, 4)
  assert ('cifar10', 1, 'random real') in summary  # the IPC moves to the column
  markdown = open(written['summary_md']).read()
  assert '| DM | 22.50 +- 1.29 (2x2) | 31.50 +- 1.29 (2x2) |' in markdown
  assert markdown.index('random real') < markdown.index('| DM |')
  names = sorted(os.path.basename(p) for p in written['figures'])
  assert names == [
    'accuracy_vs_ipc.png',
    'losses_ipc10_s0.png',
    'losses_ipc10_s1.png',
    'losses_ipc1_s0.png',
    'losses_ipc1_s1.png',
    'rows_cifar10.png',
  ]
  for path in written['figures']:
    with Image.open(path) as image:
      assert image.format == 'PNG' and min(image.size) > 200


def test_ablation_settings_with_one_label_are_told_apart(tmp_path):
  root = str(tmp_path / 'grid')
  records = []
  for name, weight, seed in (('cc_0.05', 0.05, 0), ('cc_0.05_s1', 0.05, 1), ('cc_0.005', 0.005, 0)):
    workdir_lib.write_json(
      os.path.join(root, name, 'config.json'),
      {'dataset': {'name': 'digits'}, 'ipc': 10, 'seed': seed, 'cc': weight},
    )
    records.append(
      {
        'name': name,
        'spec': '',
        'seconds': 1.0,
        'rows': [
          {'label': 'random real (ipc 10)', 'accuracies': [90.0 + seed]},
          {'label': 'DM + IID', 'accuracies': [95.0 + 10 * weight + seed]},
        ],
      }
    )
  workdir_lib.write_metrics(os.path.join(root, 'results.jsonl'), records)
  summary = report.summarize(report.collect([root]))
  assert sorted(summary) == [
    ('digits', 10, 'DM + IID [cc_0.005]'),
    ('digits', 10, 'DM + IID [cc_0.05]'),
    ('digits', 10, 'random real'),
  ]
  assert summary[('digits', 10, 'DM + IID [cc_0.05]')]['seeds'] == 2  # seed replicas pooled
  assert summary[('digits', 10, 'random real')]['networks'] == 2  # once per seed, not per run


def test_validation_rows_are_reported_apart_from_test_rows(tmp_path):
  root = str(tmp_path / 'grid')
  records = []
  for name, fraction, split, accuracy in (
    ('val', 0.1, 'validation', 80.0),
    ('test', 0.0, 'test', 90.0),
  ):
    workdir_lib.write_json(
      os.path.join(root, name, 'config.json'),
      {'dataset': {'name': 'digits', 'validation_fraction': fraction}, 'ipc': 3, 'seed': 0},
    )
    rows = [
      {'label': 'random real (ipc 3)', 'accuracies': [accuracy - 5], 'split': split},
      {'label': 'DM', 'accuracies': [accuracy], 'split': split},
    ]
    records.append({'name': name, 'spec': '', 'seconds': 1.0, 'rows': rows})
  workdir_lib.write_metrics(os.path.join(root, 'results.jsonl'), records)
  summary = report.summarize(report.collect([root]))
  assert {key: value['mean'] for key, value in summary.items()} == {
    ('digits (validation)', 3, 'random real'): 75.0,
    ('digits (validation)', 3, 'DM'): 80.0,
    ('digits', 3, 'random real'): 85.0,
    ('digits', 3, 'DM'): 90.0,
  }


def test_not_a_grid_root(tmp_path):
  with pytest.raises(ValueError, match='no results.jsonl'):
    report.build_report([str(tmp_path)], str(tmp_path / 'out'))


def test_mean_std_is_the_sample_std():
  mean, std = stats.mean_std([1.0, 2.0, 3.0, 4.0])
  assert mean == 2.5
  assert std == pytest.approx((5.0 / 3.0) ** 0.5)  # sum of squares 5 over n - 1 = 3
  assert stats.mean_std([7.0]) == (7.0, 0.0)
  with pytest.raises(ValueError, match='no values'):
    stats.mean_std([])

"""A results report from grid roots: markdown tables and matplotlib figures.

    report = build_report(['/tmp/c10_cpu_grid'], '/tmp/report')

Reads each root's results.jsonl (written by `dd_jax.grid.run_grid`) and each run's config.json
and metrics.jsonl, and writes into the output folder:

    summary.md          mean +- sample std per (dataset, IPC) and method row, over seeds x networks
    accuracy_vs_ipc.png one panel per dataset: accuracy against IPC, a line per method row
    rows_<dataset>.png  bars of every row at each IPC (ablations side by side)
    losses_<run>.png    the loss terms of a run and its variants against the step (log scale)
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any

import matplotlib

matplotlib.use('Agg')  # files only; no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from dd_jax import stats  # pylint: disable=g-import-not-at-top,wrong-import-position
from dd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

LOSS_TERMS = ('match', 'cc', 'cm', 'ce')
# Runs logged before the matching term had a method-neutral name called it 'dm'.
_EARLIER_NAMES = {'match': 'dm'}


def collect(roots: list[str]) -> list[dict[str, Any]]:
  """One record per (grid run, table row): root, run, dataset, split, ipc, seed, label, accuracies.

  Runs whose configs differ only in the seed are replicas of one setting and share their row
  labels. Where different settings at the same dataset and IPC produce the same label (an
  ablation grid: every run is 'DM + IID'), the label gets the name of the setting's first run,
  e.g. 'DM + IID [cc_0.005]'. Baseline rows (random real, full training set) are counted once
  per dataset, IPC and seed.
  """
  records, seen_baselines = [], set()
  for root in roots:
    results_path = os.path.join(root, 'results.jsonl')
    if not os.path.exists(results_path):
      raise ValueError(f'{root} has no results.jsonl; is it a grid root (experiments/grid.py)?')
    for run in workdir_lib.read_metrics(results_path):
      config = workdir_lib.read_json(os.path.join(root, run['name'], 'config.json'))
      setting = json.dumps(
        {k: v for k, v in config.items() if k not in ('seed', 'compare')}, sort_keys=True
      )
      for row in run['rows']:
        record = {
          'root': root,
          'run': run['name'],
          'dataset': config['dataset']['name'],
          'split': row.get('split', 'test'),  # rows written before validation splits: test
          'ipc': config['ipc'],
          'seed': config['seed'],
          'label': _row_label(row['label']),
          'accuracies': row['accuracies'],
          'setting': setting,
        }
        if _is_baseline(record['label']):
          key = (record['dataset'], record['split'], record['ipc'], record['seed'], record['label'])
          if key in seen_baselines:
            continue
          seen_baselines.add(key)
        records.append(record)
  first_run = {}
  for record in records:
    first_run.setdefault(record['setting'], record['run'])
  settings_per_label = collections.defaultdict(set)
  for record in records:
    key = (record['dataset'], record['split'], record['ipc'], record['label'])
    settings_per_label[key].add(record['setting'])
  for record in records:
    key = (record['dataset'], record['split'], record['ipc'], record['label'])
    if len(settings_per_label[key]) > 1 and not _is_baseline(record['label']):
      record['label'] += f' [{first_run[record["setting"]]}]'
  return records


def _is_baseline(label: str) -> bool:
  return label.startswith(('random real', 'full training set'))


def _dataset_label(spec: str) -> str:
  name = spec.partition(':')[2] or spec
  return os.path.basename(name.rstrip('/')) or name


def summarize(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
  """(dataset, ipc, label) -> mean, std over every accuracy, number of seeds and networks.

  Accuracies on a validation split are another dataset: 'digits (validation)'.
  """
  groups = collections.defaultdict(list)
  for record in records:
    dataset = _dataset_label(record['dataset'])
    if record['split'] != 'test':
      dataset += f' ({record["split"]})'
    groups[(dataset, record['ipc'], record['label'])].append(record)
  summary = {}
  for key, group in groups.items():
    accuracies = [a for record in group for a in record['accuracies']]
    mean, std = stats.mean_std(accuracies)
    summary[key] = {
      'mean': mean,
      'std': std,
      'seeds': len({record['seed'] for record in group}),
      'networks': len(accuracies),
    }
  return summary


def _row_label(label: str) -> str:
  # 'random real (ipc 10)' is one row whatever the IPC (the IPC is a column).
  return re.sub(r' \(ipc \d+\)$', '', label)


def summary_markdown(summary: dict[tuple[str, int, str], dict[str, Any]]) -> str:
  lines = []
  for dataset in sorted({key[0] for key in summary}):
    ipcs = sorted({key[1] for key in summary if key[0] == dataset})
    labels = sorted({key[2] for key in summary if key[0] == dataset}, key=_label_order)
    lines += [
      f'### {dataset}',
      '',
      '| method | ' + ' | '.join(f'IPC {i}' for i in ipcs) + ' |',
      '|---|' + '---|' * len(ipcs),
    ]
    for label in labels:
      cells = []
      for ipc in ipcs:
        entry = summary.get((dataset, ipc, label))
        cells.append(
          '-'
          if entry is None
          else f'{entry["mean"]:.2f} +- {entry["std"]:.2f} ({entry["seeds"]}x'
          f'{entry["networks"] // entry["seeds"]})'
        )
      lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  lines.append(
    'Cells: mean +- sample std (n - 1) over seeds x evaluation networks, (seeds x networks).'
  )
  return '\n'.join(lines)


def _label_order(label: str) -> tuple[int, str]:
  return (0 if label.startswith('random real') else 2 if label.startswith('full') else 1, label)


def plot_accuracy_vs_ipc(summary, path: str) -> None:
  datasets = sorted({key[0] for key in summary})
  figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
  for axis, dataset in zip(axes[0], datasets):
    labels = sorted({key[2] for key in summary if key[0] == dataset}, key=_label_order)
    for label in labels:
      points = sorted(
        (key[1], value) for key, value in summary.items() if key[0] == dataset and key[2] == label
      )
      axis.errorbar(
        [p[0] for p in points],
        [p[1]['mean'] for p in points],
        yerr=[p[1]['std'] for p in points],
        marker='o',
        capsize=3,
        label=label,
      )
    axis.set_xscale('log')
    axis.set_xlabel('images per class')
    axis.set_ylabel('test accuracy (%)')
    axis.set_title(dataset)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def plot_rows(summary, dataset: str, path: str) -> None:
  ipcs = sorted({key[1] for key in summary if key[0] == dataset})
  labels = sorted({key[2] for key in summary if key[0] == dataset}, key=_label_order)
  width = 0.8 / max(len(labels), 1)
  figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(ipcs)), 4))
  for index, label in enumerate(labels):
    entries = [summary.get((dataset, ipc, label)) for ipc in ipcs]
    axis.bar(
      np.arange(len(ipcs)) + index * width,
      [e['mean'] if e else np.nan for e in entries],
      width,
      yerr=[e['std'] if e else 0 for e in entries],
      capsize=2,
      label=label,
    )
  axis.set_xticks(np.arange(len(ipcs)) + 0.4 - width / 2)
  axis.set_xticklabels([f'IPC {ipc}' for ipc in ipcs])
  axis.set_ylabel('test accuracy (%)')
  axis.set_title(dataset)
  axis.legend(fontsize=7, loc='lower right')
  axis.grid(axis='y', alpha=0.3)
  values = [v['mean'] - v['std'] for k, v in summary.items() if k[0] == dataset]
  axis.set_ylim(max(0, min(values) - 5), None)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def plot_losses(run_dir: str, title: str, path: str) -> bool:
  """The loss terms of a run and its compare/<variant> runs; False if there is nothing to plot."""
  runs = {'run': run_dir}
  compare_dir = os.path.join(run_dir, 'compare')
  if os.path.isdir(compare_dir):
    runs.update(
      {
        name: os.path.join(compare_dir, name)
        for name in sorted(os.listdir(compare_dir))
        if os.path.isdir(os.path.join(compare_dir, name))
      }
    )
  series = {}
  for name, directory in runs.items():
    metrics = [
      m for m in workdir_lib.read_metrics(os.path.join(directory, 'metrics.jsonl')) if 'loss' in m
    ]
    for term in LOSS_TERMS:
      name_in = lambda m: term if term in m else _EARLIER_NAMES.get(term, term)
      values = [(m['step'], m[name_in(m)]) for m in metrics if m.get(name_in(m))]
      if values:
        series[(name, term)] = values
  if not series:
    return False
  terms = [t for t in LOSS_TERMS if any(key[1] == t for key in series)]
  figure, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 3.5), squeeze=False)
  for axis, term in zip(axes[0], terms):
    for (name, t), values in sorted(series.items()):
      if t == term:
        axis.plot(*zip(*values), label=name)
    axis.set_yscale('log')
    axis.set_xlabel('step')
    axis.set_title(f'{term} (unweighted)')
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return True


def build_report(roots: list[str], out: str) -> dict[str, Any]:
  """Writes summary.md and the figures for the grid roots into `out`.

  Returns:
    {'summary_md': path, 'figures': [paths], 'markdown': the summary text}.

  Raises:
    ValueError: a root that is not a grid root.
  """
  records = collect(roots)
  if not records:
    raise ValueError(f'no finished runs under {roots}.')
  os.makedirs(out, exist_ok=True)
  summary = summarize(records)
  markdown = summary_markdown(summary)
  summary_path = os.path.join(out, 'summary.md')
  with workdir_lib.atomic_write(summary_path, 'w') as f:
    f.write(markdown + '\n')
  figures = [os.path.join(out, 'accuracy_vs_ipc.png')]
  plot_accuracy_vs_ipc(summary, figures[0])
  for dataset in sorted({key[0] for key in summary}):
    figures.append(os.path.join(out, f'rows_{dataset}.png'))
    plot_rows(summary, dataset, figures[-1])
  for root, run in sorted({(r['root'], r['run']) for r in records}):
    path = os.path.join(out, f'losses_{run}.png')
    if plot_losses(os.path.join(root, run), run, path):
      figures.append(path)
  return {'summary_md': summary_path, 'figures': figures, 'markdown': markdown}

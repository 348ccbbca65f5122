"""A grid of runs: config specs with overrides, one workdir each, results in one JSON-lines file.

A run is written like a command line without the program:

    configs/paper.py:dataset=cifar10,ipc=10,method=dm --config.seed=1 --config.eval.num_eval=3

`run_grid` runs each in `<root>/<name>` (name: the spec made filesystem-safe, or given as
`name=<name> <spec> ...`) through `compare.run_with_baselines`, so a run is resumable and a
finished one is not recomputed; every finished run appends one line (name, spec, results) to
`<root>/results.jsonl`, and a rerun skips the names already there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

from dd_jax import compare, experiment
from dd_jax import config as config_lib
from dd_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class GridRun:
  """One run of a grid.

  Attributes:
    name: its workdir name under the grid root (unique in the grid).
    config_file: path of the `get_config` file.
    config_arg: the text after ':' in the spec ('' if none).
    overrides: (dotted field, text value) pairs, applied in order.
  """

  name: str
  config_file: str
  config_arg: str
  overrides: tuple[tuple[str, str], ...]

  @property
  def spec(self) -> str:
    parts = [self.config_file + (f':{self.config_arg}' if self.config_arg else '')]
    parts += [f'--config.{field}={value}' for field, value in self.overrides]
    return ' '.join(parts)


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._=,-]+', '_', text).strip('_')[:150] or 'run'


def parse_run(line: str) -> GridRun:
  """Parses 'name=<n> <file>[:<arg>] [--config.<field>=<value> ...]' (name= optional).

  Raises:
    ValueError: naming the line and what is wrong with it.
  """
  tokens = shlex.split(line)
  name = None
  if tokens and tokens[0].startswith('name='):
    name = tokens.pop(0)[len('name=') :]
  if not tokens:
    raise ValueError(
      f'grid run {line!r}: no config file; expected e.g. '
      '"configs/paper.py:dataset=cifar10,ipc=10 --config.seed=1".'
    )
  config_file, _, config_arg = tokens[0].partition(':')
  overrides = []
  for token in tokens[1:]:
    field, sep, value = token.partition('=')
    if not (field.startswith('--config.') and sep):
      raise ValueError(f'grid run {line!r}: {token!r} is not --config.<field>=<value>.')
    overrides.append((field[len('--config.') :], value))
  run = GridRun(name='', config_file=config_file, config_arg=config_arg, overrides=tuple(overrides))
  return dataclasses.replace(run, name=name or _slug(run.spec.replace('--config.', '')))


def read_grid(path: str, extra: str = '') -> list[GridRun]:
  """The runs of a grid file: one per line; blank lines and '#' comments are skipped.

  Args:
    path: the grid file.
    extra: overrides appended to every line (e.g. the dataset's location).
  """
  with open(path) as f:
    lines = [line.split('#', 1)[0].strip() for line in f]
  return [parse_run(f'{line} {extra}') for line in lines if line]


def load_config(
  run: GridRun, base_dir: str = '.'
) -> tuple[ml_collections.ConfigDict, experiment.ExperimentSettings]:
  """The config of a run and its settings (its config file is relative to `base_dir`).

  Raises:
    ValueError: a missing config file, an unknown field or a value of the wrong type, or an
      invalid config (naming the field).
  """
  path = os.path.join(base_dir, run.config_file)
  if not os.path.exists(path):
    raise ValueError(f'{run.spec}: no config file {path}.')
  config_arg = path + (f':{run.config_arg}' if run.config_arg else '')
  config = config_lib.load_config(
    config_arg, [f'--config.{field}={value}' for field, value in run.overrides]
  )
  try:
    return config, experiment.validate_config(config)
  except ValueError as error:
    raise ValueError(f'{run.spec}: {error}') from None


def run_grid(
  runs: Iterable[GridRun], root: str, *, base_dir: str = '.', log: Callable[[str], Any] = print
) -> list[dict[str, Any]]:
  """Runs every run not yet in `<root>/results.jsonl`, resumably, and records it there.

  All configs are loaded and validated before the first run starts, so a typo in the last line
  does not surface hours later.

  Args:
    runs: the grid.
    root: the grid directory (created).
    base_dir: what config file paths are relative to.
    log: progress lines.

  Returns:
    Every run's record: name, spec, seconds, and rows (label, accuracies, mean, std) of the run,
    its variants and baselines as `compare.run_with_baselines` returns them.

  Raises:
    ValueError: duplicate names or a bad run (before any work).
  """
  runs = list(runs)
  names = [run.name for run in runs]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f'grid: duplicate run names {duplicates}; give them name=<...>.')
  configs = {run.name: load_config(run, base_dir) for run in runs}
  os.makedirs(root, exist_ok=True)
  results_path = os.path.join(root, 'results.jsonl')
  done = {record['name']: record for record in workdir_lib.read_metrics(results_path)}
  for index, run in enumerate(runs):
    if run.name in done:
      log(f'grid [{index + 1}/{len(runs)}] {run.name}: done, skipped')
      continue
    log(f'grid [{index + 1}/{len(runs)}] {run.name}: {run.spec}')
    start = time.perf_counter()
    workdir = os.path.join(root, run.name)
    config, settings = configs[run.name]
    rows = compare.run_with_baselines(config, workdir, settings)['rows']
    record = {
      'name': run.name,
      'spec': run.spec,
      'seconds': time.perf_counter() - start,
      'rows': rows,
    }
    workdir_lib.append_metrics(results_path, record)
    done[run.name] = record
  return [done[run.name] for run in runs]

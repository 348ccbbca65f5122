"""Crash-safety check: SIGKILL a small run at random moments, rerun it, compare with a clean run.

  python experiments/kill_resume.py --workdir=/tmp/kill_resume --kills=20

1. Runs the main command (`python -m dd_jax.main`) once uninterrupted in <workdir>/reference and
   times it.
2. In <workdir>/killed, starts the same command again and again, each time sending SIGKILL after
   a random delay drawn uniformly over the reference run's duration (seeded), until --kills kills
   have landed; then lets it finish. After each kill it records what the workdir showed (last
   checkpoint, metrics lines, whether evaluation images / export / results existed), so the
   summary shows which phases the kills hit.
3. Checks that synthetic.npz is bitwise identical and the accuracies are equal, prints a summary
   and writes <workdir>/kill_resume.json and --results. Exit status 1 if they differ.

The default config is a tiny digits DM + IID run (checkpoints every 4 steps, an evaluation point
mid-run, a random-real baseline and a variant), so kills fall on checkpoint writes, evaluations,
the baseline and the final export.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Scratch directory (emptied).', required=True)
_KILLS = flags.DEFINE_integer('kills', 20, 'SIGKILLs to land before letting the run finish.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill delays.')
_MAX_ATTEMPTS = flags.DEFINE_integer('max_attempts', 200, 'Give up after this many launches.')
_RESULTS = flags.DEFINE_string(
  'results',
  '',
  'Summary file (relative to the repository root; the committed record:\n'
  '--results=experiments/results/kill_resume.json); empty: none.',
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_FLAGS = [
  '--config=configs/digits.py:ipc=2',
  '--config.distill.iterations=24',
  '--config.distill.log_every=4',
  '--config.distill.checkpoint_every=4',
  '--config.distill.eval_every=12',
  '--config.eval.epochs=20',
  '--config.eval.num_eval=2',
  '--config.compare.full_train_epochs=0',
]


def _command(workdir):
  return [sys.executable, '-m', 'dd_jax.main', *COMMAND_FLAGS, f'--workdir={workdir}']


def _workdir_state(workdir):
  """What a run directory shows: the phase reached."""
  state = {}
  checkpoints = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoints):
    steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
    state['checkpoint'] = max(steps) if steps else None
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    with open(metrics) as f:
      state['metric_lines'] = sum(1 for line in f if line.strip())
  state['images'] = (
    len(os.listdir(os.path.join(workdir, 'images')))
    if os.path.isdir(os.path.join(workdir, 'images'))
    else 0
  )
  state['export'] = os.path.exists(os.path.join(workdir, 'synthetic.npz'))
  state['results'] = os.path.exists(os.path.join(workdir, 'results.json'))
  return state


def _all_runs(workdir):
  """The main run and its compare/<variant> runs, by name."""
  runs = {'main': workdir}
  compare = os.path.join(workdir, 'compare')
  if os.path.isdir(compare):
    runs.update(
      {
        name: os.path.join(compare, name)
        for name in sorted(os.listdir(compare))
        if os.path.isdir(os.path.join(compare, name))
      }
    )
  return runs


def main(argv):
  del argv
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  reference_dir = os.path.join(_WORKDIR.value, 'reference')
  killed_dir = os.path.join(_WORKDIR.value, 'killed')
  start = time.perf_counter()
  subprocess.run(_command(reference_dir), cwd=REPO, check=True, capture_output=True)
  duration = time.perf_counter() - start
  print(f'reference run: {duration:.1f} s', flush=True)

  rng = random.Random(_SEED.value)
  kills, attempts, log = 0, 0, []
  while kills < _KILLS.value and attempts < _MAX_ATTEMPTS.value:
    attempts += 1
    delay = rng.uniform(0.5, duration)
    process = subprocess.Popen(
      _command(killed_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
      process.wait(timeout=delay)
      finished = True
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGKILL)
      process.wait()
      finished = False
    if finished:
      if process.returncode != 0:
        raise SystemExit(
          f'a rerun failed with exit status {process.returncode}: a kill left '
          f'the workdir unusable ({killed_dir}).'
        )
      # It finished before the kill: start over so that the kills keep landing mid-run.
      print(
        f'attempt {attempts}: finished before the kill at {delay:.1f} s; restarting the '
        'killed run from scratch',
        flush=True,
      )
      shutil.rmtree(killed_dir)
      continue
    kills += 1
    seen = {name: _workdir_state(path) for name, path in _all_runs(killed_dir).items()}
    log.append({'kill': kills, 'delay_s': round(delay, 2), 'workdir': seen})
    print(f'kill {kills} at {delay:.1f} s: {json.dumps(seen, sort_keys=True)}', flush=True)

  final = subprocess.run(_command(killed_dir), cwd=REPO, capture_output=True, text=True)
  if final.returncode != 0:
    print(final.stdout[-3000:], final.stderr[-3000:])
    raise SystemExit('the final rerun failed.')
  mismatches = []
  for name, path in _all_runs(reference_dir).items():
    other = _all_runs(killed_dir).get(name)
    reference_npz = np.load(os.path.join(path, 'synthetic.npz'))
    killed_npz = np.load(os.path.join(other, 'synthetic.npz'))
    if not np.array_equal(reference_npz['images'], killed_npz['images']):
      mismatches.append(f'{name}: synthetic images differ')
    with (
      open(os.path.join(path, 'results.json')) as f,
      open(os.path.join(other, 'results.json')) as g,
    ):
      if json.load(f)['eval']['accuracies'] != json.load(g)['eval']['accuracies']:
        mismatches.append(f'{name}: accuracies differ')
  with (
    open(os.path.join(reference_dir, 'table.md')) as f,
    open(os.path.join(killed_dir, 'table.md')) as g,
  ):
    if f.read() != g.read():
      mismatches.append('table.md differs')
  summary = {
    'kills': kills,
    'attempts': attempts,
    'reference_seconds': duration,
    'identical': not mismatches,
    'mismatches': mismatches,
    'log': log,
    'command': ' '.join(_command('<workdir>')),
  }
  summary['date'] = time.strftime('%Y-%m-%d')
  for path in [os.path.join(_WORKDIR.value, 'kill_resume.json')] + (
    [os.path.join(REPO, _RESULTS.value)] if _RESULTS.value else []
  ):
    with open(path, 'w') as f:
      json.dump(summary, f, indent=2)
      f.write('\n')
  print(
    f'{kills} kills in {attempts} launches; final synthetic sets and accuracies '
    f'{"IDENTICAL" if not mismatches else "DIFFER: " + "; ".join(mismatches)}'
  )
  if mismatches:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)

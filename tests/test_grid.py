"""The grid runner: parsing, validation before work, skipping finished runs, resuming."""

import os

import pytest

from dd_jax import compare, grid
from dd_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
  '--config.distill.iterations=2 --config.distill.eval_every=2 --config.distill.log_every=1 '
  '--config.distill.checkpoint_every=1 --config.eval.epochs=1 --config.eval.num_eval=1 '
  '--config.compare.random_real=False --config.compare.full_train_epochs=0 '
  '--config.compare.variants= --config.model.name=ConvNetW32 '
  '--config.eval.model=ConvNetW32 --config.distill.batch_real=4'
)


def test_parse_run():
  run = grid.parse_run('name=a configs/paper.py:dataset=cifar10,ipc=1 --config.seed=2')
  assert (run.name, run.config_file, run.config_arg) == (
    'a',
    'configs/paper.py',
    'dataset=cifar10,ipc=1',
  )
  assert run.overrides == (('seed', '2'),)
  assert run.spec == 'configs/paper.py:dataset=cifar10,ipc=1 --config.seed=2'
  unnamed = grid.parse_run('configs/digits.py:ipc=1 --config.seed=2')
  assert unnamed.name == 'configs_digits.py_ipc=1_seed=2'
  with pytest.raises(ValueError, match=r"'--seed=2' is not --config.<field>=<value>"):
    grid.parse_run('configs/digits.py --seed=2')
  with pytest.raises(ValueError, match='no config file'):
    grid.parse_run('name=x')


@pytest.mark.parametrize(
  'line, message',
  [
    ('configs/digits.py --config.ipcc=2', 'no such config field \'ipcc\' Did you mean "ipc"'),
    ('configs/digits.py --config.distil.lr=2', "no such config field 'distil'"),
    ('configs/digits.py --config.ipc=two', '--config.ipc=two: invalid literal for int'),
    ('configs/nowhere.py', 'no config file'),
    ('configs/digits.py --config.ipc=0', 'ipc'),
  ],
)
def test_a_bad_run_is_refused_before_any_work(tmp_path, line, message):
  runs = [grid.parse_run('name=good configs/digits.py:ipc=1'), grid.parse_run(line)]
  with pytest.raises(ValueError, match=message):
    grid.run_grid(runs, str(tmp_path / 'grid'), base_dir=REPO)
  assert not (tmp_path / 'grid').exists()


def test_duplicate_names_are_refused(tmp_path):
  runs = [grid.parse_run('name=a configs/digits.py'), grid.parse_run('name=a configs/digits.py')]
  with pytest.raises(ValueError, match=r"duplicate run names \['a'\]"):
    grid.run_grid(runs, str(tmp_path), base_dir=REPO)


def test_grid_skips_finished_runs_and_resumes_the_rest(tmp_path, monkeypatch, capsys, wrap_steps):
  grid_file = tmp_path / 'grid.txt'
  grid_file.write_text(
    f'# two tiny digits runs\nname=dm configs/digits.py:ipc=1,method=dm {TINY}\n'
    f'name=iid configs/digits.py:ipc=2,method=dm_iid,iid=reference {TINY}  # DM + IID\n'
  )
  runs = grid.read_grid(str(grid_file))
  root = str(tmp_path / 'grid')

  results_path = os.path.join(root, 'results.jsonl')

  # Kill the second (DM + IID) run after its step-1 checkpoint, once the first has finished.
  def kill_second_run(step, state, sampler):
    if workdir_lib.read_metrics(results_path) and int(state.step) == 1:
      raise KeyboardInterrupt('killed during the second run')
    return step(state, sampler)

  wrap_steps(kill_second_run)
  with pytest.raises(KeyboardInterrupt):
    grid.run_grid(runs, root, base_dir=REPO)
  assert [r['name'] for r in workdir_lib.read_metrics(results_path)] == ['dm']
  wrap_steps(None)
  capsys.readouterr()

  calls = []
  real_compare = compare.run_with_baselines
  monkeypatch.setattr(
    compare,
    'run_with_baselines',
    lambda config, workdir, settings: (
      calls.append(workdir) or real_compare(config, workdir, settings)
    ),
  )
  records = grid.run_grid(runs, root, base_dir=REPO)
  assert calls == [os.path.join(root, 'iid')]  # the finished run was not touched
  assert f'Resuming {os.path.join(root, "iid")} from step 1.' in capsys.readouterr().out
  assert [r['name'] for r in records] == ['dm', 'iid']
  assert [r['rows'][-1]['label'] for r in records] == ['DM', 'DM + IID (reference)']
  assert all(len(r['rows'][-1]['accuracies']) == 1 for r in records)
  assert len(workdir_lib.read_metrics(results_path)) == 2
  # A third call does nothing.
  calls.clear()
  grid.run_grid(runs, root, base_dir=REPO)
  assert not calls


def test_shipped_grid_files_are_valid():
  grids = os.path.join(REPO, 'experiments', 'grids')
  for name in sorted(os.listdir(grids)):
    runs = grid.read_grid(os.path.join(grids, name))
    assert runs, name
    for run in runs:
      grid.load_config(run, base_dir=REPO)

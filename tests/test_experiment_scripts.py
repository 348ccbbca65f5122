"""The experiment scripts never write over committed records by default."""

import ast
import pathlib

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / 'experiments'
SCRIPTS = sorted(EXPERIMENTS.glob('*.py'))


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
  assert {'bench_speed.py', 'kill_resume.py', 'grid.py'} <= names
  assert _flag_defaults(EXPERIMENTS / 'bench_speed.py')  # the parser sees the flags


@pytest.mark.parametrize('path', SCRIPTS, ids=lambda path: path.name)
def test_no_default_output_inside_the_committed_results(path):
  for name, default in _flag_defaults(path).items():
    text = ast.unparse(default)
    assert 'experiments/results' not in text, (
      f'{path.name}: --{name} defaults to {text}, which overwrites a committed record; '
      'default to a temporary path and name the record in the help text.'
    )

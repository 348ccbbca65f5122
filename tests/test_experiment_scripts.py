"""The experiment scripts never write over committed records by default."""

import ast
import pathlib
import re

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


MODULES = sorted(
  [*EXPERIMENTS.glob('*.py'), *(EXPERIMENTS.parent / 'configs').glob('*.py')]
  + list((EXPERIMENTS.parent / 'dd_jax').rglob('*.py'))
)


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.name)
def test_docstring_commands_keep_their_line_breaks(path):
  # A lone backslash at a line end inside a docstring joins the lines (--help then prints
  # '... --root=/tmp/grid       --extra=...'); write it as '\\' so the text shows '\'.
  docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ''
  joined = re.search(r'\S {4,}--', docstring)
  assert joined is None, f'{path.name}: a docstring command lost its line break: {joined.group()}'

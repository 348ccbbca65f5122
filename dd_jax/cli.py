"""Command-line plumbing shared by dd_jax's programs: flag parsing whose errors are one line.

A config file is loaded while absl parses the flags, so a missing file, a syntax error, a bad
config string (`configs/paper.py:ipcc=3`) or an unknown `--config.<field>` surfaces there, wrapped
in absl's and ml_collections' messages (which embed tracebacks). `parse_flags` reports each as one
line naming the file or the field and the fix, with exit status 2; `--traceback` shows the
original exception instead.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, NoReturn

from absl import flags

TRACEBACK_FLAG = '--traceback'


def refuse(message: str) -> NoReturn:
  """Prints `dd_jax: error: <message>` to stderr and exits with status 2."""
  print(f'dd_jax: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from (or while handling), outermost first."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _config_file(argv: list[str]) -> str:
  """The file of `--config=<file>[:<argument>]` in argv ('' if absent)."""
  for arg in argv:
    if arg.startswith('--config='):
      return arg[len('--config=') :].partition(':')[0]
  return ''


def _field_paths(config, prefix: str = '') -> list[str]:
  paths = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      paths += _field_paths(value, f'{prefix}{key}.')
    else:
      paths.append(f'{prefix}{key}')
  return paths


def _load_config(argv: list[str]) -> Any:
  """The config of `--config=<file>[:<argument>]` without overrides, or None if it fails."""
  spec = next((a[len('--config=') :] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, argument = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('dd_jax_config_for_hint', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([argument] if argument else []))
  except Exception:  # pylint: disable=broad-except  (only a hint depends on it)
    return None


def _override_paths(argv: list[str]) -> list[str]:
  return [arg[len('--config.') :].partition('=')[0] for arg in argv if arg.startswith('--config.')]


def _unknown_field_message(error: BaseException, argv: list[str]) -> str:
  """The message for an override naming no field: ml_collections' hint, or fields elsewhere in
  the config with the same name (`distill.model` -> `model.name`, `eval.model`)."""
  cause = error.args[0] if error.args else error
  text = str(cause.args[0] if isinstance(cause, Exception) and cause.args else cause)
  field, *hint = [line for line in text.splitlines() if line.strip()]
  name = field.strip('\'"')
  config = _load_config(argv)
  if not hint and config is not None:
    known = _field_paths(config)
    override = next(
      (path for path in _override_paths(argv) if name in path.split('.') and path not in known),
      None,
    )
    candidates = [path for path in known if name in path.split('.') and path != override] or [
      path for path in known if path.startswith(f'{name}.')
    ]
    if candidates:
      hint = [f'Fields named {name!r}: ' + ', '.join(f'config.{p}' for p in candidates[:4]) + '.']
  return f'the config has no field {field} (a --config.<field>=<value> override). ' + ' '.join(hint)


def config_error_message(error: BaseException, argv: list[str]) -> str:
  """One line (or a short block) saying what is wrong with the config flags and how to fix it."""
  config_file = _config_file(argv)
  chain = _chain(error)
  root = chain[-1]
  unknown_field = next((e for e in chain if isinstance(e, (AttributeError, KeyError))), None)
  if isinstance(root, SyntaxError):
    where = f'line {root.lineno}' if root.lineno else 'somewhere'
    return (
      f'--config={config_file}: Python syntax error at {where} ({root.msg}); fix the config file.'
    )
  if isinstance(root, OSError) and 'config file' in str(root):
    reason = str(root).strip().splitlines()[-1].strip()
    return f'--config={config_file} cannot be loaded ({reason}); check the path.'
  if unknown_field is not None:
    return _unknown_field_message(unknown_field, argv)
  if isinstance(error, flags.UnrecognizedFlagError) and error.flagname.startswith('config.'):
    return _unknown_field_message(KeyError(repr(error.flagname.split('.')[-1])), argv)
  if isinstance(error, flags.Error) and not str(error).startswith(f'flag --config={config_file}'):
    # A flag's own value (e.g. `--config.ipc=three`): absl's first line names it.
    return f'{str(error).splitlines()[0]}\nSee --helpfull for the flags.'
  # Raised by the file's get_config (e.g. a bad config string): its own message.
  message = str(root).strip() or type(root).__name__
  if not isinstance(root, ValueError):
    message = f'{type(root).__name__}: {message}'
  return f'--config={config_file}: {message}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for `app.run(..., flags_parser=parse_flags)`), with every error in
  loading the config file or applying an override reported by `config_error_message`."""
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      # A file that failed to load leaves a placeholder that raises on first use: use it now.
      getattr(flags.FLAGS['config'].value, 'keys', None)
    return remaining
  except Exception as error:  # pylint: disable=broad-except
    if TRACEBACK_FLAG in argv:
      raise
    refuse(config_error_message(error, argv))

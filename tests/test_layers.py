"""The package's import structure: every module imports only modules of lower layers, at the top.

Layers follow the data flow (config -> data -> sampler -> augment -> network -> losses -> optax
step -> loop -> compare / main). A new module is placed in LAYERS; an import that points up a
layer (or sideways), or an import inside a function (a lazy import dodging a cycle), fails here.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'dd_jax'

# Lowest first. A module may import modules of strictly lower layers only.
LAYERS = (
  # Nothing from dd_jax: settings, key streams, config, files, losses, kernels, guards.
  (
    'settings',
    'protocols',
    'cli',
    'progress',
    'stats',
    'keys',
    'config',
    'flops',
    'workdir',
    'checkpoint',
    'sharding',
    'losses',
    'guards',
    'augment.ops',
    'multiformation',
    'models.kernels',
    'data.dataset',
    'data.prepare_tfds',
  ),
  ('augment.dsa', 'augment.idc', 'models.layers', 'data.folder', 'data.sampler', 'report'),
  ('augment', 'models.networks', 'data.sources'),
  ('models.registry', 'data'),
  ('models',),
  ('lowering',),  # the platform's programs, resolved once per run
  ('train',),  # supervised training of networks (evaluation, pool, IDM queue)
  ('evaluate', 'pool', 'evaluate.sets'),  # evaluation; reading any set file
  ('extractors',),  # class centralization's feature sources
  (
    'distill.base',
    'distill.model_queue',
    'distill.class_steps',
  ),  # the method interface; IDM's model queue
  ('distill.dm', 'distill.idm'),  # the methods
  ('distill.family',),  # the IDC family's step (DM's stages)
  ('distill.m3d', 'distill.dance', 'distill.ncfm', 'distill.dsdm'),  # its methods
  ('distill.methods',),  # their registry
  ('presets',),  # method variants and labels, from the registry
  ('experiment',),  # config -> every settings object
  ('run',),  # a resumable run
  ('compare', 'evaluate.command'),  # a run and its baselines; any set file evaluated
  ('grid', 'main', 'info', 'evaluate.main'),
  ('evaluate.__main__',),
)
PACKAGES_WITHOUT_IMPORTS = ('', 'distill')  # dd_jax/__init__.py, dd_jax/distill/__init__.py


def _module_name(path):
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imported_module(module, name):
  """'from <module> import <name>': the submodule <module>.<name> if there is one, else module."""
  candidate = PACKAGE.parent.joinpath(*module.split('.'), name)
  return (
    f'{module}.{name}' if candidate.with_suffix('.py').exists() or candidate.is_dir() else module
  )


def _imports(path):
  """(module imported, line, at top level) for each dd_jax import of the file."""
  found = []
  tree = ast.parse(path.read_text())
  top_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # 'from dd_jax import data' imports dd_jax.data; 'from dd_jax.x import y' imports dd_jax.x
      # (or the submodule dd_jax.x.y).
      names = [_imported_module(node.module, alias.name) for alias in node.names]
    for name in names:
      if name == 'dd_jax' or name.startswith('dd_jax.'):
        found.append(
          (name.removeprefix('dd_jax').removeprefix('.'), node.lineno, id(node) in top_level)
        )
  return found


def test_every_module_imports_only_lower_layers_at_top_level():
  layer_of = {name: index for index, names in enumerate(LAYERS) for name in names}
  modules = {_module_name(path): path for path in PACKAGE.rglob('*.py')}
  unplaced = sorted(set(modules) - set(layer_of) - set(PACKAGES_WITHOUT_IMPORTS))
  assert not unplaced, f'modules missing from LAYERS: {unplaced}'
  problems = []
  for name, path in sorted(modules.items()):
    for imported, line, top_level in _imports(path):
      where = f'dd_jax/{path.relative_to(PACKAGE)}:{line} imports {imported}'
      if not top_level:
        problems.append(f'{where} inside a function or block (a lazy import)')
      elif name in PACKAGES_WITHOUT_IMPORTS:
        problems.append(f'{where}: this package module imports nothing')
      elif imported.split('.')[0] == name:  # a package importing its own submodules
        continue
      elif layer_of.get(imported, -1) >= layer_of[name]:
        problems.append(f'{where}, which is not in a lower layer')
  assert not problems, '\n'.join(problems)

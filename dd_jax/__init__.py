"""dd_jax: distribution-matching dataset distillation (DM, IDM, M3D, DANCE + the IID constraints)
in JAX/Flax, and the evaluation protocols that score the sets.

Library entry points (pure, jit/vmap/grad-safe):
  from dd_jax import losses      # mean_matching, local_covariance, covariance_matching, ...
  from dd_jax import models      # get_network(name, num_classes) -> init / apply / embed
  from dd_jax import augment     # DSA: augment(key, images, strategy, siamese=...); augment.idc
  from dd_jax import multiformation  # decode(images, factor), mix_init: f x f crops per image
  from dd_jax import data        # load_dataset(spec), ClassSampler, sample_all_classes
  from dd_jax.distill import methods, dm, idm   # the registered methods and their steps
  from dd_jax import protocols   # PROTOCOLS['idc'], resolve(config.eval): evaluation protocols
  from dd_jax import evaluate    # evaluate_set(...): fresh networks trained on a set, tested
  from dd_jax import lowering    # resolve('auto'): the platform's programs, passed explicitly
  from dd_jax import run         # run(config, workdir): a resumable distillation run
`import dd_jax` alone also reaches them (`dd_jax.losses`), imported on first use so that
`import dd_jax` stays cheap.
Runs: `python -m dd_jax.main --config=configs/digits.py --workdir=/tmp/dd_digits`; any set:
`python -m dd_jax.evaluate --synthetic=<file> --dataset=<spec> --protocol=<name> --out=<dir>`.
"""

import importlib

__version__ = '0.1.0'

# The public modules, in import order (each imports only modules above it or outside dd_jax).
_PUBLIC_MODULES = (
  'config',
  'keys',
  'losses',
  'models',
  'augment',
  'multiformation',
  'data',
  'lowering',
  'extractors',
  'protocols',
  'evaluate',
  'distill',
  'presets',
  'experiment',
  'run',
  'compare',
  'grid',
  'report',
)
__all__ = list(_PUBLIC_MODULES)


def __getattr__(name: str):
  if name in _PUBLIC_MODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_PUBLIC_MODULES))

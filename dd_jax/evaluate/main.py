"""The flags and main of `python -m dd_jax.evaluate`: any synthetic set under any protocol.

  python -m dd_jax.evaluate --synthetic=/tmp/dd_digits/compare/dm/synthetic.npz \\
      --dataset=digits --protocol=dm --out=/tmp/dd_eval
  python -m dd_jax.evaluate --synthetic=syn.pt --dataset=folder:/data/cifar10 --protocol=idc \\
      --epochs=300 --architectures=ConvNet,ResNet18 --out=/tmp/c10_idc

Reads dd_jax's synthetic.npz, a plain npz or a PyTorch file (`dd_jax.evaluate.sets`), checks it
against the dataset before any training, trains `num_eval` fresh networks of each architecture
on it under the protocol (`dd_jax.protocols`), and the same on a random real subset of the same
storage budget (ipc stored images per class), then prints and writes a table (<out>/table.md)
and the records (<out>/evaluation.json). The output directory is resumable: a rerun of the same
command skips finished rows; another command on it is refused. The work is
`dd_jax.evaluate.command.evaluate_file`; `experiments/cross_arch.py` is this main with other
defaults (several architectures, no random real subset, unfit architectures skipped).

Keys: the networks' from --seed as a run's (`fold_in(run_key(seed, 'evaluate'), step)`, step the
file's iterations for a dd_jax set, else 0), so a run's synthetic.npz with the run's seed
reproduces the run's evaluation; the random real subset and its networks as `dd_jax.compare`'s.
"""

from __future__ import annotations

import ast

from absl import app, flags, logging

from dd_jax import cli, protocols
from dd_jax import config as config_lib
from dd_jax.distill import dance
from dd_jax.evaluate import command, sets

_SYNTHETIC = flags.DEFINE_string('synthetic', None, 'The set: synthetic.npz, .npz or .pt file.')
_DATASET = flags.DEFINE_string('dataset', None, 'Dataset spec, as config.dataset.name.')
_PROTOCOL = flags.DEFINE_enum('protocol', 'dm', protocols.NAMES, 'Evaluation protocol.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (resumable).')
_ARCHITECTURES = flags.DEFINE_list('architectures', ['ConvNet'], 'Evaluation networks.')
_NUM_EVAL = flags.DEFINE_integer('num_eval', None, "Networks per architecture (protocol's).")
_EPOCHS = flags.DEFINE_integer('epochs', None, "Training epochs (protocol's).")
_OVERRIDE = flags.DEFINE_multi_string(
  'set', [], 'Any other evaluation field, e.g. --set=cutmix_probability=0 (config.eval.<field>).'
)
_FACTOR = flags.DEFINE_integer(
  'factor', None, "Multi-formation factor to decode with (dd_jax files: 1; others: protocol's)."
)
_IMAGES = flags.DEFINE_enum('images', 'auto', sets.SCALES, 'How the file stores pixels.')
_INDEX = flags.DEFINE_integer('index', 0, "The experiment of a DM reference file's 'data'.")
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the networks and of the random real subset.')
_RANDOM_REAL = flags.DEFINE_bool('random_real', True, 'Also evaluate a random real subset.')
_VALIDATION = flags.DEFINE_float(
  'validation_fraction', 0.0, 'Hold out this part of the training split and test on it.'
)
_CACHE_DIR = flags.DEFINE_string('cache_dir', '', 'Decoded-dataset cache (folder sources).')
_LOWERING = flags.DEFINE_string('lowering', 'auto', 'auto | cpu | accelerator.')
_SKIP_UNFIT = flags.DEFINE_bool(
  'skip_unfit', False, 'Skip (and list) architectures that cannot take the image size.'
)
_SOFT_LABELS = flags.DEFINE_bool(
  'soft_labels', False, "Train on a teacher's soft labels (NCFM's option; see --teacher_epochs)."
)
_TEACHER_EPOCHS = flags.DEFINE_integer(
  'teacher_epochs',
  60,
  "The soft-label teacher: a ConvNet trained this long with the IDC family's pool recipe "
  "(DANCE's), cached with the pools.",
)


def _config():
  """The experiment config these flags stand for (its eval and dataset sections)."""
  config = config_lib.default_config()
  config.dataset.name = _DATASET.value
  config.dataset.cache_dir = _CACHE_DIR.value
  config.dataset.validation_fraction = _VALIDATION.value
  config.seed = _SEED.value
  config.eval.protocol = _PROTOCOL.value
  if _NUM_EVAL.value is not None:
    config.eval.num_eval = _NUM_EVAL.value
  if _EPOCHS.value is not None:
    config.eval.epochs = _EPOCHS.value
  if _SOFT_LABELS.value:
    config.eval.soft_labels = True
    for path, value in dance.DANCE.presets.config.items():
      if path.startswith('pool.'):
        config.pool[path.removeprefix('pool.')] = value
    config.pool.size = 1
    config.pool.epochs = _TEACHER_EPOCHS.value
  for assignment in _OVERRIDE.value:
    field, sep, value = assignment.partition('=')
    if not sep or field not in config.eval:
      raise ValueError(
        f'--set={assignment}: expected <field>=<value> with a field of config.eval '
        f'({", ".join(sorted(config.eval))}).'
      )
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value  # a string, e.g. --set=augment_mode=idc
    try:
      config.eval[field] = parsed
    except TypeError as error:
      raise ValueError(f'--set={assignment}: {error}') from None
  return config


def _flag_message(message: str) -> str:
  """A settings message in this command's flags (`config.eval.epochs` -> `--epochs`)."""
  for name in ('num_eval', 'epochs'):
    message = message.replace(f'config.eval.{name}', f'--{name}')
  return message.replace('config.dataset.name', '--dataset').replace('config.eval.', '--set=')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for flag in ('synthetic', 'dataset', 'out'):
    if not flags.FLAGS[flag].value:
      cli.refuse(f'--{flag} is required.')
  logging.set_verbosity(logging.WARNING)
  try:
    config = _config()
  except ValueError as error:
    cli.refuse(str(error))
  try:
    command.evaluate_file(
      _SYNTHETIC.value,
      config,
      _OUT.value,
      architectures=tuple(_ARCHITECTURES.value),
      factor=_FACTOR.value,
      scale=_IMAGES.value,
      index=_INDEX.value,
      random_real=_RANDOM_REAL.value,
      lowering=_LOWERING.value,
      skip_unfit=_SKIP_UNFIT.value,
    )
  except command.RefusedError as error:
    cli.refuse(_flag_message(str(error)))

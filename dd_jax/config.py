"""The default experiment configuration, config-string parsing and up-front validation.

Config files under `configs/` call `default_config()` and override fields; every constant a user
may want to ablate is a named field here (never a literal in method code). Override any field on
the command line: `--config.constraints.cm.weight=0`.
"""

from __future__ import annotations

import ml_collections

METHODS = ('dm',)
SYNTHETIC_INITS = ('real', 'noise')
CC_FORMS = ('squared', 'exp')
CC_EXTRACTORS = ('matching_net',)
CM_GROUPINGS = ('channel', 'channel_row')


def default_config() -> ml_collections.ConfigDict:
  """DM + IID with the reference hyper-parameters on CIFAR-10 (SPEC sections 4, 5, 7).

  Presets override what differs: configs/digits.py (the offline main job) and configs/cifar10.py.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'dm'
  config.ipc = 10

  config.dataset = ml_collections.ConfigDict()
  # digits | tfds:<name> | folder:<path> | npz:<path>
  config.dataset.name = 'tfds:cifar10'
  config.dataset.data_dir = ''  # TFDS data_dir; '' = the TFDS default (~/tensorflow_datasets).
  config.dataset.cache_dir = ''  # folder-source decode cache; '' = $DD_JAX_CACHE or ~/.cache/dd_jax.
  # 'auto': SPEC constants for known datasets, else computed on the training split;
  # 'computed'; or a known dataset's name to force its constants.
  config.dataset.normalization = 'auto'

  config.model = ml_collections.ConfigDict()
  config.model.name = 'ConvNet'  # the distillation backbone; see `python -m dd_jax.info`.

  config.augment = ml_collections.ConfigDict()
  # One op per call, drawn from these (SPEC section 3); drop 'flip' for digit datasets.
  config.augment.strategy = 'color_crop_cutout_flip_scale_rotate'

  config.distill = ml_collections.ConfigDict()
  config.distill.iterations = 20_000
  config.distill.batch_real = 256
  config.distill.init = 'real'  # real | noise
  config.distill.lr = 1.0
  config.distill.momentum = 0.5
  config.distill.num_nets = 1  # random networks matched per step (vmap over networks)
  config.distill.eval_every = 2_000
  config.distill.checkpoint_every = 500
  config.distill.log_every = 100

  config.constraints = ml_collections.ConfigDict()
  config.constraints.cc = ml_collections.ConfigDict()
  config.constraints.cc.weight = 0.05
  # squared (reference code) | exp (paper): max(0, exp(alpha * d^2) - beta) per sample. The exp
  # form suits the 512-d pretrained extractor; on 2048-d ConvNet features d^2 ~ 2600 and
  # exp(alpha * d^2) overflows float32 above d^2 ~ 4400 at alpha 0.02.
  config.constraints.cc.form = 'squared'
  config.constraints.cc.alpha = 0.02
  config.constraints.cc.beta = 0.0
  # The reference weight 0.05 belongs to pretrained ResNet18 features (SPEC 4.3); on the random
  # matching network's features CC dominates DM at this weight.
  config.constraints.cc.extractor = 'matching_net'
  config.constraints.cm = ml_collections.ConfigDict()
  config.constraints.cm.weight = 0.01
  config.constraints.cm.grouping = 'channel'  # channel | channel_row

  config.eval = ml_collections.ConfigDict()
  config.eval.model = 'ConvNet'
  config.eval.num_eval = 5
  config.eval.epochs = 1000
  config.eval.batch_size = 256
  config.eval.lr = 0.01
  config.eval.momentum = 0.9
  config.eval.weight_decay = 5e-4
  config.eval.augment_strategy = 'color_crop_cutout_flip_scale_rotate'

  # Baselines run and tabulated next to the configured method (see dd_jax.compare).
  config.compare = ml_collections.ConfigDict()
  config.compare.variants = ''  # comma-separated: dm, dm_cc, dm_cm, dm_iid
  config.compare.random_real = False  # the random-real-subset baseline (ipc images per class)
  config.compare.full_train_epochs = 0  # > 0: also train on the full training set this long
  config.compare.full_train_num_eval = 2  # networks trained on the full set
  return config


def parse_config_string(arg: str | None, defaults: dict[str, object]) -> dict[str, object]:
  """Parses a config-file argument such as 'ipc=10,method=dm' into typed values.

  Args:
    arg: the text after ':' in `--config=configs/x.py:ipc=10,method=dm`, or None / ''.
    defaults: the accepted keys and their default values; each value's type converts the text.

  Returns:
    `defaults` updated with the parsed values.

  Raises:
    ValueError: an unknown key (listing the valid ones) or a value of the wrong type.
  """
  values = dict(defaults)
  if not arg:
    return values
  for item in arg.split(','):
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'Config argument {item!r}: expected key=value with key in '
                       f'{sorted(defaults)}, e.g. "ipc=10,method=dm".')
    kind = type(defaults[key])
    try:
      values[key] = _convert(text.strip(), kind)
    except ValueError:
      raise ValueError(f'Config argument {key}={text!r}: expected a {kind.__name__}.') from None
  return values


def _convert(text: str, kind: type) -> object:
  if kind is bool:
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(text)
    return text.lower() in ('true', '1')
  return kind(text)


def _check_choice(value, choices, field: str) -> None:
  if value not in choices:
    raise ValueError(f'config.{field}={value!r} is not valid; choose one of {list(choices)}.')


def _check_positive(value, field: str, *, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    bound = '>= 0' if allow_zero else '> 0'
    raise ValueError(f'config.{field}={value!r} must be {bound}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that does not need data; raises ValueError naming the field and the fix.

  Dataset-dependent checks (ipc against the smallest class, the dataset name itself) happen when
  the data is opened, still before any distillation work.
  """
  # Imported here so `dd_jax.config` stays importable by config files without heavy imports.
  from dd_jax import augment, models

  _check_choice(config.method, METHODS, 'method')
  _check_positive(config.ipc, 'ipc')
  _check_choice(config.model.name, models.network_names(), 'model.name')
  _check_choice(config.eval.model, models.network_names(), 'eval.model')
  for field in ('augment.strategy', 'eval.augment_strategy'):
    section, name = field.split('.')
    try:
      augment.parse_strategy(config[section][name])
    except ValueError as error:
      raise ValueError(f'config.{field}: {error}') from None
  for field in ('iterations', 'batch_real', 'num_nets', 'eval_every', 'checkpoint_every',
                'log_every', 'lr'):
    _check_positive(config.distill[field], f'distill.{field}')
  _check_positive(config.distill.momentum, 'distill.momentum', allow_zero=True)
  # A resumed run re-logs from its checkpoint; aligned windows make those lines identical.
  for field in ('checkpoint_every', 'eval_every'):
    if config.distill[field] % config.distill.log_every:
      raise ValueError(f'config.distill.{field}={config.distill[field]} must be a multiple of '
                       f'config.distill.log_every={config.distill.log_every}.')
  _check_choice(config.distill.init, SYNTHETIC_INITS, 'distill.init')
  _check_choice(config.constraints.cc.form, CC_FORMS, 'constraints.cc.form')
  _check_choice(config.constraints.cc.extractor, CC_EXTRACTORS, 'constraints.cc.extractor')
  _check_choice(config.constraints.cm.grouping, CM_GROUPINGS, 'constraints.cm.grouping')
  for term in ('cc', 'cm'):
    _check_positive(config.constraints[term].weight, f'constraints.{term}.weight', allow_zero=True)
  for field in ('num_eval', 'epochs', 'batch_size', 'lr'):
    _check_positive(config.eval[field], f'eval.{field}')
  for field in ('momentum', 'weight_decay'):
    _check_positive(config.eval[field], f'eval.{field}', allow_zero=True)
  _check_positive(config.compare.full_train_epochs, 'compare.full_train_epochs', allow_zero=True)
  _check_positive(config.compare.full_train_num_eval, 'compare.full_train_num_eval')

"""The default experiment configuration, config-string parsing and up-front validation.

Config files under `configs/` call `default_config()` and override fields; every constant a user
may want to ablate is a named field here (never a literal in method code). Override any field on
the command line: `--config.constraints.cm.weight=0`.
"""

from __future__ import annotations

import ml_collections

METHODS = ('dm', 'idm')
# The reference (lambda_CC, lambda_CM) of each method's IID variant (SPEC 4.4).
IID_WEIGHTS = {'dm': (0.05, 0.01), 'idm': (0.01, 0.03)}
SYNTHETIC_INITS = ('real', 'noise')
CC_FORMS = ('squared', 'exp')
CC_EXTRACTORS = ('matching_net', 'pool')
CM_GROUPINGS = ('channel', 'channel_row')


def default_config() -> ml_collections.ConfigDict:
  """DM + IID with the reference hyper-parameters on CIFAR-10 (SPEC sections 4, 5, 7).

  Presets override what differs: configs/digits.py (the offline main job) and configs/paper.py.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'dm'  # dm (SPEC 5) | idm (SPEC 6; presets in configs/paper.py)
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
  # DM: devices the step's classes (and networks) are split across (dd_jax.sharding); 0: all
  # that jax sees (every host's, after jax.distributed.initialize), 1: one device.
  config.distill.devices = 0
  # DM: real images embedded at once (a loop over chunks; results do not depend on it). 0: the
  # largest divisor of classes x batch_real up to 64 on CPU (cache-friendly), a class elsewhere.
  config.distill.real_chunk = 0
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
  # Whose features CC acts on: 'matching_net' (the random matching network itself, no extra
  # cost) or 'pool' (one member of a pretrained pool per iteration, the reference; see
  # config.pool). The reference weight 0.05 belongs to pretrained ResNet18 features (SPEC 4.3);
  # on the random matching network's features CC dominates DM at this weight.
  config.constraints.cc.extractor = 'matching_net'
  config.constraints.cm = ml_collections.ConfigDict()
  config.constraints.cm.weight = 0.01
  config.constraints.cm.grouping = 'channel'  # channel | channel_row

  # The pretrained pool of class-centralization extractors (used when cc.extractor='pool').
  # Reference (SPEC 4.3): 1000 ResNet18 (instance norm) x 40 epochs, SGD lr 0.01 momentum 0.9
  # wd 5e-4, batch 256, no augmentation. Built once and reused while its metadata matches.
  config.pool = ml_collections.ConfigDict()
  config.pool.model = 'ResNet18'
  config.pool.size = 1000
  config.pool.epochs = 40
  config.pool.batch_size = 256
  config.pool.lr = 0.01
  config.pool.momentum = 0.9
  config.pool.weight_decay = 5e-4
  config.pool.parallel = 8  # members trained in one program; lower it if memory runs out
  config.pool.seed = 0  # independent of config.seed, so runs of every seed share one pool
  # '' = <cache>/pools/<dataset>_<model>_<size>x<epochs>_seed<seed>, where <cache> is
  # dataset.cache_dir, $DD_JAX_CACHE or ~/.cache/dd_jax.
  config.pool.dir = ''

  # IDM (SPEC 6), used when method='idm'. Defaults: CIFAR-10 IPC 10 of the reference commands.
  config.idm = ml_collections.ConfigDict()
  config.idm.queue_init = 3  # random networks in the queue at the start
  config.idm.queue_capacity = 100  # net_num: the oldest network leaves when a push overflows
  config.idm.push_every = 30  # net_generate_interval: a new random network every N steps
  config.idm.train_nets = 2  # fetch_net_num: queue networks trained after each step
  config.idm.train_steps = 10  # model_train_steps: SGD steps per trained network
  config.idm.train_batch = 256  # real images (uniform over the training set) per SGD step
  config.idm.train_lr = 0.01
  config.idm.train_momentum = 0.9
  config.idm.train_weight_decay = 5e-4
  # Class-aware regulariser: ce_weight x (matching network's running training accuracy in
  # percent) x CE(syn). The accuracies restart every `accuracy_window` steps (the reference
  # resets them at its evaluation points, every 100 iterations).
  config.idm.ce_weight = 0.5
  config.idm.accuracy_window = 100

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
  # Comma-separated constraint variants of config.method: dm, dm_cc, dm_cm, dm_iid (or idm,
  # idm_cc, idm_cm, idm_iid), each run in <workdir>/compare/<variant>.
  config.compare.variants = ''
  config.compare.random_real = False  # the random-real-subset baseline (ipc images per class)
  config.compare.full_train_epochs = 0  # > 0: also train on the full training set this long
  config.compare.full_train_num_eval = 2  # networks trained on the full set
  return config


PRESET_METHODS = ('dm', 'dm_iid', 'idm', 'idm_iid')


def set_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets the method fields of a preset: 'dm', 'dm_iid', 'idm' or 'idm_iid'.

  DM keeps its image lr (1.0); IDM uses SGD lr 0.2 (SPEC 6). The IID variants take the method's
  reference weights (SPEC 4.4: DM 0.05 / 0.01, IDM 0.01 / 0.03); the others zero both.
  """
  if method not in PRESET_METHODS:
    raise ValueError(f'method={method!r} in the config string; choose one of {PRESET_METHODS}.')
  base, _, constraints = method.partition('_')
  config.method = base
  if base == 'idm':
    config.distill.lr = 0.2
  cc, cm = IID_WEIGHTS[base] if constraints == 'iid' else (0.0, 0.0)
  config.constraints.cc.weight, config.constraints.cm.weight = cc, cm


def set_cpu_budget(config: ml_collections.ConfigDict) -> None:
  """The reduced budget for 2-core CPUs (SPEC 4.3's prototype): 400 iterations, real batch 64
  per class (IDM queue networks also train on batches of 64), 300-epoch evaluation of 3
  networks. Same for every method, so CPU numbers compare across methods."""
  config.distill.iterations = 400
  config.distill.batch_real = 64
  config.distill.eval_every = 400
  config.distill.log_every = 20
  config.distill.checkpoint_every = 100
  config.idm.train_batch = 64
  config.eval.epochs = 300
  config.eval.num_eval = 3


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
      values[key] = convert_text(text.strip(), kind)
    except ValueError:
      raise ValueError(f'Config argument {key}={text!r}: expected a {kind.__name__}.') from None
  return values


def convert_text(text: str, kind: type) -> object:
  """`text` as a value of type `kind` (bool: true/false/1/0). Raises ValueError."""
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
  _check_positive(config.distill.devices, 'distill.devices', allow_zero=True)
  _check_positive(config.distill.real_chunk, 'distill.real_chunk', allow_zero=True)
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
  _check_choice(config.pool.model, models.network_names(), 'pool.model')
  for field in ('size', 'epochs', 'batch_size', 'lr', 'parallel'):
    _check_positive(config.pool[field], f'pool.{field}')
  for field in ('momentum', 'weight_decay'):
    _check_positive(config.pool[field], f'pool.{field}', allow_zero=True)
  for field in ('queue_init', 'queue_capacity', 'push_every', 'train_nets', 'train_batch',
                'train_lr', 'accuracy_window'):
    _check_positive(config.idm[field], f'idm.{field}')
  for field in ('train_steps', 'train_momentum', 'train_weight_decay', 'ce_weight'):
    _check_positive(config.idm[field], f'idm.{field}', allow_zero=True)
  if config.idm.queue_init > config.idm.queue_capacity:
    raise ValueError(f'config.idm.queue_init={config.idm.queue_init} exceeds '
                     f'config.idm.queue_capacity={config.idm.queue_capacity}.')
  if config.method == 'idm':
    if config.distill.num_nets != 1:
      raise ValueError(f'config.distill.num_nets={config.distill.num_nets}: IDM matches one '
                       'queue network per step; set --config.distill.num_nets=1.')
    if config.model.name.endswith('BN'):
      raise ValueError(f'config.model.name={config.model.name!r}: IDM takes one optimizer step '
                       'per class, which batch statistics over all classes cannot serve (the '
                       'reference raises too); choose a network without batch norm.')
  _check_positive(config.compare.full_train_epochs, 'compare.full_train_epochs', allow_zero=True)
  _check_positive(config.compare.full_train_num_eval, 'compare.full_train_num_eval')

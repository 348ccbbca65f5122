"""CIFAR-10 presets with the paper settings of SPEC section 5 (DM) and 4.4 (IID weights).

Config string: `ipc=<1|10|50>,method=<dm|dm_iid>,budget=<paper|cpu>` (defaults ipc=10,
method=dm_iid, budget=paper). `budget=cpu` is the reduced budget of SPEC 4.3's prototype for
2-core CPUs: 400 iterations, real batch 64 per class, 300-epoch evaluation of 3 networks (DSA
kept on in distillation and evaluation), CC on the random matching network. Measured on 2 CPU
cores: ~9 min of distillation (0.7 it/s) and ~8 min of evaluation per method at IPC 10; IPC 10
scores random real 31.6, DM 45.7, DM + CM 46.2, DM + IID 38.0 (README, CIFAR-10 benchmark). The paper budget's
DM + IID runs CC on the reference pool (1000 ResNet18 x 40 epochs, built once and cached; see
config.pool).

Run:
  python -m dd_jax.main --config=configs/cifar10.py:ipc=10,method=dm_iid --workdir=/tmp/c10_ipc10

Data: `tfds:cifar10` (prepare it once: `python -m dd_jax.data.prepare_tfds cifar10`), or the
offline JPEG archive with `--config.dataset.name=folder:/path/to/cifar10`.
Published ConvNet accuracy (SPEC section 9): DM 26.0 / 48.9 / 63.0 at IPC 1 / 10 / 50;
DM + IID 55.1 at IPC 10. 20,000 iterations with 1000-epoch evaluation.
"""

from dd_jax import config as config_lib

METHOD_CHOICES = ('dm', 'dm_iid')
BUDGET_CHOICES = ('paper', 'cpu')


def get_config(arg=None):
  args = config_lib.parse_config_string(arg, {'ipc': 10, 'method': 'dm_iid',
                                              'budget': 'paper'})
  if args['method'] not in METHOD_CHOICES:
    raise ValueError(f'configs/cifar10.py: method={args["method"]!r}; choose one of '
                     f'{METHOD_CHOICES}.')
  if args['budget'] not in BUDGET_CHOICES:
    raise ValueError(f'configs/cifar10.py: budget={args["budget"]!r}; choose one of '
                     f'{BUDGET_CHOICES}.')
  config = config_lib.default_config()
  config.dataset.name = 'tfds:cifar10'
  config.ipc = args['ipc']
  config_lib.set_method(config, args['method'])
  # DM: lr 1.0 (10 for IPC >= 100 on CIFAR-10).
  config.distill.lr = 10.0 if args['ipc'] >= 100 else 1.0
  if args['method'] == 'dm_iid' and args['budget'] == 'paper':
    config.constraints.cc.extractor = 'pool'  # the reference: 1000 ResNet18 x 40 epochs
  if args['budget'] == 'cpu':
    config_lib.set_cpu_budget(config)
  return config

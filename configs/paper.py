"""The paper settings: every dataset x IPC x method of DM, IDM, M3D, DANCE, NCFM, DSDM and their IID
versions.

Config string: `dataset=<mnist|fashion_mnist|svhn|cifar10|cifar100|tinyimagenet>,
ipc=<1|10|50>,method=<dm|idm|m3d|dance|ncfm|dsdm, each also _iid>,budget=<paper|cpu>,
iid=<reference|default>`
(defaults cifar10, 10, dm_iid, paper, reference). `iid=reference` is the IID code's CC form and
weights (faithful with the reference pool); `iid=default` is dd_jax's scale-free CC
(the methods' `presets`, experiments/results/iid_scale_free.md). For example:

  python -m dd_jax.main --config=configs/paper.py:dataset=cifar10,ipc=10,method=dm_iid \\
      --workdir=/tmp/c10_ipc10_dm_iid
  python -m dd_jax.main --config=configs/paper.py:dataset=cifar100,ipc=10,method=idm \\
      --workdir=/tmp/c100_ipc10_idm

Data: `tfds:<name>` (prepare once: `python -m dd_jax.data.prepare_tfds cifar10`), or for
CIFAR-10 the offline JPEG archive with `--config.dataset.name=folder:/path/to/cifar10`;
TinyImageNet from the tiny-imagenet-200 folder (`--config.dataset.name=folder:/path/to/
tiny-imagenet-200`, run from its parent directory by default).

DM (Zhao & Bilen, WACV 2023): 20,000 iterations, a fresh random ConvNet per step, 256 real images
per class, image SGD lr 1.0 momentum 0.5. IDM (Zhao et al., CVPR 2023): image SGD lr 0.2, one step
per class, model queue, the per-(dataset, IPC) settings of `dd_jax.distill.idm.PAPER_SETTINGS`
(MNIST, FashionMNIST and SVHN are not in the IDM paper: they take CIFAR-10's, with 256 real images
per class at IPC 1). IID (Deng et al., CVPR 2024): CC 0.05 / CM 0.01 on DM, CC 0.01 / CM 0.03 on
IDM, CC on a pool of pretrained networks (reference: 1000 ResNet18 x 40 epochs, built once per
dataset and cached; `--config.pool.size` trades fidelity for time and memory). Evaluation (the
reference protocol): 5 ConvNets x 1000 (+ 1) epochs. Digit datasets drop flip from DSA; TinyImageNet
(64x64) uses the depth-4 ConvNet. Expected GPU runtime: not yet measured (no session has had a GPU);
the step's cost is printed by `experiments/bench_speed.py`.

`budget=cpu`: one reduced budget for 2-core CPUs, the same for every method (400 iterations,
real batch 64 drawn afresh at every step, NCFM included, 300-epoch evaluation of 3 networks with
DM's protocol; CC on the random matching network unless overridden), see
dd_jax.config.set_cpu_budget and the CIFAR-10 CPU benchmark in docs/results.md.
Measured (2-core x86 CPU, jax 0.10.2, 2026-11-24 and 2026-12-04): CIFAR-10 IPC 10 takes about
17 min per method alone (9 min of distillation, 8 of evaluation), 16-30 min with the cores
shared; seed 0, test accuracy: DM 45.69 +- 0.34, DM + CM 46.21 +- 0.43, DM + IID with
`iid=reference` 38.04 +- 0.97 (the reference CC weight on the random network's features);
`iid=default`: experiments/results/iid_scale_free.md.

M3D (Zhang et al., AAAI 2024): IDC multi-formation (factor 2, "mix" init), IDC's DiffAug, one
image step per class, multi-bandwidth Gaussian MMD on a random ConvNet re-drawn every 5
iterations, 10,000 iterations, image SGD lr 10 momentum 0.5, 64 real images per class: the one
official dataset config found (PACS IPC 10); the CIFAR configs were not found, so the CIFAR
iterations and lr are UNCONFIRMED. DANCE (Zhang et al., IJCAI 2024): the same family step, mean
matching on a pool member interpolated towards its initialisation plus a calibration pass on the
member's final weights; 10,000 iterations, image lr 0.01 x ipc momentum 0.5, 128 real images per
class, 5 of a pool of 20 ConvNets x 60 epochs (SGD 0.01, batch 64, lr x0.2 at epochs 40 and 50,
DiffAug and CutMix 0.5). NCFM (Wang et al., CVPR 2025; the official configs, every CIFAR IPC):
DANCE's step with the characteristic-function loss (4096 Gaussian frequencies per class step,
no sampling network), 20,000 iterations, AdamW lr 1e-3 weight decay 5e-4 halved on a 500-iteration
plateau (CIFAR-100 IPC 10: SGD 0.01 momentum 0.5), the first 1024 training images of each class,
all 20 members of a pool pretrained with batch 128. DSDM (Li et al., ACM MM 2024): mean +
covariance + prototype loss on the final weights of 10 ConvNets x 20 epochs (batch 256, no lr
schedule), 10,000 iterations, image SGD lr 0.01 x ipc momentum 0.5, 256 real images per class;
TinyImageNet settings of NCFM and DSDM are CIFAR's with the depth-4 ConvNet (UNCONFIRMED).
The family's codes step the images' [0, 1] pixels, and so does dd_jax for them
(`distill.image_space=pixel`): their learning rates are the codes'.
`budget=cpu` gives DANCE, NCFM and DSDM one shared pool of 5 ConvNets x 2 epochs with DANCE's
recipe (`presets.share_family_pool`), each method drawing from all of it.

Published ConvNet accuracy (the papers), IPC 1 / 10 / 50:
  DM:   CIFAR-10 26.0 / 48.9 / 63.0, CIFAR-100 11.4 / 29.7 / 43.6, TinyImageNet 3.9 / 12.9 / 24.1
  IDM:  CIFAR-10 45.6 / 58.6 / 67.5, CIFAR-100 20.1 / 45.1 / 50.0, TinyImageNet 10.1 / 21.9 / 27.7
  DM + IID: CIFAR-10 55.1, CIFAR-100 32.2, TinyImageNet 15.4 at IPC 10 (others not published).
  M3D:  CIFAR-10 45.3 / 63.5 / 69.9, CIFAR-100 26.2 / 42.4 / 50.9
  DANCE: CIFAR-10 47.1 / 70.8 / 76.1, CIFAR-100 27.9 / 49.8 / 52.8, TinyImageNet 11.6 / 26.4 / 28.9
  DSDM: CIFAR-10 45.0 / 66.5 / 75.8, CIFAR-100 19.5 / 46.2 / 54.0 (as NCFM's table quotes them)
  NCFM: CIFAR-10 49.5 / 71.8 / 77.4, CIFAR-100 34.4 / 48.7 / 54.7, TinyImageNet 18.2 / 26.8 / 29.6
  (NCFM's protocol, likely with soft labels; without them and without the sampling network
  CIFAR-10 IPC 10 / 50: 65.6 / 74.2)
  (M3D, DANCE, NCFM and DSDM with the IDC family's evaluation protocols: 1000-2000 epochs on
  the decoded set, DiffAug, CutMix, a multi-step schedule, the best test accuracy over
  evaluation points. `budget=paper` evaluates each method with its paper's protocol
  (`config.eval.protocol`: dm, idc for M3D, dance, ncfm, dsdm; dd_jax.protocols), `budget=cpu`
  every method with DM's at 300 epochs.)
MNIST, FashionMNIST and SVHN have no published DM / IDM number (the IID paper reports up to
+2.9 over the base method on SVHN).
"""

from dd_jax import config as config_lib
from dd_jax import presets, protocols
from dd_jax.distill import methods

DATASETS = {
  'mnist': 'tfds:mnist',
  'fashion_mnist': 'tfds:fashion_mnist',
  'svhn': 'tfds:svhn_cropped',
  'cifar10': 'tfds:cifar10',
  'cifar100': 'tfds:cifar100',
  'tinyimagenet': 'folder:tiny-imagenet-200',
}
DIGIT_DATASETS = (
  'mnist',
  'fashion_mnist',
)  # no horizontal flip in DSA (DSA, Zhao & Bilen, ICML 2021)
IPCS = (1, 10, 50)
METHODS = presets.variants(('', '_iid'))  # every registered method, without and with IID
BUDGETS = ('paper', 'cpu')


def _without_flip(strategy: str) -> str:
  return '_'.join(op for op in strategy.split('_') if op != 'flip')


def _choose(args: dict, field: str, choices: tuple) -> None:
  if args[field] not in choices:
    raise ValueError(f'configs/paper.py: {field}={args[field]!r}; choose one of {choices}.')


def get_config(arg=None):
  args = config_lib.parse_config_string(
    arg,
    {'dataset': 'cifar10', 'ipc': 10, 'method': 'dm_iid', 'budget': 'paper', 'iid': 'reference'},
  )
  _choose(args, 'dataset', tuple(DATASETS))
  _choose(args, 'ipc', IPCS)
  _choose(args, 'method', METHODS)
  _choose(args, 'budget', BUDGETS)
  dataset, ipc, method = args['dataset'], args['ipc'], args['method']
  config = config_lib.default_config()
  config.dataset.name = DATASETS[dataset]
  config.ipc = ipc
  presets.set_method(config, method, args['iid'])
  if args['budget'] == 'paper':  # the protocol of the method's published numbers
    config.eval.protocol = methods.get(config.method).presets.protocol
  # Digits drop flip from the evaluation's augmentation and DM's DSA; the IDC family's DiffAug
  # (its presets') has none.
  if dataset in DIGIT_DATASETS:
    protocol = protocols.PROTOCOLS[config.eval.protocol]
    config.eval.augment_strategy = _without_flip(protocol.values['augment_strategy'])
    if 'augment.strategy' not in methods.get(config.method).presets.config:
      config.augment.strategy = 'color_crop_cutout_scale_rotate'
  if dataset == 'tinyimagenet':  # 64x64: the depth-4 ConvNet of the references
    config.model.name = 'ConvNetD4'
    config.eval.model = 'ConvNetD4'
    if methods.get(config.method).uses_pool:  # the method's own networks come from the pool
      config.pool.model = 'ConvNetD4'
  with_iid = method.endswith('_iid')
  methods.get(config.method).paper_preset(config, dataset, ipc, with_iid)
  if with_iid:
    config.constraints.cc.extractor = 'pool'  # the reference: a pretrained ResNet18 pool
  if args['budget'] == 'cpu':
    config_lib.set_cpu_budget(config)
    presets.share_family_pool(config)
    config.constraints.cc.extractor = 'matching_net'
  return config

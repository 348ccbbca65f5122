"""The main job: DM + IID on scikit-learn's bundled 8x8 digits, small enough for a laptop CPU.

Run:
  python -m dd_jax.main --config=configs/digits.py --workdir=/tmp/dd_digits

Config string: `ipc=<n>,method=<dm|dm_iid>` (defaults ipc=3, method=dm_iid).
"""

from dd_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_config_string(arg, {'ipc': 3, 'method': 'dm_iid'})
  config = config_lib.default_config()
  config.dataset.name = 'digits'
  config.ipc = args['ipc']
  # Digits are not mirror-symmetric: no flip (SPEC section 3).
  config.augment.strategy = 'color_crop_cutout_scale_rotate'
  config.eval.augment_strategy = 'color_crop_cutout_scale_rotate'
  config.distill.iterations = 200
  config.distill.batch_real = 64
  config.distill.eval_every = 200
  config.distill.log_every = 20
  config.distill.checkpoint_every = 100
  config.eval.epochs = 300
  config.compare.variants = 'dm'
  config.compare.random_real = True
  config.compare.full_train_epochs = 20
  if args['method'] == 'dm':
    config.constraints.cc.weight = 0.0
    config.constraints.cm.weight = 0.0
  return config

"""Default config: DM + IID (reference weights) on scikit-learn's bundled 8x8 digits.

Run (from the repository root):
  python -m dd_jax.main --config=configs/default.py --workdir=/tmp/dd_default

Every field is documented in `dd_jax/config.py`; override any of them on the command line, e.g.
`--config.ipc=3 --config.constraints.cm.weight=0`. Presets import this default and override a
few fields (see configs/digits.py, configs/cifar10.py).
"""

from dd_jax import config as config_lib


def get_config():
  return config_lib.default_config()

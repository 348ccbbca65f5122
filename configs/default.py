"""Default config: DM + IID with the reference settings on CIFAR-10 (TFDS, prepared once).

Run (from the repository root):
  python -m dd_jax.main --config=configs/default.py --workdir=/tmp/dd_default
  # offline, on the JPEG archive: --config.dataset.name=folder:/path/to/cifar10

Every field is documented in `dd_jax/config.py`; override any of them on the command line, e.g.
`--config.ipc=3 --config.constraints.cm.weight=0`. Presets import this default and override a
few fields (see configs/digits.py, configs/paper.py).
"""

from dd_jax import config as config_lib


def get_config():
  return config_lib.default_config()

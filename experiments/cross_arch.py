"""Cross-architecture evaluation of a saved synthetic set: `python -m dd_jax.evaluate` with
several architectures, no random real subset, and the architectures that cannot take the image
size listed and skipped.

  python experiments/cross_arch.py --synthetic=/tmp/dd_digits/synthetic.npz --dataset=digits \\
      --architectures=ConvNet,AlexNet,VGG11,ResNet18,MLP,LeNet --epochs=300 \\
      --set=augment_strategy=color_crop_cutout_scale_rotate --out=/tmp/cross_arch

Prints the table of mean +- std per architecture with the largest drop from the first
(ConvNet), and writes <out>/table.md and <out>/evaluation.json. Every flag of the command
(`python -m dd_jax.evaluate --help`) applies, e.g. --protocol=idc.
"""

from absl import app, flags

from dd_jax import cli
from dd_jax.evaluate import main

flags.FLAGS.set_default('architectures', ['ConvNet', 'AlexNet', 'VGG11', 'ResNet18'])
flags.FLAGS.set_default('random_real', False)
flags.FLAGS.set_default('skip_unfit', True)

if __name__ == '__main__':
  app.run(main.main, flags_parser=cli.parse_flags)

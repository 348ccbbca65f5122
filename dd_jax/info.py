"""What dd_jax provides, and what a config resolves to.

  python -m dd_jax.info                   # methods, networks, data, DSA ops, protocols, lowering
  python -m dd_jax.info --config=configs/digits.py:ipc=10 --config.distill.lr=2
      # every config field: its resolved value and its documentation

Without --config the fields listed are those of dd_jax.config.default_config().
"""

import textwrap

import jax
import ml_collections
from absl import app
from ml_collections import config_flags

from dd_jax import augment, cli, data, models, protocols
from dd_jax import config as config_lib
from dd_jax import lowering as lowering_lib
from dd_jax.distill import methods

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'A config file to resolve (with overrides), as for dd_jax.main.', lock_config=True
)


def config_fields(config: ml_collections.ConfigDict) -> list[tuple[str, object, str]]:
  """(field, value, documentation) for every leaf field of `config`, sorted by name."""
  docs = config_lib.field_docs()
  fields = []

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f'{prefix}{key}.')
      else:
        fields.append((f'{prefix}{key}', value, docs.get(f'{prefix}{key}', '')))

  walk(config, '')
  return fields


def format_fields(config: ml_collections.ConfigDict) -> str:
  """Every field with its value and documentation; an unset evaluation field shows its
  protocol's value."""
  from_protocol = protocols.resolve(config.eval)
  lines = []
  for name, value, doc in config_fields(config):
    section, _, field = name.partition('.')
    if section == 'eval' and value is None and field in from_protocol:
      shown = f'None  -> {from_protocol[field]!r} (protocol {from_protocol["protocol"]})'
    else:
      shown = repr(value)
    lines.append(f'  config.{name} = {shown}')
    lines += textwrap.wrap(doc, 96, initial_indent=' ' * 6, subsequent_indent=' ' * 6)
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is not None:
    print('Config fields (override any with --config.<field>=<value>):')
    print(format_fields(_CONFIG.value))
    return
  print('Methods (config.method; presets add _cc, _cm, _iid):')
  for name in methods.names():
    presets = methods.get(name).presets
    print(f'  {name:<14} image lr {presets.image_lr:g}')
  print(f'Lowering (config.compute.lowering=auto): {lowering_lib.resolve("auto").name}')
  print('Networks (parameters for a 32x32x3 input, 10 classes):')
  for name in models.network_names():
    net = models.get_network(name, 10)
    shapes = jax.eval_shape(lambda key: net.init(key, (1, 32, 32, 3)), jax.random.key(0))
    count = models.param_count(shapes)
    print(f'  {name:<14} {count:>12,}')
  print('Data sources (config.dataset.name):')
  print('  ' + ', '.join(data.SOURCES) + '  (see dd_jax.data.load_dataset)')
  print(f'DSA ops (config.augment.strategy, joined by "_"): {", ".join(augment.VALID_OPS)}')
  print('Evaluation protocols (config.eval.protocol; docs/method.md):')
  for protocol in protocols.PROTOCOLS.values():
    values = protocol.values
    print(
      f'  {protocol.name:<13} {values["epochs"]} epochs, {values["optimizer"]} lr '
      f'{values["lr"]:g}, batch {values["batch_size"]}, {values["augment_mode"]}, CutMix '
      f'{values["cutmix_probability"]:g}, factor {protocol.factor}, reports {protocol.reported}'
    )
  print('Config fields of dd_jax.config.default_config() (--config=<file> resolves a preset):')
  print(format_fields(config_lib.default_config()))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

"""Lists what dd_jax provides: networks (with parameter counts), data sources, DSA ops.

python -m dd_jax.info
"""

import jax

from dd_jax import augment, data, models


def main() -> None:
  print('Networks (parameters for a 32x32x3 input, 10 classes):')
  for name in models.network_names():
    net = models.get_network(name, 10)
    shapes = jax.eval_shape(lambda key: net.init(key, (1, 32, 32, 3)), jax.random.key(0))
    count = models.param_count(shapes)
    print(f'  {name:<14} {count:>12,}')
  print('Data sources (config.dataset.name):')
  print('  ' + ', '.join(data.SOURCES) + '  (see dd_jax.data.load_dataset)')
  print(f'DSA ops (config.augment.strategy, joined by "_"): {", ".join(augment.VALID_OPS)}')


if __name__ == '__main__':
  main()

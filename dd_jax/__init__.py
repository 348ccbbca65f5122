"""dd_jax: distribution-matching dataset distillation (DM, IDM + the IID constraints) in JAX/Flax.

Library entry points (pure, jit/vmap/grad-safe):
  from dd_jax import losses      # mean_matching, local_covariance, covariance_matching, ...
  from dd_jax import models      # get_network(name, num_classes) -> init / apply / embed
  from dd_jax import augment     # DSA: augment(key, images, strategy, siamese=...)
  from dd_jax import data        # load_dataset(spec), ClassSampler, sample_all_classes
  from dd_jax.distill import methods, dm, idm   # the registered methods and their steps
Runs: `python -m dd_jax.main --config=configs/digits.py --workdir=/tmp/dd_digits`.
"""

__version__ = '0.1.0'

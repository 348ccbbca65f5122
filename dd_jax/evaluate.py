"""The evaluation protocol (SPEC section 7): train fresh networks on a small set, test on real data.

`num_eval` networks are trained together in one jitted program (`dd_jax.train`: `vmap` over
networks, `scan` over epochs and minibatches). Each network has its own initialisation, data
order and augmentation parameters; the DSA op of a minibatch step is shared by the networks.

Protocol: SGD (momentum 0.9, coupled weight decay 5e-4 applied to every parameter, as PyTorch's
SGD), batch 256 reshuffled every epoch without dropping the last partial batch, mean
cross-entropy, DSA on every minibatch (one op per batch, parameters per image). The learning
rate drops x0.1 after half the epochs and the momentum buffer is reset then (the reference code
builds a new optimizer). Test accuracy once, at the end, on the full test set.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import models
from dd_jax import train as train_lib


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Evaluation hyper-parameters (config section `eval`)."""
  model: str = 'ConvNet'
  num_eval: int = 5
  epochs: int = 1000
  batch_size: int = 256
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment_strategy: str = 'color_crop_cutout_flip_scale_rotate'
  test_batch_size: int = 1000

  @classmethod
  def from_config(cls, eval_config) -> 'EvalSettings':
    return cls(**{field.name: eval_config[field.name] for field in dataclasses.fields(cls)
                  if field.name in eval_config})

  def train_settings(self) -> train_lib.TrainSettings:
    return train_lib.TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                   momentum=self.momentum, weight_decay=self.weight_decay,
                                   augment_strategy=self.augment_strategy, lr_drop=True)


@functools.partial(jax.jit, static_argnames=('net', 'settings'))
def _train_and_test(key, images, labels, test_images, test_labels, net, settings):
  net_keys = jax.random.split(jax.random.fold_in(key, 0), settings.num_eval)
  op_key = jax.random.fold_in(key, 1)
  variables = train_lib.train_networks(net_keys, op_key, images, labels, net,
                                       settings.train_settings())
  return train_lib.accuracies(variables, net, test_images, test_labels,
                              settings.test_batch_size)


def evaluate_set(key: jax.Array, images: jax.Array, labels: jax.Array, test_images: jax.Array,
                 test_labels: jax.Array, num_classes: int,
                 settings: EvalSettings = EvalSettings()) -> np.ndarray:
  """Trains `settings.num_eval` fresh networks on (images, labels) and tests them.

  Args:
    key: PRNG key (initialisations, data order, augmentation).
    images: [N, H, W, C] normalised training images (a synthetic set or a real subset).
    labels: [N] int labels.
    test_images: [M, H, W, C] normalised real test images.
    test_labels: [M] int labels.
    num_classes: K.
    settings: the protocol's hyper-parameters.

  Returns:
    [num_eval] test accuracies in percent, one per network.
  """
  net = models.get_network(settings.model, num_classes)
  accuracies = _train_and_test(key, jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32),
                               jnp.asarray(test_images, jnp.float32),
                               jnp.asarray(test_labels, jnp.int32), net, settings)
  return np.asarray(accuracies) * 100.0


def random_real_subset(key: jax.Array, labels: np.ndarray, ipc: int) -> np.ndarray:
  """Indices of `ipc` random training images per class, class-blocked (the baseline's set).

  Args:
    key: PRNG key.
    labels: [N] training labels.
    ipc: images per class.

  Returns:
    [K * ipc] indices, class 0's first.
  """
  labels = np.asarray(labels)
  indices = []
  for class_id in range(int(labels.max()) + 1):
    members = np.flatnonzero(labels == class_id)
    chosen = jax.random.choice(jax.random.fold_in(key, class_id), len(members), (ipc,),
                               replace=False)
    indices.append(members[np.asarray(chosen)])
  return np.concatenate(indices)


def cross_architecture(key: jax.Array, images: jax.Array, labels: jax.Array,
                       test_images: jax.Array, test_labels: jax.Array, num_classes: int,
                       architectures: tuple[str, ...], settings: EvalSettings = EvalSettings(),
                       reference: str = 'ConvNet') -> dict[str, Any]:
  """The evaluation protocol on several architectures, and the largest drop from `reference`.

  Args:
    key: PRNG key (the same for every architecture).
    images, labels, test_images, test_labels, num_classes: as `evaluate_set`.
    architectures: registry names, e.g. ('ConvNet', 'AlexNet', 'VGG11', 'ResNet18').
    settings: the protocol; its `model` field is replaced by each architecture.
    reference: the architecture drops are measured from (included if missing).

  Returns:
    {'results': {name: {'accuracies', 'mean', 'std'} or {'error': message}},
     'largest_drop': {'model', 'drop'} (mean accuracy points below `reference`) or None}.
    An architecture that cannot take the image size (e.g. ResNet18 on 8x8 digits) is reported
    with its error instead of stopping the others.
  """
  names = tuple(dict.fromkeys((reference, *architectures)))
  results = {}
  for name in names:
    try:
      accuracies = evaluate_set(key, images, labels, test_images, test_labels, num_classes,
                                dataclasses.replace(settings, model=name))
    except ValueError as error:
      results[name] = {'error': str(error)}
      continue
    results[name] = {'accuracies': [float(a) for a in accuracies],
                     'mean': float(np.mean(accuracies)), 'std': float(np.std(accuracies))}
  largest_drop = None
  if 'mean' in results[reference]:
    drops = {name: results[reference]['mean'] - r['mean'] for name, r in results.items()
             if name != reference and 'mean' in r}
    if drops:
      worst = max(drops, key=drops.get)
      largest_drop = {'model': worst, 'drop': drops[worst]}
  return {'results': results, 'largest_drop': largest_drop}

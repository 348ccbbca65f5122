"""A straightforward PyTorch implementation of the distillation steps, the speed baseline.

Written for `bench_speed.py --pytorch` in the style of the reference code (Zhao & Bilen's DM,
Zhao et al.'s IDM, Deng et al.'s IID): Python loops over classes, one network call per class,
siamese DSA drawn per class, eager autograd. It does the same work as dd_jax's steps on the same
shapes (the ConvNet, the DM + CC + CM objective, the IDM expansion, queue training and
class-aware cross-entropy, an evaluation epoch), so the two can be timed side by side;
`tests/test_torch_baseline.py` checks that its objective and gradients equal dd_jax's on the same
weights. It is a benchmark, not a second implementation: nothing in dd_jax imports it.

Needs the optional `bench` extra: pip install -e '.[bench]'. Tensors are NCHW float32 on CPU.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

STRATEGY = ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate')


class ConvNet(nn.Module):
  """depth x (conv 3x3 -> instance norm -> ReLU -> 2x2 average pool), then a dense classifier.

  PyTorch's default initialisation, which is what dd_jax's ConvNet reproduces.
  """

  def __init__(self, channels=3, num_classes=10, width=128, depth=3, image_size=32):
    super().__init__()
    layers, in_channels = [], channels
    for _ in range(depth):
      layers += [
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.GroupNorm(width, width, affine=True),  # instance norm, eps 1e-5
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2),
      ]
      in_channels = width
    self.features = nn.Sequential(*layers)
    side = image_size // 2**depth
    self.classifier = nn.Linear(width * side * side, num_classes)

  def embed(self, x: torch.Tensor) -> torch.Tensor:
    """The final feature map [N, C, h, w]."""
    return self.features(x)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------- DSA


def augment(x: torch.Tensor, op: str, generator: torch.Generator, siamese: bool) -> torch.Tensor:
  """One DSA op on [N, C, H, W]; siamese: one parameter draw shared by the whole batch."""
  n, _, h, w = x.shape
  draws = 1 if siamese else n

  def uniform(*shape):
    return torch.rand(draws, *shape, generator=generator).expand(n, *shape)

  if op == 'color':
    x = x + (uniform(1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (2 * uniform(1, 1, 1)) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (uniform(1, 1, 1) + 0.5) + mean
  if op == 'crop':
    shift = int(0.125 * h + 0.5)
    rows = torch.randint(-shift, shift + 1, (draws, 1, 1), generator=generator).expand(n, 1, 1)
    cols = torch.randint(-shift, shift + 1, (draws, 1, 1), generator=generator).expand(n, 1, 1)
    batch, grid_rows, grid_cols = torch.meshgrid(
      torch.arange(n), torch.arange(h), torch.arange(w), indexing='ij'
    )
    grid_rows = torch.clamp(grid_rows + rows + 1, 0, h + 1)
    grid_cols = torch.clamp(grid_cols + cols + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[batch, grid_rows, grid_cols].permute(0, 3, 1, 2)
  if op == 'cutout':
    side = int(0.5 * h + 0.5)
    centre_rows = torch.randint(0, h + (1 - side % 2), (draws, 1, 1), generator=generator)
    centre_cols = torch.randint(0, w + (1 - side % 2), (draws, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    top, left = centre_rows - side // 2, centre_cols - side // 2
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return x * (~inside).expand(n, h, w).unsqueeze(1).to(x.dtype)
  if op == 'flip':
    return torch.where(uniform(1, 1, 1) < 0.5, x.flip(3), x)
  if op in ('scale', 'rotate'):
    if op == 'scale':
      sx, sy = uniform(1) * (1.2 - 1 / 1.2) + 1 / 1.2, uniform(1) * (1.2 - 1 / 1.2) + 1 / 1.2
      zero = torch.zeros_like(sx)
      theta = torch.stack([torch.cat([sx, zero, zero], 1), torch.cat([zero, sy, zero], 1)], 1)
    else:
      angle = (uniform(1) - 0.5) * 2 * 15 / 180 * math.pi
      cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
      theta = torch.stack([torch.cat([cos, sin, zero], 1), torch.cat([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)
  raise ValueError(f'unknown DSA op {op!r}')


def random_op(generator: torch.Generator) -> str:
  return STRATEGY[int(torch.randint(len(STRATEGY), (1,), generator=generator))]


# ------------------------------------------------------------------------------------- losses


def local_covariance(feature_map: torch.Tensor) -> torch.Tensor:
  """[N, C, h, w] -> [C, C]: sum over positions of the per-position biased covariance."""
  n, c = feature_map.shape[:2]
  centred = feature_map - feature_map.mean(dim=0, keepdim=True)
  vectors = centred.reshape(n, c, -1)
  return torch.einsum('nip,njp->ij', vectors, vectors) / n


@dataclasses.dataclass(frozen=True)
class Weights:
  cc: float = 0.05
  cm: float = 0.01


def class_objective(
  real_map: torch.Tensor, syn_map: torch.Tensor, weights: Weights
) -> torch.Tensor:
  """DM + cc * CC (squared form) + cm * CM of one class, from final feature maps [N, C, h, w]."""
  real_map = real_map.detach()
  real_features, syn_features = real_map.flatten(1), syn_map.flatten(1)
  loss = ((real_features.mean(0) - syn_features.mean(0)) ** 2).sum()
  if weights.cc:
    loss = loss + weights.cc * ((syn_features - syn_features.mean(0)) ** 2).sum()
  if weights.cm:
    difference = local_covariance(real_map) - local_covariance(syn_map)
    loss = loss + weights.cm * (difference**2).sum()
  return loss


# -------------------------------------------------------------------------------------- steps


def frozen(net: nn.Module) -> nn.Module:
  for parameter in net.parameters():
    parameter.requires_grad_(False)
  return net


def dm_step(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  batch_real: int,
  weights: Weights,
  generator: torch.Generator,
  augment_images: bool = True,
) -> float:
  """One DM (+ IID) iteration: a fresh random ConvNet, a loop over classes, one image update.

  Args:
    images: [K * ipc, C, H, W] synthetic images (a leaf that requires grad), class-major.
    optimizer: over [images].
    real_by_class: K tensors [n_c, C, H, W].
    batch_real: real images per class.
    weights: CC and CM weights (0 skips a term).
    generator: the source of every random draw.
    augment_images: siamese DSA (False: none, for tests).

  Returns:
    The loss summed over classes.
  """
  num_classes = len(real_by_class)
  ipc = images.shape[0] // num_classes
  net = frozen(ConvNet(images.shape[1], num_classes, image_size=images.shape[2]))
  loss = torch.zeros(())
  for c, real in enumerate(real_by_class):
    real = real[torch.randperm(real.shape[0], generator=generator)[:batch_real]]
    syn = images[c * ipc : (c + 1) * ipc]
    if augment_images:
      op, seed = random_op(generator), int(torch.randint(2**31, (1,), generator=generator))
      real = augment(real, op, torch.Generator().manual_seed(seed), siamese=True)
      syn = augment(syn, op, torch.Generator().manual_seed(seed), siamese=True)
    loss = loss + class_objective(net.embed(real), net.embed(syn), weights)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return float(loss.detach())


def expand(stored: torch.Tensor) -> torch.Tensor:
  """IDM: each stored image holds 4 half-size images (2 x 2); [N, C, H, W] -> [4N, C, H, W]."""
  h, w = stored.shape[2] // 2, stored.shape[3] // 2
  quadrants = [
    stored[:, :, :h, :w],
    stored[:, :, h:, :w],
    stored[:, :, :h, w:],
    stored[:, :, h:, w:],
  ]
  return F.interpolate(torch.cat(quadrants), scale_factor=2, mode='bilinear', align_corners=False)


@dataclasses.dataclass
class QueueNet:
  net: ConvNet
  optimizer: torch.optim.Optimizer


def queue_net(channels: int, num_classes: int, image_size: int) -> QueueNet:
  net = ConvNet(channels, num_classes, image_size=image_size)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  return QueueNet(net, optimizer)


def idm_step(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  real_all: tuple[torch.Tensor, torch.Tensor],
  queue: list[QueueNet],
  batch_real: int,
  weights: Weights,
  generator: torch.Generator,
  ce_weight: float = 0.5,
  accuracy: float = 50.0,
  train_nets: int = 2,
  train_steps: int = 10,
  train_batch: int = 256,
) -> float:
  """One IDM (+ IID) iteration: match with one queue network, one image update per class, then
  train `train_nets` queue networks for `train_steps` SGD steps on real batches.

  Args:
    images: [K * ipc, C, H, W] stored (partitioned) images, a leaf that requires grad.
    optimizer: over [images].
    real_by_class: K tensors [n_c, C, H, W].
    real_all: (images [n, C, H, W], labels [n]) of the whole training set.
    queue: the model queue.
    batch_real: real images per class.
    weights: CC and CM weights on the expanded images.
    generator: the source of every random draw.
    ce_weight: class-aware cross-entropy weight, times `accuracy` (percent).
    accuracy: the matching network's running accuracy (fixed here: it changes no work).
    train_nets, train_steps, train_batch: the queue training.

  Returns:
    The loss summed over classes.
  """
  num_classes = len(real_by_class)
  ipc = images.shape[0] // num_classes
  member = queue[int(torch.randint(len(queue), (1,), generator=generator))].net
  for parameter in member.parameters():
    parameter.requires_grad_(False)
  total = 0.0
  for c, real in enumerate(real_by_class):
    real = real[torch.randperm(real.shape[0], generator=generator)[:batch_real]]
    syn = expand(images[c * ipc : (c + 1) * ipc])
    op, seed = random_op(generator), int(torch.randint(2**31, (1,), generator=generator))
    real = augment(real, op, torch.Generator().manual_seed(seed), siamese=True)
    syn = augment(syn, op, torch.Generator().manual_seed(seed), siamese=True)
    syn_map = member.embed(syn)
    logits = member.classifier(syn_map.flatten(1))
    labels = torch.full((syn.shape[0],), c, dtype=torch.long)
    loss = class_objective(member.embed(real), syn_map, weights)
    loss = loss + ce_weight * accuracy * F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    total += float(loss.detach())
  for parameter in member.parameters():
    parameter.requires_grad_(True)
  real_images, real_labels = real_all
  for index in torch.randperm(len(queue), generator=generator)[:train_nets].tolist():
    trained = queue[index]
    for _ in range(train_steps):
      batch = torch.randint(real_images.shape[0], (train_batch,), generator=generator)
      loss = F.cross_entropy(trained.net(real_images[batch]), real_labels[batch])
      trained.optimizer.zero_grad()
      loss.backward()
      trained.optimizer.step()
  return total


def evaluation_epoch(
  net: ConvNet,
  optimizer: torch.optim.Optimizer,
  images: torch.Tensor,
  labels: torch.Tensor,
  generator: torch.Generator,
  batch_size: int = 256,
) -> float:
  """One epoch of evaluation training: shuffled batches, one DSA op per batch (per-image draws),
  cross-entropy, SGD. Returns the last batch's loss."""
  order = torch.randperm(images.shape[0], generator=generator)
  loss = torch.zeros(())
  for start in range(0, images.shape[0], batch_size):
    batch = order[start : start + batch_size]
    x = augment(images[batch], random_op(generator), generator, siamese=False)
    loss = F.cross_entropy(net(x), labels[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  return float(loss.detach())

"""A straightforward PyTorch implementation of the distillation steps, the speed baseline.

Written for `bench_speed.py --pytorch` in the style of the reference code (Zhao & Bilen's DM,
Zhao et al.'s IDM, Deng et al.'s IID): Python loops over classes, one network call per class,
siamese DSA drawn per class, eager autograd. It does the same work as dd_jax's steps on the same
shapes (the ConvNet, the DM + CC + CM objective, the IDM expansion, queue training and
class-aware cross-entropy, an evaluation epoch), so the two can be timed side by side;
`tests/test_torch_baseline.py` checks that its objective and gradients equal dd_jax's on the same
weights. It is a benchmark, not a second implementation: nothing in dd_jax imports it.

The IDC family (`m3d_step`, `dance_step`, `ncfm_step`, `dsdm_step`) is written from the formulas
of the official codes (docs/method.md, "The IDC family"), as they compute an iteration: the
stored images kept in [0, 1] and clamped, normalised first thing in the augmentation; per class
a real batch, the class's stored images decoded (factor 2: row-major crops, `F.interpolate`
bilinear, align_corners=False), one IDC DiffAug draw (batch mode, colour / crop / cutout)
shared by the real and decoded images, and `optimizer.step()` inside the class loop on the
whole tensor. M3D matches with a multi-bandwidth Gaussian MMD on a random ConvNet re-drawn
every 5 iterations; DANCE with mean matching on lambda * initial + (1 - lambda) * final weights
of a pool member (state dicts interpolated and loaded, `load_state_dict`), then a calibration
pass: per class the final ("expert") network's cross-entropy on a fresh draw of the decoded
images, one more step.
NCFM as DANCE, with the characteristic-function loss on unit-normalised features (4096 Gaussian
frequencies drawn per class step), every class's first `batch_real` real images, AdamW and a
plateau scheduler stepped per iteration; DSDM with mean, covariance and class-prototype matching
on a pool member's final weights, SGD, then a no-grad pass moving the prototypes.

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


def mean_matching(real_features: torch.Tensor, syn_features: torch.Tensor) -> torch.Tensor:
  """DM's (and DANCE's) matching term: || mean real - mean syn ||^2, summed over features."""
  return ((real_features.detach().mean(0) - syn_features.mean(0)) ** 2).sum()


GAUSSIAN_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd_matching(real_features: torch.Tensor, syn_features: torch.Tensor) -> torch.Tensor:
  """M3D's matching term: the biased squared MMD under a sum of 5 Gaussian kernels.

  Z = [syn; real], D2 = cdist(Z, Z) ** 2, base bandwidth b = sum(D2) / (n^2 - n) detached,
  K = sum over m in {1/4, 1/2, 1, 2, 4} of exp(-D2 / (m b)); mean(K_ss) - 2 mean(K_sr) +
  mean(K_rr), diagonals included.
  """
  num_syn = syn_features.shape[0]
  z = torch.cat([syn_features, real_features.detach()])
  n = z.shape[0]
  distances = torch.cdist(z, z) ** 2
  bandwidth = distances.detach().sum() / (n * n - n)
  kernel = sum(torch.exp(-distances / (m * bandwidth)) for m in GAUSSIAN_MULTIPLIERS)
  return (
    kernel[:num_syn, :num_syn].mean()
    - 2 * kernel[:num_syn, num_syn:].mean()
    + kernel[num_syn:, num_syn:].mean()
  )


def class_objective(
  real_map: torch.Tensor, syn_map: torch.Tensor, weights: Weights, match=mean_matching
) -> torch.Tensor:
  """match + cc * CC (squared form) + cm * CM of one class, from final feature maps
  [N, C, h, w] (match: DM's `mean_matching` or M3D's `mmd_matching`)."""
  real_map = real_map.detach()
  real_features, syn_features = real_map.flatten(1), syn_map.flatten(1)
  loss = match(real_features, syn_features)
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


# --------------------------------------------------------------------------------- IDC family

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def normalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
  """Per-channel normalisation of [N, C, H, W] pixels in [0, 1] (the codes' first aug op)."""
  mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
  std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
  return (x - mean) / std


def decode(stored: torch.Tensor, factor: int = 2) -> torch.Tensor:
  """Multi-formation's "single" decode: [N, C, H, W] -> [f * f * N, C, H, W].

  Each stored image is cut into f x f crops in row-major order, each crop upsampled x f
  (bilinear, align_corners=False); crop-major output (all first crops, then all second, ...).
  """
  if factor == 1:
    return stored
  h, w = stored.shape[2] // factor, stored.shape[3] // factor
  crops = [
    stored[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w]
    for i in range(factor)
    for j in range(factor)
  ]
  return F.interpolate(torch.cat(crops), scale_factor=factor, mode='bilinear', align_corners=False)


@dataclasses.dataclass(frozen=True)
class IDCParams:
  """One draw of IDC's DiffAug 'color_crop_cutout' in batch mode (one set for a whole batch).

  Attributes:
    brightness, saturation, contrast: u1, u2, u3 in [0, 1).
    shift_rows, shift_cols: the crop's t_h, t_w in {-S, ..., S} (S = 4 for 32 pixels).
    cutout_rows, cutout_cols: the cutout square's centre o_h, o_w in {0, ..., side} (even L).
  """

  brightness: float
  saturation: float
  contrast: float
  shift_rows: int
  shift_cols: int
  cutout_rows: int
  cutout_cols: int


def _max_shift(length: int) -> int:
  return int(0.125 * length + 0.5)


def _cutout_side(length: int) -> int:
  return int(0.5 * length + 0.5)


def idc_params(generator: torch.Generator, height: int, width: int) -> IDCParams:
  """Draws one `IDCParams` (7 scalars) for images of height x width."""
  u1, u2, u3 = torch.rand(3, generator=generator).tolist()
  integer = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))
  shift_h, shift_w = _max_shift(height), _max_shift(width)
  return IDCParams(
    u1,
    u2,
    u3,
    integer(-shift_h, shift_h + 1),
    integer(-shift_w, shift_w + 1),
    integer(0, height + 1 - _cutout_side(height) % 2),
    integer(0, width + 1 - _cutout_side(width) % 2),
  )


def idc_augment(x: torch.Tensor, p: IDCParams) -> torch.Tensor:
  """IDC's DiffAug 'color_crop_cutout' on normalised [N, C, H, W] with one parameter set.

  colour (brightness, saturation about the pixel's channel mean, contrast about the image's
  mean), then crop out(i, j) = x(i + t_h, j + t_w) with 0 outside, then cutout (an L x L
  square, L = side / 2, around o, clipped, set to 0 in every channel).
  """
  x = x + (p.brightness - 0.5)
  mean = x.mean(dim=1, keepdim=True)
  x = (x - mean) * (2 * p.saturation) + mean
  mean = x.mean(dim=(1, 2, 3), keepdim=True)
  x = (x - mean) * (p.contrast + 0.5) + mean
  h, w = x.shape[2:]
  shift_h, shift_w = _max_shift(h), _max_shift(w)
  padded = F.pad(x, [shift_w, shift_w, shift_h, shift_h])
  top, left = shift_h + p.shift_rows, shift_w + p.shift_cols
  x = padded[:, :, top : top + h, left : left + w]
  side_h, side_w = _cutout_side(h), _cutout_side(w)
  top, left = p.cutout_rows - side_h // 2, p.cutout_cols - side_w // 2
  mask = torch.ones(h, w, dtype=x.dtype)
  mask[max(top, 0) : max(top + side_h, 0), max(left, 0) : max(left + side_w, 0)] = 0
  return x * mask


def _class_rows(images: torch.Tensor, c: int, ipc: int) -> torch.Tensor:
  return images[c * ipc : (c + 1) * ipc]


def family_match_pass(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  batch_real: int,
  net: ConvNet,
  weights: Weights,
  generator: torch.Generator,
  factor: int,
  match,
  class_match=None,
  fixed_real: bool = False,
) -> float:
  """The IDC family's match pass: per class, a real batch and the class's decoded images under
  one DiffAug draw, the matching term (plus CC / CM by weight) and `optimizer.step()` on the
  whole tensor. The real side is embedded without autograd (its features are constants).

  Args:
    match: the matching term, (real features [N_r, D], syn features [N_s, D]) -> scalar.
    class_match: c -> class c's matching term, where it depends on the class (DSDM's prototype);
      None: `match` for every class.
    fixed_real: every class's first `batch_real` images (NCFM's code) instead of a random draw.
    The others: as `m3d_step`.

  Returns:
    The loss summed over classes.
  """
  ipc = images.shape[0] // len(real_by_class)
  height, width = images.shape[2:]
  total = 0.0
  for c, real in enumerate(real_by_class):
    if fixed_real:
      real = real[:batch_real]
    else:
      real = real[torch.randperm(real.shape[0], generator=generator)[:batch_real]]
    params = idc_params(generator, height, width)
    with torch.no_grad():
      real_map = net.embed(idc_augment(normalize(real), params))
    syn = idc_augment(normalize(decode(_class_rows(images, c, ipc), factor)), params)
    class_term = match if class_match is None else class_match(c)
    loss = class_objective(real_map, net.embed(syn), weights, class_term)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    total += float(loss.detach())
  return total


@dataclasses.dataclass
class RandomNetworks:
  """M3D's random matching network, re-drawn every `every` iterations (`ipm`)."""

  channels: int
  num_classes: int
  image_size: int
  every: int = 5
  iteration: int = 0
  net: ConvNet | None = None

  def next(self) -> ConvNet:
    if self.iteration % self.every == 0:
      self.net = frozen(ConvNet(self.channels, self.num_classes, image_size=self.image_size))
    self.iteration += 1
    return self.net


def m3d_step(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  batch_real: int,
  networks: RandomNetworks,
  generator: torch.Generator,
  weights: Weights = Weights(cc=0.0, cm=0.0),
  factor: int = 2,
) -> float:
  """One M3D iteration: the random network (new every `networks.every` iterations), the stored
  images clamped to [0, 1], then the match pass with the multi-bandwidth Gaussian MMD.

  Args:
    images: [K * ipc, C, H, W] stored images in [0, 1], a leaf that requires grad.
    optimizer: SGD over [images] (M3D: momentum 0.5).
    real_by_class: K tensors [n_c, C, H, W] of pixels in [0, 1].
    batch_real: real images per class.
    networks: the random-network source.
    generator: the source of every draw but the networks' initialisation.
    weights: CC and CM weights (M3D: none).
    factor: multi-formation factor.

  Returns:
    The loss summed over classes.
  """
  net = networks.next()
  with torch.no_grad():
    images.clamp_(0, 1)
  return family_match_pass(
    images, optimizer, real_by_class, batch_real, net, weights, generator, factor, mmd_matching
  )


@dataclasses.dataclass
class DancePool:
  """The pooled methods' pretrained members as state dicts (initial and final weights), and the
  two networks an iteration loads: the matching network (DANCE, NCFM: interpolated; DSDM: a
  member's final weights) and the expert of the calibration pass."""

  initial: list[dict[str, torch.Tensor]]
  final: list[dict[str, torch.Tensor]]
  matching: ConvNet
  expert: ConvNet


def dance_pool(channels: int, num_classes: int, image_size: int, members: int = 5) -> DancePool:
  """A pool of `members` (initial, final) pairs; the "final" weights are another random
  initialisation (no training: the step's work does not depend on the weights)."""
  make = lambda: ConvNet(channels, num_classes, image_size=image_size)
  return DancePool(
    initial=[make().state_dict() for _ in range(members)],
    final=[make().state_dict() for _ in range(members)],
    matching=frozen(make()),
    expert=frozen(make()),
  )


def load_interpolated(pool: DancePool, generator: torch.Generator) -> None:
  """DANCE's and NCFM's networks of an iteration: member k and lambda drawn, the matching
  network loaded with lambda * initial_k + (1 - lambda) * final_k, the expert with final_k."""
  member = int(torch.randint(len(pool.final), (1,), generator=generator))
  lam = float(torch.rand((), generator=generator))
  initial, final = pool.initial[member], pool.final[member]
  pool.matching.load_state_dict({k: lam * initial[k] + (1 - lam) * final[k] for k in final})
  pool.expert.load_state_dict(final)


def calibration_pass(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  num_classes: int,
  expert: ConvNet,
  generator: torch.Generator,
  factor: int,
) -> float:
  """DANCE's calibration pass: per class the expert's cross-entropy on a fresh DiffAug draw of
  the class's decoded images, one optimizer step.

  Returns:
    The cross-entropy summed over classes.
  """
  ipc = images.shape[0] // num_classes
  height, width = images.shape[2:]
  total = 0.0
  for c in range(num_classes):
    params = idc_params(generator, height, width)
    syn = idc_augment(normalize(decode(_class_rows(images, c, ipc), factor)), params)
    labels = torch.full((syn.shape[0],), c, dtype=torch.long)
    loss = F.cross_entropy(expert(syn), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    total += float(loss.detach())
  return total


def dance_step(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  batch_real: int,
  pool: DancePool,
  generator: torch.Generator,
  weights: Weights = Weights(cc=0.0, cm=0.0),
  factor: int = 2,
  calibration_passes: int = 1,
) -> float:
  """One DANCE iteration: member k and lambda drawn, the matching network loaded with
  lambda * initial_k + (1 - lambda) * final_k and the expert with final_k, the stored images
  clamped, the match pass with mean matching, then per calibration pass and class the expert's
  cross-entropy on a fresh DiffAug draw of the class's decoded images and one optimizer step.

  Args: as `m3d_step`, with `pool` the members and `calibration_passes` (DANCE's iter_calib).

  Returns:
    The match pass's loss summed over classes.
  """
  load_interpolated(pool, generator)
  with torch.no_grad():
    images.clamp_(0, 1)
  total = family_match_pass(
    images,
    optimizer,
    real_by_class,
    batch_real,
    pool.matching,
    weights,
    generator,
    factor,
    mean_matching,
  )
  for _ in range(calibration_passes):
    calibration_pass(images, optimizer, len(real_by_class), pool.expert, generator, factor)
  return total


# NCFM's clamp of the phase term: keeps the square root's gradient finite where the two
# characteristic functions coincide.
CF_PHASE_FLOOR = 1e-12


def characteristic_function_matching(
  real_features: torch.Tensor,
  syn_features: torch.Tensor,
  frequencies: torch.Tensor,
  amplitude_weight: float = 0.5,
  phase_weight: float = 0.5,
  scale: float = 300.0,
) -> torch.Tensor:
  """NCFM's matching term: scale * mean_m sqrt(alpha a_m + beta p_m).

  Rows unit-normalised (`F.normalize`); per set X the empirical characteristic function at
  frequency t_m, Re_X = mean_i cos(t_m . x_i), Im_X = mean_i sin(t_m . x_i), |Phi_X| its
  modulus; a_m = (|Phi_r| - |Phi_s|)^2, p_m = max(2 (|Phi_r| |Phi_s| - Re_r Re_s - Im_r Im_s),
  1e-12).

  Args:
    real_features: [N_r, D]; no gradient flows into it.
    syn_features: [N_s, D].
    frequencies: [M, D] the frequencies t (one matrix product per set: [N, D] x [D, M]).
    amplitude_weight, phase_weight: alpha, beta (NCFM: 0.5, 0.5).
    scale: NCFM's 300.

  Returns:
    A scalar.
  """

  def phi(features):
    projections = F.normalize(features, dim=1) @ frequencies.T
    return torch.cos(projections).mean(0), torch.sin(projections).mean(0)

  re_r, im_r = phi(real_features.detach())
  re_s, im_s = phi(syn_features)
  mod_r = torch.sqrt(re_r**2 + im_r**2)
  mod_s = torch.sqrt(re_s**2 + im_s**2)
  amplitude = (mod_r - mod_s) ** 2
  phase = torch.clamp(2 * (mod_r * mod_s - re_r * re_s - im_r * im_s), min=CF_PHASE_FLOOR)
  return scale * torch.sqrt(amplitude_weight * amplitude + phase_weight * phase).mean()


def ncfm_step(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  batch_real: int,
  pool: DancePool,
  generator: torch.Generator,
  weights: Weights = Weights(cc=0.0, cm=0.0),
  factor: int = 2,
  calibration_passes: int = 1,
  num_frequencies: int = 4096,
  amplitude_weight: float = 0.5,
  phase_weight: float = 0.5,
  scale: float = 300.0,
  fixed_real: bool = True,
  scheduler=None,
) -> float:
  """One NCFM iteration (no sampling network): DANCE's networks (`load_interpolated`), the
  stored images clamped, the match pass with the CF loss on `num_frequencies` Gaussian
  frequencies [M, D] drawn per class step, DANCE's calibration pass(es), then the plateau
  scheduler stepped on the iteration's mean class loss (match and calibration).

  Args: as `dance_step`, and
    num_frequencies, amplitude_weight, phase_weight, scale: the CF loss's (NCFM: 4096, 0.5,
      0.5, 300).
    fixed_real: every class's first `batch_real` real images (NCFM's code).
    scheduler: a `ReduceLROnPlateau` on `optimizer`, or None. (optimizer: NCFM's AdamW, lr 1e-3,
      weight decay 5e-4.)

  Returns:
    The match pass's loss summed over classes.
  """
  load_interpolated(pool, generator)
  with torch.no_grad():
    images.clamp_(0, 1)

  def match(real_features, syn_features):
    # No 1/sqrt(D) scaling: the features are unit-norm, so t . f ~ N(0, 1).
    frequencies = torch.randn(
      num_frequencies, real_features.shape[1], generator=generator, dtype=real_features.dtype
    )
    return characteristic_function_matching(
      real_features, syn_features, frequencies, amplitude_weight, phase_weight, scale
    )

  total = family_match_pass(
    images,
    optimizer,
    real_by_class,
    batch_real,
    pool.matching,
    weights,
    generator,
    factor,
    match,
    fixed_real=fixed_real,
  )
  num_classes = len(real_by_class)
  calibration = 0.0
  for _ in range(calibration_passes):
    calibration += calibration_pass(images, optimizer, num_classes, pool.expert, generator, factor)
  if scheduler is not None:
    scheduler.step((total + calibration) / num_classes)
  return total


def dsdm_matching(
  real_features: torch.Tensor,
  syn_features: torch.Tensor,
  prototype: torch.Tensor | None = None,
  covariance_weight: float = 50.0,
  prototype_weight: float = 0.2,
) -> torch.Tensor:
  """DSDM's matching term: ||mu_r - mu_s||^2 + covariance_weight ||Sigma_s - Sigma_r||_F^2 / D
  + prototype_weight ||mu_s - h||^2 / D, with unbiased (N - 1) covariances [D, D].

  Args:
    real_features: [N_r, D]; no gradient flows into it.
    syn_features: [N_s, D], N_s >= 2.
    prototype: [D] the class's historical prototype h (a constant), or None: no such term.
    covariance_weight, prototype_weight: DSDM's cov_weight 50 and h_p_weight 0.2.

  Returns:
    A scalar.
  """

  def covariance(x):
    centred = x - x.mean(0)
    return centred.T @ centred / (x.shape[0] - 1)

  real = real_features.detach()
  dim = syn_features.shape[1]
  syn_mean = syn_features.mean(0)
  loss = ((real.mean(0) - syn_mean) ** 2).sum()
  loss = loss + covariance_weight * ((covariance(syn_features) - covariance(real)) ** 2).sum() / dim
  if prototype is not None:
    loss = loss + prototype_weight * ((syn_mean - prototype.detach()) ** 2).sum() / dim
  return loss


@dataclasses.dataclass
class Prototypes:
  """DSDM's class prototypes h [K, D] (None: zeros until the first update) and their updates."""

  values: torch.Tensor | None = None
  updates: int = 0


def dsdm_step(
  images: torch.Tensor,
  optimizer: torch.optim.Optimizer,
  real_by_class: list[torch.Tensor],
  batch_real: int,
  pool: DancePool,
  prototypes: Prototypes,
  generator: torch.Generator,
  weights: Weights = Weights(cc=0.0, cm=0.0),
  factor: int = 2,
  covariance_weight: float = 50.0,
  prototype_weight: float = 0.2,
  prototype_momentum: float = 0.99,
) -> float:
  """One DSDM iteration: member k drawn, the matching network loaded with its final weights,
  the stored images clamped, the match pass with `dsdm_matching` against each class's prototype,
  then without gradient every class's prototype moved towards the mean features m_c of its
  decoded images under a fresh DiffAug draw: h_c = m_c at the first update, then
  (1 - momentum) m_c + momentum h_c.

  The prototype term is always on (DSDM's acts after iteration 2000; dd_jax computes it times 0
  before then): the same work at every iteration.

  Args: as `m3d_step`, and
    pool: the members (final weights only).
    prototypes: the class prototypes, updated in place.
    covariance_weight, prototype_weight, prototype_momentum: DSDM's 50, 0.2 and 0.99.
    (optimizer: DSDM's SGD, lr 0.01 * ipc, momentum 0.5.)

  Returns:
    The match pass's loss summed over classes.
  """
  member = int(torch.randint(len(pool.final), (1,), generator=generator))
  net = pool.matching
  net.load_state_dict(pool.final[member])
  num_classes = len(real_by_class)
  if prototypes.values is None:
    prototypes.values = torch.zeros(num_classes, net.classifier.in_features, dtype=images.dtype)
  with torch.no_grad():
    images.clamp_(0, 1)
  term = lambda c: (
    lambda real_features, syn_features: dsdm_matching(
      real_features, syn_features, prototypes.values[c], covariance_weight, prototype_weight
    )
  )
  total = family_match_pass(
    images,
    optimizer,
    real_by_class,
    batch_real,
    net,
    weights,
    generator,
    factor,
    None,
    class_match=term,
  )
  ipc = images.shape[0] // num_classes
  height, width = images.shape[2:]
  with torch.no_grad():
    means = []
    for c in range(num_classes):
      params = idc_params(generator, height, width)
      syn = idc_augment(normalize(decode(_class_rows(images, c, ipc), factor)), params)
      means.append(net.embed(syn).flatten(1).mean(0))
    means = torch.stack(means)
    if prototypes.updates:
      means = (1 - prototype_momentum) * means + prototype_momentum * prototypes.values
    prototypes.values = means
  prototypes.updates += 1
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

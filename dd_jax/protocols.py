"""Evaluation protocols: the published papers' ways of scoring a synthetic set, by name.

A protocol is a named bundle of evaluation settings (config section `eval`): epochs, optimizer,
lr schedule, batch, augmentation, CutMix, evaluation interval and repeats, plus the
multi-formation factor of the sets it was published with and the accuracy those papers report.
`config.eval.protocol` picks one; every `config.eval` field left unset (None) takes the
protocol's value, and a field set in a config file or on the command line wins over it:

    --config.eval.protocol=idc --config.eval.epochs=300   # IDC's protocol, 300 epochs

The papers' numbers are not comparable across protocols (docs/method.md, "Evaluation
protocols"): IDC's protocol alone adds points to a DM set (multi-step schedule, CutMix, IDC's
augmentation) and reports the best test accuracy over evaluation points, not the last.

    resolve(config.eval)      # {field: value} with the protocol's values filled in
    PROTOCOLS['idc'].factor   # 2: the IDC family stores sets with factor-2 multi-formation
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# What a paper reports: the accuracy after the last epoch, or the best test accuracy over the
# evaluation points (a choice made on the test split; dd_jax records both).
REPORTED = ('last', 'best')
# The IDC family's evaluation augmentation: IDC's DiffAug per image, without cutout when CutMix
# is on (IDC argument.py; DANCE and NCFM drop it the same way).
IDC_AUGMENT_STRATEGY = 'color_crop_flip_scale_rotate'
# DSA's strategy of DM's evaluation (Zhao & Bilen, ICML 2021).
DSA_STRATEGY = 'color_crop_cutout_flip_scale_rotate'


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One paper's evaluation protocol.

  Attributes:
    name: the value of `config.eval.protocol`.
    values: the `config.eval` fields it sets, {name: value}.
    factor: the multi-formation factor of the sets the protocol was published with (the stored
      images of a foreign file are decoded with it by `python -m dd_jax.evaluate`, unless the
      file says otherwise).
    reported: what the papers report, one of `REPORTED`.
    source: where the values come from (paper and code).
  """

  name: str
  values: Mapping[str, Any]
  factor: int
  reported: str
  source: str


_SGD = {'optimizer': 'sgd', 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4}
# DM's evaluation (DatasetCondensation utils.evaluate_synset): SGD, lr x0.1 and a fresh optimizer
# half-way, batch 256, DSA (one op per minibatch), the last epoch.
_DM = {
  **_SGD,
  'epochs': 1000,
  'num_eval': 5,
  'batch_size': 256,
  'schedule': 'reference',
  'milestones': (),
  'gamma': 0.1,
  'augment_mode': 'dsa',
  'augment_strategy': DSA_STRATEGY,
  'cutmix_probability': 0.0,
  'eval_every': 0,
}
# IDC's evaluation (Kim et al., ICML 2022, train.py): SGD, lr x0.2 at 2E/3 and 5E/6 (momentum
# kept), batch 64, IDC's augmentation per image, CutMix with probability 0.5 (beta 1).
_IDC = {
  **_SGD,
  'epochs': 1000,
  'num_eval': 3,
  'batch_size': 64,
  'schedule': 'multistep',
  'milestones': (2 / 3, 5 / 6),
  'gamma': 0.2,
  'augment_mode': 'idc',
  'augment_strategy': IDC_AUGMENT_STRATEGY,
  'cutmix_probability': 0.5,
  'eval_every': 100,  # IDC's interval is not documented in its README: 100 epochs here
}

# DANCE's and DSDM's evaluation: IDC's, 1500 epochs, tested every 250, one network per test.
_DANCE = {**_IDC, 'epochs': 1500, 'num_eval': 1, 'eval_every': 250}

PROTOCOLS: dict[str, Protocol] = {
  p.name: p
  for p in (
    Protocol(
      'dm',
      _DM,
      factor=1,
      reported='last',
      source='DM (Zhao & Bilen, WACV 2023), DatasetCondensation utils.evaluate_synset',
    ),
    Protocol(
      'idc',
      _IDC,
      factor=2,
      reported='best',
      source='IDC (Kim et al., ICML 2022) train.py; M3D (Zhang et al., AAAI 2024) the same',
    ),
    Protocol(
      'dance',
      _DANCE,
      factor=2,
      reported='best',
      source='DANCE (Zhang et al., IJCAI 2024) arg_condense.py',
    ),
    Protocol(
      'dsdm',
      _DANCE,
      factor=2,
      reported='best',
      source='DSDM (Li et al., ACM MM 2024) argument.py (as DANCE)',
    ),
    # AdamW with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8, weight decay 0.01: not passed).
    Protocol(
      'ncfm',
      {
        **_IDC,
        'epochs': 2000,
        'num_eval': 10,
        'batch_size': 128,
        'optimizer': 'adamw',
        'lr': 1e-3,
        'weight_decay': 0.01,
        'milestones': (0.2, 0.4, 0.6, 0.8),
        'gamma': 0.5,
        'eval_every': 100,
      },
      factor=2,
      reported='best',
      source='NCFM (Wang et al., CVPR 2025) condenser/evaluate.py, evaluation_script.py',
    ),
    # DD-Ranking's DM config: PyTorch's StepLR(step_size=500), gamma not given (its default 0.1).
    Protocol(
      'ddranking_dm',
      {**_DM, 'schedule': 'multistep', 'milestones': (0.5,), 'gamma': 0.1},
      factor=1,
      reported='last',
      source='DD-Ranking (Li et al., 2025) eval config DM/CIFAR10/IPC10.yaml',
    ),
  )
}
# The `config.eval` fields a protocol sets (every protocol sets all of them).
FIELDS = tuple(_DM)
NAMES = tuple(PROTOCOLS)


def resolve(section: Mapping[str, Any]) -> dict[str, Any]:
  """The evaluation fields of a config section with its protocol's values filled in.

  Args:
    section: `config.eval` (or a mapping like it), with 'protocol' (default 'dm'); a field of
      `FIELDS` that is absent or None takes the protocol's value.

  Returns:
    {field: value}: every field of the section that is not None, and every one of `FIELDS`.

  Raises:
    ValueError: an unknown protocol, naming config.eval.protocol and the choices.
  """
  name = section.get('protocol') or 'dm'
  if name not in PROTOCOLS:
    raise ValueError(f'config.eval.protocol={name!r} is not valid; choose one of {list(NAMES)}.')
  given = {key: value for key, value in section.items() if value is not None}
  return {**PROTOCOLS[name].values, **given, 'protocol': name}

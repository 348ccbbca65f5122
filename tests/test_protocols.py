"""Evaluation protocols: each preset's resolved settings, and overrides winning over them."""

import pytest

from dd_jax import config as config_lib
from dd_jax import evaluate, protocols
from dd_jax import train as train_lib

# The published protocols, written out from the papers' code (docs/method.md, "Evaluation
# protocols"): (epochs, optimizer, lr, weight decay, schedule, milestones as epochs of E, gamma,
# batch, augmentation mode, CutMix probability, evaluation interval, networks, factor, reported).
_SGD_MULTISTEP = ('sgd', 0.01, 5e-4, 'multistep')
EXPECTED = {
  'dm': (1000, 'sgd', 0.01, 5e-4, 'reference', (), 0.1, 256, 'dsa', 0.0, 0, 5, 1, 'last'),
  'idc': (1000, *_SGD_MULTISTEP, (666, 833), 0.2, 64, 'idc', 0.5, 100, 3, 2, 'best'),
  'dance': (1500, *_SGD_MULTISTEP, (1000, 1250), 0.2, 64, 'idc', 0.5, 250, 1, 2, 'best'),
  'dsdm': (1500, *_SGD_MULTISTEP, (1000, 1250), 0.2, 64, 'idc', 0.5, 250, 1, 2, 'best'),
  'ncfm': (
    2000, 'adamw', 1e-3, 0.01, 'multistep', (400, 800, 1200, 1600), 0.5, 128, 'idc', 0.5, 100,
    10, 2, 'best',
  ),
  'ddranking_dm': (1000, *_SGD_MULTISTEP, (500,), 0.1, 256, 'dsa', 0.0, 0, 5, 1, 'last'),
}  # fmt: skip


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_each_protocol_resolves_to_its_papers_settings(name):
  config = config_lib.default_config()
  config.eval.protocol = name
  settings = evaluate.EvalSettings.from_config(config)
  resolved = (
    settings.epochs,
    settings.recipe.algorithm,
    settings.recipe.lr,
    settings.recipe.weight_decay,
    settings.schedule,
    train_lib.milestone_epochs(settings.epochs, settings.milestones),
    settings.gamma,
    settings.recipe.batch_size,
    settings.augment_mode,
    settings.cutmix_probability,
    settings.eval_every,
    settings.num_eval,
    protocols.PROTOCOLS[name].factor,
    protocols.PROTOCOLS[name].reported,
  )
  assert resolved == EXPECTED[name]
  assert settings.protocol == name
  # The IDC family's evaluations drop cutout when CutMix is on; DM's DSA keeps its six ops.
  strategy = settings.augment_strategy
  assert strategy == ('color_crop_flip_scale_rotate' if settings.augment_mode == 'idc' else
                      'color_crop_cutout_flip_scale_rotate')  # fmt: skip
  if settings.recipe.algorithm == 'sgd':
    assert settings.recipe.momentum == 0.9


def test_the_default_protocol_is_dms_evaluation_as_before():
  settings = evaluate.EvalSettings.from_config(config_lib.default_config())
  assert settings == evaluate.EvalSettings(
    model='ConvNet',
    protocol='dm',
    num_eval=5,
    epochs=1000,
    recipe=train_lib.OptimizerRecipe(batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4),
    augment_strategy='color_crop_cutout_flip_scale_rotate',
    schedule='reference',
    eval_every=0,
  )


def test_a_field_set_in_the_config_wins_over_the_protocol():
  config = config_lib.default_config()
  config_lib.set_cpu_budget(config)  # eval.epochs = 300, eval.num_eval = 3
  config.eval.protocol = 'ncfm'
  config.eval.cutmix_probability = 0.0
  settings = evaluate.EvalSettings.from_config(config)
  assert (settings.epochs, settings.num_eval, settings.cutmix_probability) == (300, 3, 0.0)
  assert (settings.recipe.algorithm, settings.recipe.batch_size) == ('adamw', 128)
  assert settings.milestones == (0.2, 0.4, 0.6, 0.8)  # fractions: 60, 120, ... of 300 epochs


def test_an_unknown_protocol_is_refused_naming_the_field_and_the_choices():
  config = config_lib.default_config()
  config.eval.protocol = 'idc2'
  with pytest.raises(ValueError, match=r"config.eval.protocol='idc2' is not valid; choose one of"):
    evaluate.EvalSettings.from_config(config)

"""Method presets derived from the method registry: variants, IID settings, labels.

A preset names a method variant: a registered method plus '', '_cc', '_cm' or '_iid' (which IID
constraints it uses), e.g. 'dm_iid'. Each method declares its reference image lr and its named IID
settings (`Method.presets`); nothing here lists methods.

    set_method(config, 'dm_iid', iid='default')    # method, image lr, constraints
    variant_config(config, 'dm')                    # the same config without constraints
    method_label(config)                            # 'DM + IID (CC calibrated rho 0.3)'
"""

from __future__ import annotations

import ml_collections

from dd_jax.distill import base, family, methods
from dd_jax.distill.base import IIDSetting

# A variant name is a method name plus one of these suffixes: which constraints it uses.
CONSTRAINT_SUFFIXES = {
  '': (False, False),
  '_cc': (True, False),
  '_cm': (False, True),
  '_iid': (True, True),
}


def variants(suffixes: tuple[str, ...] = tuple(CONSTRAINT_SUFFIXES)) -> tuple[str, ...]:
  """Every registered method's variants with these suffixes, e.g. ('dm', 'dm_iid', ...)."""
  return tuple(name + suffix for name in methods.names() for suffix in suffixes)


def split_variant(name: str) -> tuple[str, bool, bool]:
  """'dm_iid' -> ('dm', True, True): the method and whether CC and CM are on.

  Raises:
    ValueError: not a registered method's name plus '', '_cc', '_cm' or '_iid'.
  """
  for method in methods.names():
    for suffix, (cc_on, cm_on) in CONSTRAINT_SUFFIXES.items():
      if name == method + suffix:
        return method, cc_on, cm_on
  raise ValueError(f'{name!r} is not a method variant; choose one of {list(variants())}.')


def iid_setting(method: str, iid: str) -> IIDSetting:
  """The IID setting named `iid` ('default' or 'reference') of the registered `method`."""
  if iid not in base.IID_SETTING_NAMES:
    raise ValueError(f'iid={iid!r}: choose one of {sorted(base.IID_SETTING_NAMES)}.')
  return methods.get(method).presets.iid[iid]


def _set_constraints(
  config: ml_collections.ConfigDict, cc_on: bool, cm_on: bool, setting: IIDSetting
) -> None:
  cc = config.constraints.cc
  if cc_on:
    cc.form, cc.weight, cc.tau = setting.cc_form, setting.cc_weight, setting.cc_tau
  else:
    cc.weight = 0.0
  config.constraints.cm.weight = setting.cm_weight if cm_on else 0.0


def _set_paths(config: ml_collections.ConfigDict, values: dict[str, object]) -> None:
  """Sets config fields by dotted path ({'distill.init': 'mix'})."""
  for path, value in values.items():
    section, _, field = path.rpartition('.')
    node = config
    for part in filter(None, section.split('.')):
      node = node[part]
    node[field] = value


def share_family_pool(config: ml_collections.ConfigDict) -> None:
  """For a reduced budget: a method matching with the pool (DANCE, NCFM, DSDM) takes the IDC
  family's pool recipe (`family.POOL_RECIPE`) and draws from at most the whole (small) pool, so
  every pooled method builds and shares one cached pool of config.pool's size and epochs. Other
  methods' configs are unchanged."""
  if not methods.get(config.method).uses_pool:
    return
  _set_paths(config, family.POOL_RECIPE)
  config.family.pool_members = min(config.family.pool_members, config.pool.size)


def set_method(config: ml_collections.ConfigDict, name: str, iid: str = 'default') -> None:
  """Sets a preset's method: 'dm', 'dm_iid', 'idm', 'idm_iid' (or '_cc' / '_cm' variants).

  The image lr is the method's reference (`Presets.image_lr`: DM 1.0, IDM 0.2), with the other
  fields its reference sets (`Presets.config`); the constraints in use take the method's IID
  setting named `iid` (`Presets.iid`), the others are zeroed.
  """
  method, cc_on, cm_on = split_variant(name)
  config.method = method
  method_presets = methods.get(method).presets
  config.distill.lr = method_presets.image_lr
  _set_paths(config, method_presets.config)
  _set_constraints(config, cc_on, cm_on, iid_setting(method, iid))


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the constraints of variant `name` of its own method.

  A term the variant uses keeps the config's setting (CC form, weight and tau; CM weight), or
  takes the method's default IID setting if the config has it at 0 (so 'dm_iid' of a plain-DM
  config is the default DM + IID); the others are zeroed. The copy runs no comparison of its own.

  Raises:
    ValueError: `name` is not a variant of `config.method`.
  """
  valid = [config.method + suffix for suffix in CONSTRAINT_SUFFIXES]
  if name not in valid:
    raise ValueError(
      f'config.compare.variants: {name!r} is not a variant of a '
      f'method={config.method!r} config; choose from {valid}.'
    )
  _, cc_on, cm_on = split_variant(name)
  default = iid_setting(config.method, 'default')
  cc = config.constraints.cc
  configured = IIDSetting(
    cc.form if cc.weight else default.cc_form,
    cc.weight or default.cc_weight,
    cc.tau if cc.weight else default.cc_tau,
    config.constraints.cm.weight or default.cm_weight,
  )
  derived = config.copy_and_resolve_references()
  with derived.unlocked():
    _set_constraints(derived, cc_on, cm_on, configured)
    derived.compare.variants = ''
    derived.compare.random_real = False
    derived.compare.full_train_epochs = 0
  return derived


def method_label(config: ml_collections.ConfigDict) -> str:
  """The table's name of a config's method, from the method and its constraints.

  E.g. 'DM', 'DM + CM', 'DM + IID (reference)' (the reference code's weights and CC form),
  'DM + IID (CC relative 0.1)', 'DM + IID (CC threshold 0.1 tau 1)', 'DM + IID (CC calibrated
  rho 0.1, CM 0.02)', 'DM + CC (CC on pool: 10 ConvNet x 10 ep)'; with
  config.eval.select_checkpoint 'validation' or 'test', ' [checkpoint chosen on <split>]' added.
  """
  cc, cm = config.constraints.cc, config.constraints.cm
  cc_on, cm_on = cc.weight > 0, cm.weight > 0
  suffix = {
    (False, False): '',
    (True, False): ' + CC',
    (False, True): ' + CM',
    (True, True): ' + IID',
  }
  label = config.method.upper() + suffix[cc_on, cm_on]
  reference = iid_setting(config.method, 'reference')
  reference_cc, reference_cm = reference.cc_weight, reference.cm_weight
  details = []
  if cc_on and not (cc.form == reference.cc_form and cc.weight == reference_cc):
    if cc.form == 'calibrated':
      details.append(f'CC calibrated rho {cc.weight:g}')
    else:
      details.append(
        f'CC {cc.form} {cc.weight:g}' + (f' tau {cc.tau:g}' if cc.form == 'threshold' else '')
      )
  if cm_on and cm.weight != reference_cm:
    details.append(f'CM {cm.weight:g}')
  if cc_on and cm_on and not details:
    details.append('reference')
  if cc_on and cc.extractor == 'pool':
    details.append(f'CC on pool: {config.pool.size} {config.pool.model} x {config.pool.epochs} ep')
  label += f' ({", ".join(details)})' if details else ''
  if config.eval.get('select_checkpoint', 'last') != 'last':
    label += f' [checkpoint chosen on {config.eval.select_checkpoint}]'
  return label

"""Config files, config strings, validation and the locked command line."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dd_jax import config as config_lib
from dd_jax import evaluate, experiment, info, presets
from dd_jax.distill import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_config_string():
  defaults = {'ipc': 10, 'method': 'dm_iid', 'flag': False}
  assert config_lib.parse_config_string(None, defaults) == defaults
  assert config_lib.parse_config_string('ipc=50,method=dm,flag=true', defaults) == {
    'ipc': 50,
    'method': 'dm',
    'flag': True,
  }
  with pytest.raises(ValueError, match="'ipcc=3'.*key=value with key in"):
    config_lib.parse_config_string('ipcc=3', defaults)
  with pytest.raises(ValueError, match='ipc=.ten.: expected a int'):
    config_lib.parse_config_string('ipc=ten', defaults)


def _load_config_file(path, arg=None):
  return config_lib.load_config(os.path.join(REPO, path) + (f':{arg}' if arg else ''))


@pytest.mark.parametrize(
  'path, arg',
  [
    ('configs/default.py', None),
    ('configs/digits.py', ''),
    ('configs/digits.py', 'ipc=10,method=dm'),
    ('configs/digits.py', 'method=idm_iid,cc=pool'),
    ('configs/paper.py', ''),
  ],
)
def test_config_files_are_valid(path, arg):
  experiment.validate_config(_load_config_file(path, arg))


def test_load_config_applies_overrides_as_the_command_line():
  config = _load_config_file('configs/digits.py', 'ipc=1,method=dm')
  assert (config.ipc, config.method) == (1, 'dm')
  overridden = config_lib.load_config(
    os.path.join(REPO, 'configs/digits.py:ipc=1'),
    ['--config.distill.lr=2', '--config.compare.variants='],
  )
  assert (overridden.distill.lr, overridden.compare.variants) == (2.0, '')
  for overrides, message in (
    (['--config.ipcc=2'], 'ipcc'),
    (['--config.ipc=two'], 'two'),
    (['--config.distil.lr=2'], 'distil'),
  ):
    with pytest.raises(ValueError, match=message):
      config_lib.load_config(os.path.join(REPO, 'configs/digits.py'), overrides)


def test_method_variants_take_reference_or_configured_weights():
  assert presets.split_variant('idm_cm') == ('idm', False, True)
  with pytest.raises(ValueError, match="'gm_iid' is not a method variant"):
    presets.split_variant('gm_iid')
  config = config_lib.default_config()
  presets.set_method(config, 'idm_iid')
  assert (config.method, config.distill.lr) == ('idm', 0.2)
  assert (config.constraints.cc.weight, config.constraints.cm.weight) == (0.01, 0.03)
  config.constraints.cm.weight = 0.5
  cm_only = presets.variant_config(config, 'idm_cm')
  assert (cm_only.constraints.cc.weight, cm_only.constraints.cm.weight) == (0.0, 0.5)
  plain = presets.variant_config(config, 'idm')
  assert (plain.constraints.cc.weight, plain.constraints.cm.weight) == (0.0, 0.0)
  # A variant of a plain config takes the method's default IID setting.
  assert presets.variant_config(plain, 'idm_cc').constraints.cc.weight == 0.01
  with pytest.raises(ValueError, match=r"'dm' is not a variant of a method='idm' config"):
    presets.variant_config(config, 'dm')


def test_paper_presets_follow_the_paper():
  config = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=10,method=dm_iid')
  assert config.dataset.name == 'tfds:cifar10'
  assert (config.constraints.cc.weight, config.constraints.cm.weight) == (0.05, 0.01)
  assert (config.distill.lr, config.distill.momentum, config.distill.batch_real) == (1.0, 0.5, 256)
  assert config.distill.iterations == 20_000
  assert evaluate.EvalSettings.from_config(config).epochs == 1000
  assert config.constraints.cc.extractor == 'pool' and config.pool.model == 'ResNet18'
  assert (config.pool.size, config.pool.epochs) == (1000, 40)
  config = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=1,method=idm_iid')
  assert config.method == 'idm' and config.distill.lr == 0.2 and config.distill.momentum == 0.5
  assert (
    config.idm.ce_weight,
    config.distill.batch_real,
    config.idm.push_every,
    config.idm.train_steps,
  ) == (0.5, 5000, 5, 10)
  assert (config.constraints.cc.weight, config.constraints.cm.weight) == (0.01, 0.03)
  tiny = _load_config_file('configs/paper.py', 'dataset=tinyimagenet,ipc=50,method=idm')
  assert (tiny.idm.ce_weight, tiny.idm.train_steps, tiny.model.name) == (0.8, 50, 'ConvNetD4')
  assert tiny.constraints.cc.weight == 0 and tiny.constraints.cm.weight == 0
  cpu = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=10,method=dm_iid,budget=cpu')
  assert (cpu.distill.iterations, cpu.distill.batch_real, cpu.eval.epochs) == (400, 64, 300)
  for bad, message in (
    ('ipc=3', r'ipc=3; choose one of \(1, 10, 50\)'),
    ('dataset=imagenet', "dataset='imagenet'"),
    ('method=dc', "method='dc'"),
    ('ipcs=10', 'ipcs'),
  ):
    with pytest.raises(ValueError, match=message):
      _load_config_file('configs/paper.py', bad)


def test_paper_presets_evaluate_with_the_methods_protocol_at_the_paper_budget_only():
  for method, protocol in (
    ('dm_iid', 'dm'), ('idm', 'dm'), ('m3d', 'idc'), ('dance', 'dance'), ('ncfm', 'ncfm'),
    ('dsdm', 'dsdm'),
  ):  # fmt: skip
    paper = _load_config_file('configs/paper.py', f'dataset=cifar10,ipc=10,method={method}')
    cpu = _load_config_file(
      'configs/paper.py', f'dataset=cifar10,ipc=10,method={method},budget=cpu'
    )
    assert (paper.eval.protocol, cpu.eval.protocol) == (protocol, 'dm')
    assert evaluate.EvalSettings.from_config(cpu).epochs == 300
  family = _load_config_file('configs/paper.py', 'dataset=mnist,ipc=10,method=dance')
  assert family.eval.augment_strategy == 'color_crop_scale_rotate'  # IDC's, without flip
  dm = _load_config_file('configs/paper.py', 'dataset=mnist,ipc=10,method=dm')
  assert dm.eval.augment_strategy == 'color_crop_cutout_scale_rotate'  # DSA's, without flip


def test_ncfm_presets_take_every_image_of_a_500_image_class_and_sample_at_the_cpu_budget():
  for dataset, batch in (('cifar10', 1024), ('cifar100', 500), ('tinyimagenet', 500)):
    config = _load_config_file('configs/paper.py', f'dataset={dataset},ipc=10,method=ncfm')
    assert (config.distill.batch_real, config.family.fixed_real) == (batch, True)
  cpu = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=10,method=ncfm,budget=cpu')
  assert (cpu.distill.batch_real, cpu.family.fixed_real) == (64, False)


def _main(*args):
  return subprocess.run(
    [sys.executable, '-m', 'dd_jax.main', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize(
  'override, field, suggestion',
  [
    ('ipcc=3', 'ipcc', 'ipc'),  # a top-level field
    ('distill.lrr=1', 'lrr', 'lr'),  # a field of a section
    ('distil.lr=1', 'distil', 'distill'),  # a section (ml_collections raises KeyError)
  ],
)
def test_cli_rejects_misspelled_override(tmp_path, override, field, suggestion):
  result = _main('--config=configs/digits.py', f'--workdir={tmp_path}/run', f'--config.{override}')
  assert result.returncode == 2
  assert result.stderr.strip() == (
    f"dd_jax: error: the config has no field '{field}' (a --config.<field>=<value> override). "
    f'Did you mean "{suggestion}" instead of "{field}"?'
  )
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize(
  'config, overrides, message',
  [
    (
      'configs/nope.py',
      ('--config.seed=1',),
      '--config=configs/nope.py cannot be loaded ([Errno 2] No such file or directory: '
      "'configs/nope.py'); check the path.",
    ),
    (
      'configs/nope.py',
      (),
      '--config=configs/nope.py cannot be loaded ([Errno 2] No such file or directory: '
      "'configs/nope.py'); check the path.",
    ),
    (
      '{bad_file}',
      ('--config.seed=1',),
      '--config={bad_file}: Python syntax error at line 1 (invalid syntax); fix the config file.',
    ),
    (
      'configs/paper.py:ipcc=3',
      (),
      "--config=configs/paper.py: Config argument 'ipcc=3': expected key=value with key in "
      "['budget', 'dataset', 'iid', 'ipc', 'method']",
    ),
    (
      'configs/paper.py:method=foo',
      (),
      "--config=configs/paper.py: configs/paper.py: method='foo'",
    ),
    ('configs/digits.py:iid=foo', (), "--config=configs/digits.py: iid='foo': choose one of"),
    (
      'configs/digits.py',
      ('--config.distill.model=ConvNet',),
      "the config has no field 'model' (a --config.<field>=<value> override). Fields named "
      "'model': config.eval.model, config.model.name, config.pool.model.",
    ),
  ],
  ids=['missing_file_with_override', 'missing_file', 'syntax', 'ipcc', 'method', 'iid', 'model'],
)
def test_cli_config_file_errors_are_one_line(tmp_path, config, overrides, message):
  bad_file = tmp_path / 'bad.py'
  bad_file.write_text('def get_config(:\n  pass\n')
  config, message = (text.replace('{bad_file}', str(bad_file)) for text in (config, message))
  args = (f'--config={config}', f'--workdir={tmp_path}/run', *overrides)
  result = _main(*args)
  assert result.returncode == 2
  assert result.stderr.startswith(f'dd_jax: error: {message}'), result.stderr
  assert len(result.stderr.splitlines()) == 1
  assert not os.path.exists(tmp_path / 'run')
  with_traceback = _main(*args, '--traceback')
  assert 'Traceback' in with_traceback.stderr


def test_cli_refusal_is_one_message_and_traceback_is_optional(tmp_path):
  args = ('--config=configs/digits.py', f'--workdir={tmp_path}/run', '--config.eval.model=LeNet')
  result = _main(*args)
  assert result.returncode == 2
  assert result.stderr.startswith("dd_jax: error: config.eval.model='LeNet' cannot take the 8x8x1")
  assert 'Traceback' not in result.stderr and len(result.stderr.splitlines()) == 2
  with_traceback = _main(*args, '--traceback')
  assert with_traceback.returncode != 0 and 'Traceback' in with_traceback.stderr


def test_cli_interrupt_exits_at_once_with_the_resume_message(tmp_path):
  process = subprocess.Popen(
    [sys.executable, '-m', 'dd_jax.main', '--config=configs/digits.py', f'--workdir={tmp_path}/r'],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline()  # the run has started (first progress line)
  process.send_signal(signal.SIGINT)
  start = time.monotonic()
  _, stderr = process.communicate(timeout=60)
  assert time.monotonic() - start < 10  # not after the running XLA call finishes
  assert process.returncode == 130
  assert 'Rerun the same command to resume from the last checkpoint' in stderr


def test_cli_rejects_bad_value_before_work(tmp_path):
  result = _main(
    '--config=configs/digits.py', f'--workdir={tmp_path}/run', '--config.model.name=ConvNett'
  )
  assert result.returncode != 0
  assert "config.model.name='ConvNett' is not valid" in result.stderr
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize(
  'override, message',
  [
    ('--config.ipc=three', 'flag --config.ipc=three: invalid literal for int()'),
    (
      '--config.distill.lr=fast',
      'flag --config.distill.lr=fast: could not convert string to float',
    ),
  ],
)
def test_cli_rejects_wrong_types_before_work(tmp_path, override, message):
  result = _main('--config=configs/digits.py', f'--workdir={tmp_path}/run', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_every_config_field_is_documented():
  docs = config_lib.field_docs()
  fields = {name for name, _, _ in info.config_fields(config_lib.default_config())}
  assert fields == set(docs)
  assert not [name for name in fields if not docs[name]], 'undocumented config fields'
  assert 'learning rate of the synthetic images' in docs['distill.lr']
  assert docs['dataset.validation_fraction'].startswith('> 0: hold out this fraction')


def test_info_resolves_a_config_with_overrides():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'dd_jax.info',
      '--config=configs/digits.py:ipc=10',
      '--config.distill.lr=2',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  assert '  config.ipc = 10\n      synthetic images per class\n' in result.stdout
  assert '  config.distill.lr = 2.0\n' in result.stdout


def test_iid_settings_default_and_reference():
  digits = _load_config_file('configs/digits.py', '')
  default = methods.get('dm').presets.iid['default']
  cc = digits.constraints.cc
  assert (cc.form, cc.weight, digits.constraints.cm.weight) == (
    default.cc_form,
    default.cc_weight,
    default.cm_weight,
  )
  assert presets.method_label(digits) != 'DM + IID (reference)'
  reference = _load_config_file('configs/digits.py', 'iid=reference')
  assert presets.method_label(reference) == 'DM + IID (reference)'
  assert (reference.constraints.cc.form, reference.constraints.cc.weight) == ('squared', 0.05)
  # The paper presets reproduce the paper unless asked otherwise.
  paper = _load_config_file('configs/paper.py', 'budget=cpu')
  assert presets.method_label(paper) == 'DM + IID (reference)'
  paper_default = _load_config_file('configs/paper.py', 'budget=cpu,iid=default')
  assert paper_default.constraints.cc.form == default.cc_form
  # The plain-DM variant of the default zeroes both terms; its IID variant restores the default.
  plain = presets.variant_config(digits, 'dm')
  assert (plain.constraints.cc.weight, plain.constraints.cm.weight) == (0.0, 0.0)
  restored = presets.variant_config(plain, 'dm_iid').constraints.cc
  assert (restored.form, restored.weight) == (default.cc_form, default.cc_weight)
  with pytest.raises(ValueError, match=r"iid='best': choose one of \['default', 'reference'\]"):
    _load_config_file('configs/digits.py', 'iid=best')

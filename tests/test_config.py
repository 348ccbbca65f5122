"""Config files, config strings, validation and the locked command line."""

import os
import subprocess
import sys

import pytest

from dd_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_config_string():
  defaults = {'ipc': 10, 'method': 'dm_iid', 'flag': False}
  assert config_lib.parse_config_string(None, defaults) == defaults
  assert config_lib.parse_config_string('ipc=50,method=dm,flag=true', defaults) == {
      'ipc': 50, 'method': 'dm', 'flag': True}
  with pytest.raises(ValueError, match="'ipcc=3'.*key=value with key in"):
    config_lib.parse_config_string('ipcc=3', defaults)
  with pytest.raises(ValueError, match='ipc=.ten.: expected a int'):
    config_lib.parse_config_string('ipc=ten', defaults)


@pytest.mark.parametrize('field, value, message', [
    ('ipc', 0, r'config.ipc=0 must be > 0'),
    ('method', 'gm', r"config.method='gm' is not valid"),
    ('model.name', 'ConvNett', r"config.model.name='ConvNett' is not valid"),
    ('eval.model', 'ResNet50', r"config.eval.model='ResNet50' is not valid"),
    ('augment.strategy', 'color_blur', r"config.augment.strategy: .*unknown DSA op 'blur'"),
    ('distill.batch_real', -1, r'config.distill.batch_real=-1 must be > 0'),
    ('distill.init', 'zeros', r"config.distill.init='zeros' is not valid"),
    ('constraints.cc.form', 'cubic', r"config.constraints.cc.form='cubic' is not valid"),
    ('constraints.cm.grouping', 'rows', r"config.constraints.cm.grouping='rows' is not valid"),
    ('constraints.cm.weight', -0.1, r'config.constraints.cm.weight=-0.1 must be >= 0'),
    ('distill.checkpoint_every', 150, r'checkpoint_every=150 must be a multiple of'),
    ('constraints.cc.extractor', 'resnet', r"config.constraints.cc.extractor='resnet' is not"),
    ('pool.model', 'ResNet50', r"config.pool.model='ResNet50' is not valid"),
    ('pool.size', 0, r'config.pool.size=0 must be > 0'),
    ('idm.queue_init', 101, r'config.idm.queue_init=101 exceeds config.idm.queue_capacity=100'),
    ('idm.ce_weight', -1.0, r'config.idm.ce_weight=-1.0 must be >= 0'),
])
def test_validate_config_names_the_field(field, value, message):
  config = config_lib.default_config()
  config_lib.validate_config(config)  # the default is valid
  section, _, name = field.rpartition('.')
  target = config
  for part in filter(None, section.split('.')):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


def _load_config_file(path, arg=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('config_file', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize('path, arg', [('configs/default.py', None), ('configs/digits.py', ''),
                                       ('configs/digits.py', 'ipc=10,method=dm'),
                                       ('configs/digits.py', 'method=idm_iid,cc=pool'),
                                       ('configs/paper.py', '')])
def test_config_files_are_valid(path, arg):
  config_lib.validate_config(_load_config_file(path, arg))


# What each paper dataset looks like: (image shape, classes, known normalisation key).
PAPER_DATA = {'mnist': ((28, 28, 1), 10), 'fashion_mnist': ((28, 28, 1), 10),
              'svhn': ((32, 32, 3), 10), 'cifar10': ((32, 32, 3), 10),
              'cifar100': ((32, 32, 3), 100), 'tinyimagenet': ((64, 64, 3), 200)}


@pytest.mark.parametrize('dataset', sorted(PAPER_DATA))
def test_every_paper_preset_builds_its_run(dataset):
  """Each dataset x IPC x method x budget: valid, known data, networks that take the images."""
  import itertools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dd_jax import models  # pylint: disable=g-import-not-at-top
  from dd_jax.distill import loop  # pylint: disable=g-import-not-at-top
  image_shape, num_classes = PAPER_DATA[dataset]
  built = set()
  for ipc, method, budget in itertools.product((1, 10, 50), ('dm', 'dm_iid', 'idm', 'idm_iid'),
                                               ('paper', 'cpu')):
    config = _load_config_file('configs/paper.py',
                               f'dataset={dataset},ipc={ipc},method={method},budget={budget}')
    config_lib.validate_config(config)
    source, _, name = config.dataset.name.partition(':')
    assert source in ('tfds', 'folder')
    if source == 'tfds':  # SPEC 8's constants are known for every TFDS paper dataset
      assert data_lib.known_dataset_key(name) is not None
    weights = loop.objective_weights(config)
    iid = method.endswith('_iid')
    assert (weights.cc, weights.cm) == ({'dm': (0.05, 0.01), 'idm': (0.01, 0.03)}[
        config.method] if iid else (0.0, 0.0))
    assert config.method == method.split('_')[0]
    assert config.constraints.cc.extractor == ('pool' if iid and budget == 'paper' else
                                               'matching_net')
    assert 'flip' not in config.augment.strategy if dataset in ('mnist', 'fashion_mnist') else (
        'flip' in config.augment.strategy)
    if method.startswith('idm'):
      assert config.distill.batch_real <= {'cifar10': 5000, 'cifar100': 500}.get(dataset, 256) \
          or budget == 'cpu'
    for model in {config.model.name, config.eval.model} - built:
      net = models.get_network(model, num_classes)
      variables = jax.eval_shape(lambda n=net: n.init(jax.random.key(0), (1, *image_shape)))
      logits = jax.eval_shape(lambda v, n=net: n.apply(v, jax.numpy.zeros((2, *image_shape))),
                              variables)
      assert logits.shape == (2, num_classes)
      built.add(model)


def test_paper_presets_follow_the_paper():
  config = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=10,method=dm_iid')
  assert config.dataset.name == 'tfds:cifar10'
  assert (config.constraints.cc.weight, config.constraints.cm.weight) == (0.05, 0.01)
  assert (config.distill.lr, config.distill.momentum, config.distill.batch_real) == (1.0, 0.5, 256)
  assert config.distill.iterations == 20_000 and config.eval.epochs == 1000
  assert config.constraints.cc.extractor == 'pool' and config.pool.model == 'ResNet18'
  assert (config.pool.size, config.pool.epochs) == (1000, 40)
  config = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=1,method=idm_iid')
  assert config.method == 'idm' and config.distill.lr == 0.2 and config.distill.momentum == 0.5
  assert (config.idm.ce_weight, config.distill.batch_real, config.idm.push_every,
          config.idm.train_steps) == (0.5, 5000, 5, 10)
  assert (config.constraints.cc.weight, config.constraints.cm.weight) == (0.01, 0.03)
  tiny = _load_config_file('configs/paper.py', 'dataset=tinyimagenet,ipc=50,method=idm')
  assert (tiny.idm.ce_weight, tiny.idm.train_steps, tiny.model.name) == (0.8, 50, 'ConvNetD4')
  assert tiny.constraints.cc.weight == 0 and tiny.constraints.cm.weight == 0
  cpu = _load_config_file('configs/paper.py', 'dataset=cifar10,ipc=10,method=dm_iid,budget=cpu')
  assert (cpu.distill.iterations, cpu.distill.batch_real, cpu.eval.epochs) == (400, 64, 300)
  for bad, message in (('ipc=3', r"ipc=3; choose one of \(1, 10, 50\)"),
                       ('dataset=imagenet', "dataset='imagenet'"),
                       ('method=dc', "method='dc'"), ('ipcs=10', 'ipcs')):
    with pytest.raises(ValueError, match=message):
      _load_config_file('configs/paper.py', bad)


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'dd_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_rejects_misspelled_override(tmp_path):
  result = _main('--config=configs/digits.py', f'--workdir={tmp_path}/run', '--config.ipcc=3')
  assert result.returncode != 0
  assert 'ipcc' in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_cli_rejects_bad_value_before_work(tmp_path):
  result = _main('--config=configs/digits.py', f'--workdir={tmp_path}/run',
                 '--config.model.name=ConvNett')
  assert result.returncode != 0
  assert "config.model.name='ConvNett' is not valid" in result.stderr
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('override, message', [
    ('--config.ipc=three', "flag --config.ipc=three: invalid literal for int()"),
    ('--config.distill.lr=fast', "flag --config.distill.lr=fast: could not convert string to float"),
])
def test_cli_rejects_wrong_types_before_work(tmp_path, override, message):
  result = _main('--config=configs/digits.py', f'--workdir={tmp_path}/run', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_snapshot_accepts_fields_added_later_and_refuses_changed_ones(tmp_path, caplog):
  from dd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  workdir_lib.snapshot_config(str(tmp_path), config)
  # Simulate a snapshot written before the `idm` section existed.
  snapshot = workdir_lib.read_json(str(tmp_path / 'config.json'))
  del snapshot['idm']
  workdir_lib.write_json(str(tmp_path / 'config.json'), snapshot)
  workdir_lib.snapshot_config(str(tmp_path), config)  # accepted, with a warning
  assert 'predates fields idm.' in caplog.text
  config.ipc = 3
  with pytest.raises(ValueError, match=r'different config:\n  ipc: 10 -> 3'):
    workdir_lib.snapshot_config(str(tmp_path), config)

"""One path from a config to checked settings (dd_jax.experiment)."""

import itertools
import os

import jax
import pytest
from conftest import PAPER_SHAPES

from dd_jax import config as config_lib
from dd_jax import data as data_lib
from dd_jax import experiment, models, presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('ipc', 0, r'config.ipc=0 must be > 0'),
    ('method', 'gm', r"config.method='gm' is not valid"),
    ('model.name', 'ConvNett', r"config.model.name='ConvNett' is not valid"),
    ('eval.model', 'ResNet50', r"config.eval.model='ResNet50' is not valid"),
    (
      'augment.strategy',
      'color_blur',
      r"config.augment.strategy='color_blur' names unknown DSA op 'blur'",
    ),
    ('distill.batch_real', -1, r'config.distill.batch_real=-1 must be > 0'),
    ('distill.init', 'zeros', r"config.distill.init='zeros' is not valid"),
    ('constraints.cc.form', 'cubic', r"config.constraints.cc.form='cubic' is not valid"),
    ('constraints.cm.grouping', 'rows', r"config.constraints.cm.grouping='rows' is not valid"),
    ('constraints.cm.weight', -0.1, r'config.constraints.cm.weight=-0.1 must be >= 0'),
    ('distill.checkpoint_every', 150, r'checkpoint_every=150 must be a multiple of'),
    ('constraints.cc.extractor', 'resnet', r"config.constraints.cc.extractor='resnet' is not"),
    ('pool.model', 'ResNet50', r"config.pool.model='ResNet50' is not valid"),
    ('pool.size', 0, r'config.pool.size=0 must be > 0'),
    ('idm.queue_init', 101, r'config.idm.queue_init=101 exceeds queue_capacity=100'),
    ('idm.train_lr', 0.0, r'config.idm.train_lr=0.0 must be > 0'),
    ('idm.accuracy_restarts', '20,x', r"config.idm.accuracy_restarts='20,x' must be comma"),
    ('eval.lr', -1.0, r'config.eval.lr=-1.0 must be > 0'),
    ('eval.schedule', 'cosine', r"config.eval.schedule='cosine' is not valid"),
    ('pool.batch_size', 0, r'config.pool.batch_size=0 must be > 0'),
    ('compare.full_train_num_eval', 0, r'config.compare.full_train_num_eval=0 must be > 0'),
    ('compare.variants', 'dm,idm', r"'idm' is not a variant of a method='dm' config"),
    ('idm.ce_weight', -1.0, r'config.idm.ce_weight=-1.0 must be >= 0'),
    ('dataset.validation_fraction', 1.0, r'validation_fraction=1.0 must lie in \[0, 1\)'),
    ('constraints.cc.tau', -1.0, r'config.constraints.cc.tau=-1.0 must be >= 0'),
    ('compute.lowering', 'gpu', r"config.compute.lowering='gpu' is not valid; choose one of"),
    ('compute.precision', 'half', r"config.compute.precision='half' is not valid; choose one"),
  ],
)
def test_validate_config_names_the_field(field, value, message):
  config = config_lib.default_config()
  if field.startswith('idm.'):  # IDM's fields are checked when it is the method
    presets.set_method(config, 'idm')
  experiment.validate_config(config)  # the default is valid
  section, _, name = field.rpartition('.')
  target = config
  for part in filter(None, section.split('.')):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=message):
    experiment.validate_config(config)


PAPER_DATA = PAPER_SHAPES


@pytest.mark.parametrize('dataset', sorted(PAPER_DATA))
def test_every_paper_preset_builds_its_run(dataset):
  """Each dataset x IPC x method x budget: valid, known data, networks that take the images."""
  image_shape, num_classes = PAPER_DATA[dataset]
  built = set()
  for ipc, method, budget in itertools.product(
    (1, 10, 50), ('dm', 'dm_iid', 'idm', 'idm_iid'), ('paper', 'cpu')
  ):
    config = config_lib.load_config(
      os.path.join(REPO, 'configs/paper.py')
      + f':dataset={dataset},ipc={ipc},method={method},budget={budget}'
    )
    settings = experiment.validate_config(config)
    source, _, name = config.dataset.name.partition(':')
    assert source in ('tfds', 'folder')
    if source == 'tfds':  # normalisation constants are known for every TFDS paper dataset
      assert data_lib.known_dataset_key(name) is not None
    weights = settings.distill.weights
    iid = method.endswith('_iid')
    assert (weights.cc, weights.cm) == (
      {'dm': (0.05, 0.01), 'idm': (0.01, 0.03)}[config.method] if iid else (0.0, 0.0)
    )
    assert config.method == settings.method.name == method.split('_')[0]
    assert config.constraints.cc.extractor == (
      'pool' if iid and budget == 'paper' else 'matching_net'
    )
    assert (
      'flip' not in config.augment.strategy
      if dataset in ('mnist', 'fashion_mnist')
      else ('flip' in config.augment.strategy)
    )
    if method.startswith('idm'):
      assert (
        config.distill.batch_real <= {'cifar10': 5000, 'cifar100': 500}.get(dataset, 256)
        or budget == 'cpu'
      )
      assert settings.distill.accuracy_restarts == ((2000, 5000, 10000, 20000) if iid else ())
    for model in {config.model.name, config.eval.model} - built:
      net = models.get_network(model, num_classes)
      variables = jax.eval_shape(lambda n=net: n.init(jax.random.key(0), (1, *image_shape)))
      logits = jax.eval_shape(
        lambda v, n=net: n.apply(v, jax.numpy.zeros((2, *image_shape))), variables
      )
      assert logits.shape == (2, num_classes)
      built.add(model)

"""The one config schema: defaults, ranges, the generated docs, the configs that import it."""

import json
import os

import pytest

from samjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA_CONFIGS = ('celeba', 'cifar_mnist', 'digits_dominoes', 'domainbed', 'fmnist_mnist',
                     'waterbirds')


def test_docs_config_page_is_generated_from_the_schema():
  with open(os.path.join(ROOT, 'docs', 'CONFIG.md')) as f:
    assert f.read() == config_lib.docs_page(), 'run: python -m samjax.config > docs/CONFIG.md'


def test_base_config_holds_every_field_with_its_default():
  config = config_lib.base_train_config()
  flat = {}

  def walk(node, prefix=''):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value
  walk(config)
  assert set(flat) == set(config_lib.FIELDS_BY_NAME)
  for name, field in config_lib.FIELDS_BY_NAME.items():
    assert flat[name] == field.default, name
  config_lib.validate_train_config(config, num_devices=8)


def test_base_toy_config_holds_every_toy_field_with_its_default():
  config = config_lib.base_toy_config()
  flat = {}

  def walk(node, prefix=''):
    for key, value in node.items():
      if hasattr(value, 'items') and f'{prefix}{key}' not in config_lib.TOY_FIELDS_BY_NAME:
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value
  walk(config)
  assert set(flat) == set(config_lib.TOY_FIELDS_BY_NAME)
  for name, field in config_lib.TOY_FIELDS_BY_NAME.items():
    if name == 'compilation_cache_dir':  # $XDG_CACHE_HOME resolved
      assert flat[name].endswith('/samjax/jax')
    elif name == 'sensitivity':
      assert dict(flat[name]) == field.default
    else:
      assert flat[name] == field.default, name
  assert config.job == 'toy'
  config_lib.validate_config(config)


@pytest.mark.parametrize('job, field, value', [
    ('train', 'optimizer.rho', -1.0), ('toy', 'num_steps', -1), ('toy', 'rhos', (float('nan'),)),
    ('toy', 'data.hard_noise', -0.1), ('toy', 'methods', ('sgd', 'adamw')),
])
def test_one_validator_and_one_format_for_every_job(job, field, value):
  config = (config_lib.base_toy_config() if job == 'toy' else config_lib.base_train_config())
  *groups, key = field.split('.')
  node = config
  for group in groups:
    node = node[group]
  with node.ignore_type():
    node[key] = value
  with pytest.raises(ValueError, match=f'^config.{field}: ') as error:
    config_lib.validate_config(config, num_devices=1)
  assert '\n' not in str(error.value)


def test_the_defaults_that_disagreed_have_one_value():
  assert config_lib.field_default('input_workers') == 4
  assert config_lib.field_default('checkpoint_every_steps') == 500
  assert config_lib.field_default('optimizer.momentum') == 0.9


@pytest.mark.parametrize('field, value', [
    ('seed', 2**70), ('seed', -1), ('num_train_steps', 10**30), ('num_epochs', 2**40),
    ('optimizer.learning_rate', 0.0), ('optimizer.learning_rate', float('nan')),
    ('optimizer.momentum', 1.0), ('batch_size', 0), ('input_workers', -1),
    ('optimizer.rho', float('inf')), ('data.val_fraction', 1.0), ('data.image_size', 0),
    ('log_every_steps', True), ('progress_bar', 1), ('optimizer.name', 'adamw'),
])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
  config = config_lib.base_train_config()
  *groups, key = field.split('.')
  node = config
  for group in groups:
    node = node[group]
  with node.ignore_type():
    node[key] = value
  with pytest.raises(ValueError, match=f'^config.{field}: '):
    config_lib.validate_train_config(config, num_devices=1)


def test_unknown_and_missing_fields_are_refused():
  config = config_lib.base_train_config()
  config.optimizer.momentun = 0.9
  with pytest.raises(ValueError, match='config.optimizer.momentun: unknown field'):
    config_lib.validate_train_config(config, num_devices=1)
  config = config_lib.base_train_config()
  del config.optimizer['rho']
  with pytest.raises(ValueError, match='config.optimizer.rho: missing'):
    config_lib.validate_train_config(config, num_devices=1)


@pytest.mark.parametrize('name', REAL_DATA_CONFIGS)
def test_every_real_data_config_starts_from_the_schema(name):
  with open(os.path.join(ROOT, 'configs', f'{name}.py')) as f:
    assert 'from samjax.config import base_train_config' in f.read()


def test_data_config_fills_in_the_schema_defaults():
  data = config_lib.data_config({'name': 'celeb_a'})
  expected = {f.name.split('.', 1)[1]: f.default for f in config_lib.FIELDS
              if f.name.startswith('data.')}
  assert data == {**expected, 'name': 'celeb_a'}
  json.dumps(data)  # what config.json holds is plain JSON

"""Every real-data config trains end to end on CPU: catalog data mocked, manual data as fixtures."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from samjax import train
from samjax.config import validate_train_config
from samjax.data.builders import stacked as stacked_builders
from test_data_builders import mock_catalog_sources, write_pacs_tree, write_waterbirds_folder
from test_train import load_config


def shrink(config, tmp_path, *, image_size=None, steps=3):
  config.data.data_dir = str(tmp_path / 'tfds')
  if image_size is not None:
    config.data.image_size = image_size
  config.num_train_steps = steps
  config.batch_size = 8
  config.eval_batch_size = 16
  config.checkpoint_every_steps = 0
  config.log_every_steps = 1
  config.progress_bar = False
  return config


def check_outputs(workdir, result):
  with open(os.path.join(workdir, 'probe.json')) as f:
    probe = json.load(f)
  assert probe['test_error'] == result['test_error']
  for key in ('test_error', 'worst_group_error', 'val_error'):
    assert 0.0 <= probe[key] <= 1.0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert len(f.readlines()) == 3


@pytest.mark.slow
def test_celeba_config_under_mock_data(tmp_path):
  config = shrink(load_config('celeba', 'sam'), tmp_path, image_size=32)
  config.data.download = True  # mock_data: the download is a no-op
  with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path / 'tfds')):
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  check_outputs(str(tmp_path / 'run'), result)
  assert {'easy_probe_error', 'hard_probe_error'} <= set(result)
  assert result['label_feature'] == 'blond_hair' or 'blond' in result['label_feature'].lower()


@pytest.mark.slow
@pytest.mark.parametrize('name, builder', [('cifar_mnist', stacked_builders.CifarMnist),
                                           ('fmnist_mnist', stacked_builders.FmnistMnist)])
def test_stacked_configs_under_mocked_catalog_data(tmp_path, name, builder):
  config = shrink(load_config(name, 'lsam'), tmp_path)
  config.data.download = True  # from mocked catalog sources
  with mock_catalog_sources(600, str(tmp_path / 'tfds'), [builder]):
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  check_outputs(str(tmp_path / 'run'), result)
  assert {'easy_probe_error', 'hard_probe_error'} <= set(result)


@pytest.mark.slow
def test_waterbirds_config_on_a_fixture_download(tmp_path):
  write_waterbirds_folder(tmp_path / 'manual')
  config = shrink(load_config('waterbirds', 'sgd'), tmp_path, image_size=32)
  config.data.manual_dir = str(tmp_path / 'manual')
  config.model.name = 'convnet'  # ResNet-18 runs in test_celeba_config_under_mock_data
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  check_outputs(str(tmp_path / 'run'), result)


@pytest.mark.slow
def test_domainbed_config_on_a_fixture_tree(tmp_path):
  write_pacs_tree(tmp_path / 'manual')
  config = shrink(load_config('domainbed', 'pacs,sketch,asam'), tmp_path, image_size=32)
  config.data.manual_dir = str(tmp_path / 'manual')
  config.model.name = 'convnet'
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  check_outputs(str(tmp_path / 'run'), result)
  # DomainBed probes the held-out domain's classes only (Appendix F).
  assert 0.0 <= result['probe_accuracy'] <= 1.0
  assert 'attribute_probe_error' not in result


def test_domainbed_config_rejects_an_unknown_domain(tmp_path):
  config = load_config('domainbed', 'pacs,mars')
  with pytest.raises(ValueError, match='held_out_domain'):
    validate_train_config(config, num_devices=1)

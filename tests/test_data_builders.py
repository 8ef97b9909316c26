"""Tests of the TFDS builders and load_dataset.

* ``digits_dominoes`` builds for real from scikit-learn's digits.
* ``celeb_a`` is mocked with ``tfds.testing.mock_data``.
* ``cifar_mnist`` and ``fmnist_mnist`` build for real from *mocked* catalog sources (``mnist``,
  ``cifar10``, ``fashion_mnist``): :func:`mock_catalog_sources` keeps ``mock_data`` on the
  catalog builders but gives our builders their real ``download_and_prepare`` / ``as_dataset``.
* ``waterbirds`` and ``domainbed`` build from small fixture trees and tarballs of tiny images.

Everything is written under pytest's tmp_path; nothing is downloaded.
"""

import contextlib
import csv
import os
import tarfile
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder

from samjax import config as config_lib
from samjax.data import load as load_lib
from samjax.data.builders import digits_dominoes
from samjax.data.builders import domainbed
from samjax.data.builders import stacked as stacked_builders
from samjax.data.builders import waterbirds
from samjax.data import dataset as dataset_lib


def load_dataset(fields, **kwargs):
  """``samjax.data.load_dataset`` of the data fields ``fields`` with the schema's defaults."""
  return load_lib.load_dataset(config_lib.data_config(fields), **kwargs)


def read_builder_split(builder, split):
  """A whole split of a built dataset as numpy arrays."""
  batches = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(10_000)))
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def assert_correlated(split):
  np.testing.assert_array_equal(split.labels, split.attributes)


def assert_group_balanced(split):
  counts = split.group_counts()
  assert counts.min() == counts.max() > 0, counts


# ----------------------------------------------------------------------------------------------
# digits_dominoes: real data.


@pytest.fixture(name='digits_dir', scope='module')
def fixture_digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds_digits'))


def test_digits_dominoes_splits_are_correlated_balanced_and_disjoint(digits_dir):
  builder = tfds.builder('digits_dominoes', data_dir=digits_dir)
  builder.download_and_prepare()
  _, sklearn_labels = digits_dominoes.load_sklearn_digits()
  used = {}
  for split in digits_dominoes.SPLITS:
    data = read_builder_split(builder, split)
    assert data['image'].shape[1:] == (32, 16, 1)
    for half, digits in (('easy', digits_dominoes.EASY_DIGITS),
                         ('hard', digits_dominoes.HARD_DIGITS)):
      np.testing.assert_array_equal(sklearn_labels[data[f'{half}_index']],
                                    np.take(digits, data[f'{half}_digit']))
    used[split] = set(data['easy_index']) | set(data['hard_index'])
  for split, indices in used.items():  # No digit image is in two splits.
    for other, other_indices in used.items():
      if split < other:
        assert not indices & other_indices, (split, other)


def test_load_digits_dominoes(digits_dir):
  config = config_lib.base_train_config().data
  config.name = 'digits_dominoes'
  config.data_dir = digits_dir
  dataset = load_dataset(config)
  assert dataset.label_feature == 'easy_digit' and dataset.easy_feature == 'label'
  assert dataset.num_classes == dataset.num_attributes == 2
  sizes = {name: len(split) for name, split in dataset.splits().items()}
  assert sizes == {'train': 3000, 'val': 500, 'test': 1000, 'probe_train': 2000,
                   'probe_test': 2000}
  for split in (dataset.train, dataset.val, dataset.test):
    assert_correlated(split)
  for split in (dataset.probe_train, dataset.probe_test):
    assert_group_balanced(split)
  assert dataset.train.images.dtype == np.uint8
  assert dataset.image_shape == (32, 16, 1)
  assert dataset.mean.shape == dataset.std.shape == (1,)
  np.testing.assert_allclose(dataset.mean, dataset.train.images.mean(), rtol=1e-5)

  config.max_train_examples = 250
  config.probe_examples_per_group = 30
  config.normalization = 'none'
  small = load_dataset(config, seed=1)
  assert len(small.train) == 250
  assert np.all(small.probe_train.group_counts() == 30)
  np.testing.assert_array_equal(small.std, 255.0)


# ----------------------------------------------------------------------------------------------
# Catalog datasets, mocked.


@contextlib.contextmanager
def mock_catalog_sources(num_examples, data_dir, builder_classes):
  """``tfds.testing.mock_data`` for the catalog datasets only.

  ``mock_data`` patches every ``DatasetBuilder`` (and points every builder at ``data_dir``); this
  restores the real preparation and reading methods on ``builder_classes`` (our own builders), so
  they build for real into ``data_dir`` from mocked catalog data.
  """
  real = {name: dataset_builder.DatasetBuilder.__dict__[name]
          for name in ('download_and_prepare', 'as_dataset', 'as_data_source')}
  real['_as_dataset'] = dataset_builder.FileReaderBuilder.__dict__['_as_dataset']
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir), \
      contextlib.ExitStack() as stack:
    for cls in builder_classes:
      for name, method in real.items():
        stack.enter_context(mock.patch.object(cls, name, method))
    yield


def test_load_celeb_a_mocked(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    dataset = load_dataset(
        {'name': 'celeb_a', 'data_dir': str(tmp_path), 'image_size': 24,
         'normalization': 'imagenet', 'download': True})
  assert dataset.label_feature == 'blond_hair' and dataset.attribute_feature == 'male'
  assert dataset.easy_feature == 'label' and dataset.hard_feature == 'attribute'
  assert dataset.label_names == ('not_blond', 'blond')
  for split in dataset.splits().values():
    assert split.images.shape[1:] == (24, 24, 3)
  assert len(dataset.train) == len(dataset.val) == len(dataset.test) == 64
  for split in (dataset.probe_train, dataset.probe_test):
    assert_group_balanced(split)
  np.testing.assert_allclose(dataset.mean, dataset_lib.IMAGENET_MEAN)


@pytest.mark.parametrize('name, image_shape, num_classes, bottom_feature', [
    ('cifar_mnist', (64, 32, 3), 2, 'cifar_class'),
    ('fmnist_mnist', (56, 28, 1), 5, 'fashion_class'),
])
def test_stacked_builders_from_mocked_sources(tmp_path, name, image_shape, num_classes,
                                              bottom_feature):
  builder_classes = [stacked_builders.CifarMnist, stacked_builders.FmnistMnist]
  with mock_catalog_sources(600, str(tmp_path), builder_classes):
    dataset = load_dataset({'name': name, 'data_dir': str(tmp_path), 'download': True})
    builder = tfds.builder(name, data_dir=str(tmp_path))
    train = read_builder_split(builder, 'train')
    probe_train = read_builder_split(builder, 'probe_train')

  assert dataset.label_feature == 'mnist_digit' and dataset.attribute_feature == bottom_feature
  assert dataset.num_classes == dataset.num_attributes == num_classes
  for split in dataset.splits().values():
    assert split.images.shape[1:] == image_shape and len(split) > 0
  for split in (dataset.train, dataset.val, dataset.test):
    assert_correlated(split)
  for split in (dataset.probe_train, dataset.probe_test):
    assert_group_balanced(split)
  # 90/10 validation hold-out of the builder's train split.
  assert len(dataset.val) == round(0.1 * len(train['image']))
  assert len(dataset.train) + len(dataset.val) == len(train['image'])
  # Train and probe_train use disjoint source images.
  for index_feature in ('mnist_index', f'{bottom_feature.split("_")[0]}_index'):
    assert not set(train[index_feature]) & set(probe_train[index_feature])
  if name == 'cifar_mnist':  # The MNIST half: padded by 2 and grey replicated to RGB.
    top = dataset.train.images[:, :32]
    assert np.all(top[:, :2] == 0) and np.all(top[:, :, -2:] == 0)
    np.testing.assert_array_equal(top[..., 0], top[..., 2])


# ----------------------------------------------------------------------------------------------
# Waterbirds, from fixture folders and tarballs.

WATERBIRDS_PER_GROUP_AND_SPLIT = 2


def write_image(path, size, seed):
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def write_waterbirds_folder(manual_dir):
  """A tiny ``waterbird_complete95_forest2water2/`` with two images per group and split."""
  root = manual_dir / waterbirds.FOLDER_NAME
  rows = []
  for split in range(3):
    for bird in range(2):
      for place in range(2):
        for _ in range(WATERBIRDS_PER_GROUP_AND_SPLIT):
          img_id = len(rows) + 1
          filename = f'{bird:03d}.Some_Bird/Some_Bird_{img_id:04d}.jpg'
          write_image(root / filename, (20 + img_id % 5, 16 + img_id % 3), img_id)
          rows.append({'img_id': img_id, 'img_filename': filename, 'y': bird, 'split': split,
                       'place': place, 'place_filename': f'/x/{place}/scene.jpg'})
  with open(root / 'metadata.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return root


def waterbirds_config(tmp_path, manual_dir, data_name='data'):
  return {'name': 'waterbirds', 'data_dir': str(tmp_path / data_name),
          'manual_dir': str(manual_dir), 'image_size': 8}


def test_waterbirds_from_extracted_folder(tmp_path):
  write_waterbirds_folder(tmp_path / 'manual')
  dataset = load_dataset(waterbirds_config(tmp_path, tmp_path / 'manual'))
  assert dataset.label_names == ('landbird', 'waterbird')
  assert dataset.attribute_names == ('land', 'water')
  assert dataset.easy_feature == 'attribute'
  for split in dataset.splits().values():
    assert split.images.shape[1:] == (8, 8, 3)
    assert np.all(split.group_counts() == WATERBIRDS_PER_GROUP_AND_SPLIT)


def test_waterbirds_from_tarball(tmp_path):
  root = write_waterbirds_folder(tmp_path / 'extracted')
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  with tarfile.open(manual_dir / waterbirds.TARBALL_NAME, 'w:gz') as tar:
    tar.add(root, arcname=waterbirds.FOLDER_NAME)
  dataset = load_dataset(waterbirds_config(tmp_path, manual_dir))
  assert len(dataset.train) == len(dataset.test) == 4 * WATERBIRDS_PER_GROUP_AND_SPLIT


def test_waterbirds_missing_download_names_the_path(tmp_path):
  missing = tmp_path / 'no_such_dir'
  with pytest.raises(ValueError, match=str(missing)):
    load_dataset(waterbirds_config(tmp_path, missing))
  empty_ish = tmp_path / 'manual'
  empty_ish.mkdir()
  (empty_ish / 'README.txt').write_text('not the data')
  with pytest.raises(ValueError, match='metadata.csv') as error:
    load_dataset(waterbirds_config(tmp_path, empty_ish, 'data2'))
  assert str(empty_ish / waterbirds.FOLDER_NAME) in str(error.value)
  assert waterbirds.TARBALL_NAME in str(error.value)


def test_waterbirds_incomplete_folder_names_the_missing_file(tmp_path):
  root = write_waterbirds_folder(tmp_path / 'manual')
  missing = root / '000.Some_Bird' / 'Some_Bird_0003.jpg'
  os.remove(missing)
  with pytest.raises(ValueError, match=str(missing)):
    load_dataset(waterbirds_config(tmp_path, tmp_path / 'manual'))


# ----------------------------------------------------------------------------------------------
# DomainBed, from a fixture ImageFolder tree.

PACS_IMAGES_PER_CLASS = 3
# Folder names as they may appear on disk: matched ignoring case.
PACS_FOLDERS = ('art_painting', 'Cartoon', 'photo', 'sketch')


def write_pacs_tree(manual_dir, domains=PACS_FOLDERS):
  for d, domain in enumerate(domains):
    for c, cls in enumerate(domainbed.PACS.classes):
      for i in range(PACS_IMAGES_PER_CLASS):
        suffix = '.png' if i % 2 else '.jpg'
        write_image(manual_dir / 'PACS' / domain / cls / f'pic_{i:03d}{suffix}',
                    (10 + i, 12 + c % 3), seed=100 * d + 10 * c + i)


def test_domainbed_pacs_protocol(tmp_path):
  write_pacs_tree(tmp_path / 'manual')
  config = {'name': 'domainbed', 'domainbed_dataset': 'pacs', 'held_out_domain': 'sketch',
            'data_dir': str(tmp_path / 'data'), 'manual_dir': str(tmp_path / 'manual'),
            'image_size': 8, 'normalization': 'imagenet'}
  dataset = load_dataset(config)
  assert dataset.name == 'domainbed/pacs'
  assert dataset.num_classes == 7 and dataset.num_attributes == 4
  assert dataset.attribute_names == ('art_painting', 'cartoon', 'photo', 'sketch')
  per_domain = 7 * PACS_IMAGES_PER_CLASS
  test_part = round(0.2 * per_domain)
  assert len(dataset.probe_test) == test_part
  assert len(dataset.probe_train) == per_domain - test_part
  assert len(dataset.test) == 3 * test_part
  assert len(dataset.train) + len(dataset.val) == 3 * (per_domain - test_part)
  for split in (dataset.train, dataset.val, dataset.test):
    assert set(split.attributes) <= {0, 1, 2}
  for split in (dataset.probe_train, dataset.probe_test):
    assert set(split.attributes) == {3}
  assert set(dataset.train.labels) == set(range(7))
  assert dataset.train.images.shape[1:] == (8, 8, 3)

  # The same data, a different held-out domain: the builder is reused.
  config['held_out_domain'] = 'Art Painting'
  dataset = load_dataset(config)
  assert set(dataset.probe_train.attributes) == {0}


def test_domainbed_missing_download_names_the_folders(tmp_path):
  write_pacs_tree(tmp_path / 'manual', domains=PACS_FOLDERS[:3])
  config = {'name': 'domainbed', 'domainbed_dataset': 'pacs', 'held_out_domain': 'photo',
            'data_dir': str(tmp_path / 'data'), 'manual_dir': str(tmp_path / 'manual'),
            'image_size': 8}
  with pytest.raises(ValueError, match="sketch") as error:
    load_dataset(config)
  assert str(tmp_path / 'manual' / 'PACS') in str(error.value)

  config['domainbed_dataset'], config['held_out_domain'] = 'vlcs', 'SUN09'
  with pytest.raises(ValueError, match=str(tmp_path / 'manual' / 'VLCS')):
    load_dataset(config)

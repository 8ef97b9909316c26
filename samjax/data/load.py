"""Loading a data set with two labelled features from TFDS into memory.

:func:`load_dataset` turns a data config into a :class:`~samjax.data.dataset.FeatureDataset`:
five in-memory splits of uint8 images with a ``label`` (the training target) and an
``attribute`` (the other feature's value), read from the TFDS builders of
:mod:`samjax.data.builders` (or the TFDS catalog).

The data config (``config.data``) is the ``data.*`` part of the one schema, :mod:`samjax.config` (fields, defaults, ranges: ``docs/CONFIG.md``).

Datasets (``label`` / ``attribute`` / which is easy; "easy" is the feature with the lower
probe error under SGD, Section 4 of the paper):

===================  =======================  ========================  =========  ============
name                 label                    attribute                 easy       source
===================  =======================  ========================  =========  ============
``digits_dominoes``  ``easy_digit`` 0/1       ``hard_digit`` 3/5        label      sklearn
``cifar_mnist``      ``mnist_digit`` 0/1      ``cifar_class``           label      TFDS builder
                                              airplane/automobile
``fmnist_mnist``     ``mnist_digit`` 0-4      ``fashion_class`` 0-4     label      TFDS builder
``celeb_a``          ``blond_hair``           ``male``                  label      TFDS catalog
``waterbirds``       ``bird`` land/water      ``background`` land/water attribute  manual
``domainbed``        ``class``                ``domain`` (index of the  label      manual
                                              4 domains)                (convention)
===================  =======================  ========================  =========  ============

* MNIST is the easy half of the stacked datasets (Shah et al., 2020: MNIST is the simple
  feature next to CIFAR-10; FMNIST-MNIST: Kirichenko et al., 2022); ``digits_dominoes`` was
  checked empirically (see :mod:`samjax.data.builders.digits_dominoes`).
* CelebA: the paper names gender the hard feature, so hair colour (the label) is easy.
* Waterbirds: the background is the simple, spurious feature of Sagawa et al. (2019), so the
  attribute is easy. Confirm with the SGD probes.
* DomainBed probes the class on a single held-out domain (Table 2): the attribute is constant on
  the probe splits and easy/hard does not apply; ``easy_feature='label'`` is a convention.

Splits:

* ``celeb_a`` and ``waterbirds``: the official train / validation / test splits.
  ``probe_train`` is the largest group-balanced random subset of validation and ``probe_test``
  that of test (every (label, attribute) group equally frequent). Probe sets therefore overlap
  validation / test, which are only used for model selection and the reported test error.
* ``cifar_mnist``, ``fmnist_mnist``, ``digits_dominoes``: the builders' ``train`` and ``test``
  (correlated features) and ``probe_train`` / ``probe_test`` (group-balanced, built from source
  images disjoint from every other split). ``digits_dominoes`` has its own ``validation``
  split; the other two hold out ``val_fraction`` of ``train``.
* ``domainbed``: every domain is split (randomly, by ``seed``) into a training part and a test
  part (``domain_test_fraction``). The three training domains' training parts form
  ``train`` + ``val`` (``val_fraction`` held out) and their test parts ``test``. The held-out
  domain's training part is ``probe_train``, its test part ``probe_test`` (not group balanced:
  one domain; ``probe_examples_per_group`` caps every class).

Memory: every split is held as uint8 in memory. CelebA's 202,599 images take 2.5 GB at
``image_size=64`` and 23 GB at the native 218x178, so set ``image_size`` for it. The TFDS
catalog ``celeb_a`` downloads from Google Drive, which may need a manual retry.

The ``seed`` of :func:`load_dataset` drives only the random choices made at load time (the
validation hold-out, the DomainBed parts, probe subsets, ``max_train_examples``): keep it fixed
across training seeds to evaluate every run on the same data.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from samjax import probe
# Importing the builders registers them with TFDS.
from samjax.data import builders  # pylint: disable=unused-import
from samjax.data import prepare as prepare_lib
from samjax.data import registry
from samjax.data.dataset import FeatureDataset, Split, normalization_constants

DATASET_NAMES = registry.DATASETS
# The data fields this module reads (the schema, samjax.config, defines them all).
_FIELDS_READ = ('name', 'data_dir', 'download', 'manual_dir', 'image_size', 'val_fraction',
                'probe_examples_per_group', 'max_train_examples', 'normalization',
                'domainbed_dataset', 'held_out_domain', 'domain_test_fraction')


# ----------------------------------------------------------------------------------------------
# Reading TFDS splits into memory.


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
  """How to read one dataset.

  Attributes:
    protocol: 'official' (train/validation/test + balanced probe subsets), 'stacked' (the
      builders' own correlated and probe splits) or 'domainbed'.
    label_key, attribute_key: paths to the two features in a TFDS example.
    label_feature, attribute_feature: human names.
    easy_feature: 'label' or 'attribute'.
    photo: natural images (centre-cropped to a square before resizing).
    has_validation_split: the builder has a 'validation' split.
    bool_names: value names of boolean (not ClassLabel) features, by key.
  """
  protocol: str
  label_key: tuple[str, ...]
  attribute_key: tuple[str, ...]
  label_feature: str
  attribute_feature: str
  easy_feature: str
  photo: bool
  has_validation_split: bool = False
  bool_names: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


_SPECS = {
    'digits_dominoes': _DatasetSpec(
        'stacked', ('easy_digit',), ('hard_digit',), 'easy_digit', 'hard_digit', 'label',
        photo=False, has_validation_split=True),
    'cifar_mnist': _DatasetSpec(
        'stacked', ('mnist_digit',), ('cifar_class',), 'mnist_digit', 'cifar_class', 'label',
        photo=False),
    'fmnist_mnist': _DatasetSpec(
        'stacked', ('mnist_digit',), ('fashion_class',), 'mnist_digit', 'fashion_class',
        'label', photo=False),
    'celeb_a': _DatasetSpec(
        'official', ('attributes', 'Blond_Hair'), ('attributes', 'Male'), 'blond_hair', 'male',
        'label', photo=True, has_validation_split=True,
        bool_names={'Blond_Hair': ('not_blond', 'blond'), 'Male': ('female', 'male')}),
    'waterbirds': _DatasetSpec(
        'official', ('bird',), ('place',), 'bird', 'background', 'attribute', photo=True,
        has_validation_split=True),
    'domainbed': _DatasetSpec(
        'domainbed', ('label',), ('domain',), 'class', 'domain', 'label', photo=True),
}


def _feature_at(features: Any, key: Sequence[str]) -> Any:
  for k in key:
    features = features[k]
  return features


def _value_names(builder: tfds.core.DatasetBuilder, key: Sequence[str],
                 spec: _DatasetSpec) -> tuple[str, ...]:
  feature = _feature_at(builder.info.features, key)
  if isinstance(feature, tfds.features.ClassLabel):
    return tuple(feature.names)
  if key[-1] in spec.bool_names:
    return spec.bool_names[key[-1]]
  raise ValueError(f'feature {"/".join(key)} of {builder.name} is neither a ClassLabel nor a '
                   'known boolean')


def _resize(image: tf.Tensor, size: int, center_crop: bool) -> tf.Tensor:
  """Optionally centre-crops to a square, then resizes to ``size x size`` (uint8)."""
  if center_crop:
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    image = tf.image.resize_with_crop_or_pad(image, side, side)
  image = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _read_split(builder: tfds.core.DatasetBuilder, split: str, spec: _DatasetSpec,
                image_size: Optional[int], num_classes: int, num_attributes: int) -> Split:
  """Reads a TFDS split into memory (in TFDS order), resizing images on the way."""
  image_shape = builder.info.features['image'].shape
  if image_size is None and None in image_shape:
    raise ValueError(f'{builder.name} has images of varying size {image_shape}: set '
                     'data.image_size')
  if image_size is not None and not spec.photo:
    raise ValueError(f'data.image_size must be None for {builder.name}: its stacked images keep '
                     f'their native resolution {image_shape}')

  def extract(example):
    image = example['image']
    if image_size is not None:
      image = _resize(image, image_size, center_crop=spec.photo)
    return (image, tf.cast(_feature_at(example, spec.label_key), tf.int32),
            tf.cast(_feature_at(example, spec.attribute_key), tf.int32))

  ds = builder.as_dataset(split=split, shuffle_files=False)
  num_examples = int(ds.cardinality())
  ds = ds.map(extract, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(1024).prefetch(2)
  chunks = tfds.as_numpy(ds)
  if num_examples >= 0:  # Preallocate: the largest splits are gigabytes.
    out_shape = ((image_size, image_size, image_shape[-1]) if image_size else image_shape)
    images = np.empty((num_examples, *out_shape), np.uint8)
    labels = np.empty([num_examples], np.int32)
    attributes = np.empty([num_examples], np.int32)
    position = 0
    for image_chunk, label_chunk, attribute_chunk in chunks:
      end = position + len(image_chunk)
      images[position:end] = image_chunk
      labels[position:end] = label_chunk
      attributes[position:end] = attribute_chunk
      position = end
    if position != num_examples:
      raise ValueError(f'{builder.name}/{split}: read {position} examples, expected '
                       f'{num_examples}')
  else:
    image_chunks, label_chunks, attribute_chunks = zip(*chunks)
    images = np.concatenate(image_chunks)
    labels = np.concatenate(label_chunks)
    attributes = np.concatenate(attribute_chunks)
  return Split(images, labels, attributes, num_classes, num_attributes)


# ----------------------------------------------------------------------------------------------
# Deterministic subsets.


def _rng(seed: int, *tags: str) -> np.random.Generator:
  """A generator for one purpose (``tags``) of the load-time randomness."""
  return np.random.default_rng(
      np.random.SeedSequence([seed, *(zlib.crc32(t.encode()) for t in tags)]))


def holdout_split(split: Split, fraction: float, rng: np.random.Generator) -> tuple[Split, Split]:
  """Splits off a random ``fraction`` (at least one example): ``(rest, held_out)``."""
  num_held_out = max(1, int(round(fraction * len(split))))
  if num_held_out >= len(split):
    raise ValueError(f'cannot hold out {fraction:.0%} of {len(split)} examples and keep any')
  permutation = rng.permutation(len(split))
  return (split.take(np.sort(permutation[num_held_out:])),
          split.take(np.sort(permutation[:num_held_out])))


def random_subset(split: Split, size: Optional[int], rng: np.random.Generator) -> Split:
  """A random subset of ``size`` examples (in original order); all of them if ``size`` is None."""
  if size is None or size >= len(split):
    return split
  return split.take(np.sort(rng.choice(len(split), size, replace=False)))


def group_balanced_subset(split: Split, rng: np.random.Generator,
                          max_per_group: Optional[int] = None, balance: bool = True) -> Split:
  """A random subset with the same number of examples in every (label, attribute) group.

  The balanced draw is :func:`samjax.probe.balanced_subset` (one implementation).

  Args:
    split: the examples to choose from.
    rng: randomness of the choice.
    max_per_group: at most this many examples per group (None: no cap).
    balance: if False, only apply the cap: groups keep ``min(count, max_per_group)`` examples.

  Returns:
    The subset, in the original order.

  Raises:
    ValueError: if ``balance`` and some group is empty.
  """
  counts = split.group_counts()
  if balance:
    if counts.min() == 0:
      raise ValueError(
          'cannot balance the (label, attribute) groups: some are empty; counts per group '
          f'[label][attribute]: {counts.reshape(split.num_classes, -1).tolist()}')
    per_group = int(counts.min()) if max_per_group is None else min(int(counts.min()),
                                                                    max_per_group)
    return split.take(probe.balanced_subset(split.labels, split.attributes, rng,
                                            per_group=per_group))
  per_group = counts if max_per_group is None else np.minimum(counts, max_per_group)
  groups = split.groups
  chosen = [rng.choice(np.flatnonzero(groups == g), n, replace=False)
            for g, n in enumerate(per_group) if n > 0]
  return split.take(np.sort(np.concatenate(chosen)))


def _concatenate(splits: Sequence[Split]) -> Split:
  return dataclasses.replace(
      splits[0], images=np.concatenate([s.images for s in splits]),
      labels=np.concatenate([s.labels for s in splits]),
      attributes=np.concatenate([s.attributes for s in splits]))


# ----------------------------------------------------------------------------------------------
# load_dataset.


# Data sets whose preparation downloads (the TFDS catalog); the others build from local files
# (scikit-learn's digits, manual downloads).
DOWNLOADED = ('celeb_a', 'cifar_mnist', 'fmnist_mnist')


def prepare_command(config: Mapping[str, Any], data_dir: str) -> str:
  command = f'python -m samjax.data.prepare --name={config["name"]} --data_dir={data_dir}'
  if config['name'] == 'domainbed':
    command += f' --domainbed_dataset={config["domainbed_dataset"]}'
  return command


def _prepared_builder(tfds_name: str, config: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
  """The builder, prepared once among every process sharing the data_dir (:mod:`.prepare`)."""
  builder = tfds.builder(tfds_name, data_dir=config['data_dir'])
  if (config['name'] in DOWNLOADED and not config['download'] and not builder.is_prepared()):
    raise ValueError(
        f'config.data.name: {tfds_name} is not prepared in {builder.data_dir_root}; prepare it '
        f'once with: {prepare_command(config, builder.data_dir_root)} (or let this run download '
        'it: --config.data.download=True)')
  return prepare_lib.prepare_once(tfds_name, config['data_dir'], config['manual_dir'])


def load_dataset(data_config: Any, *, seed: int = 0) -> FeatureDataset:
  """Builds (on first use) and loads the dataset named by ``data_config`` into memory.

  Args:
    data_config: every ``config.data`` field (a ``ConfigDict`` or a mapping), as a validated
      config holds them; ``samjax.config.data_config(partial)`` fills in the defaults of a
      partial one and validates it.
    seed: seed of the load-time random choices (validation hold-out, DomainBed parts, probe
      subsets, ``max_train_examples``); not of the training order.

  Returns:
    The :class:`FeatureDataset`.

  Raises:
    ValueError: for an unknown dataset, domain or field value, or a missing manual download.
  """
  config = data_config.to_dict() if hasattr(data_config, 'to_dict') else dict(data_config)
  missing = [key for key in _FIELDS_READ if key not in config]
  if missing:
    raise ValueError(f'data config: missing {", ".join(missing)}; resolve a partial one with '
                     'samjax.config.data_config(...).')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  seed = int(seed)
  name = config['name']
  spec = _SPECS[name]
  tfds_name = f'domainbed/{config["domainbed_dataset"]}' if name == 'domainbed' else name
  builder = _prepared_builder(tfds_name, config)
  label_names = _value_names(builder, spec.label_key, spec)
  attribute_names = _value_names(builder, spec.attribute_key, spec)
  num_classes, num_attributes = len(label_names), len(attribute_names)

  def read(split: str) -> Split:
    return _read_split(builder, split, spec, config['image_size'], num_classes, num_attributes)

  cap = config['probe_examples_per_group']
  if spec.protocol == 'official':
    train, val, test = read('train'), read('validation'), read('test')
    probe_train = group_balanced_subset(val, _rng(seed, 'probe_train'), cap)
    probe_test = group_balanced_subset(test, _rng(seed, 'probe_test'), cap)
  elif spec.protocol == 'stacked':
    train, test = read('train'), read('test')
    if spec.has_validation_split:
      val = read('validation')
    else:
      train, val = holdout_split(train, config['val_fraction'], _rng(seed, 'val'))
    probe_train = group_balanced_subset(read('probe_train'), _rng(seed, 'probe_train'), cap)
    probe_test = group_balanced_subset(read('probe_test'), _rng(seed, 'probe_test'), cap)
  else:
    held_out = registry.canonical_domain_name(config['held_out_domain'])
    training_parts, test_parts = [], []
    for domain in registry.domain_split_names(config['domainbed_dataset']):
      domain_train, domain_test = holdout_split(
          read(domain), config['domain_test_fraction'], _rng(seed, 'domain', domain))
      if domain == held_out:
        probe_train = group_balanced_subset(
            domain_train, _rng(seed, 'probe_train'), cap, balance=False)
        probe_test = group_balanced_subset(
            domain_test, _rng(seed, 'probe_test'), cap, balance=False)
      else:
        training_parts.append(domain_train)
        test_parts.append(domain_test)
    train, val = holdout_split(_concatenate(training_parts), config['val_fraction'],
                               _rng(seed, 'val'))
    test = _concatenate(test_parts)
  train = random_subset(train, config['max_train_examples'], _rng(seed, 'max_train_examples'))
  mean, std = normalization_constants(config['normalization'], train.images)
  dataset = FeatureDataset(
      name=tfds_name, train=train, val=val, test=test, probe_train=probe_train,
      probe_test=probe_test, num_classes=num_classes, num_attributes=num_attributes,
      label_feature=spec.label_feature, attribute_feature=spec.attribute_feature,
      easy_feature=spec.easy_feature, mean=mean, std=std, label_names=label_names,
      attribute_names=attribute_names)
  logging.info('Loaded %s', dataset.describe())
  return dataset


"""Datasets with two labelled features, held in memory, and step-indexed training batches.

:func:`load_dataset` turns a data config into a :class:`FeatureDataset`: five in-memory
:class:`Split` s of uint8 images with a ``label`` (the training target) and an ``attribute`` (the
other feature's value). :class:`TrainBatches` serves the training batch of any step as a pure
function of ``(seed, step)``; :func:`eval_batches` iterates a split in fixed-shape batches.

Data config (``config.data``, an ``ml_collections.ConfigDict`` or a mapping; missing fields take
the defaults of :func:`default_data_config`)::

    name                      required. 'digits_dominoes' | 'cifar_mnist' | 'fmnist_mnist' |
                              'celeb_a' | 'waterbirds' | 'domainbed'
    data_dir           None   TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets)
    manual_dir         None   manual downloads of waterbirds / domainbed
                              (None: <data_dir>/downloads/manual)
    image_size         None   int: square output resolution. Photos (celeb_a, waterbirds,
                              domainbed) are centre-cropped to a square, then resized
                              (bilinear, antialiased). None keeps the native resolution, which
                              the stacked datasets require and variable-size photos
                              (waterbirds, domainbed) forbid.
    val_fraction       0.1    share of the training data held out (deterministically) as
                              validation when the dataset has no validation split
                              (cifar_mnist, fmnist_mnist, domainbed)
    probe_examples_per_group  None   cap on the examples of every (label, attribute) group of
                              the probe splits (None: as many as group balance allows)
    max_train_examples None   random subset of the training split (tiny CPU runs)
    augment            False  random crop with padding + horizontal flip in TrainBatches (read
                              by the trainer; load_dataset only validates it)
    normalization      'mean_pixel'
                              'mean_pixel': subtract the training set's per-channel mean pixel
                              and divide by its per-channel std (the paper, CIFAR-MNIST);
                              'imagenet': ImageNet mean / std (RGB only; pretrained ResNets);
                              'none': divide by 255
    domainbed_dataset  'pacs' 'pacs' | 'vlcs' | 'office_home'
    held_out_domain    None   DomainBed target domain, e.g. 'art_painting' (required for
                              domainbed; any case, spaces or underscores)
    domain_test_fraction  0.2 share of every DomainBed domain that forms its test part

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
  checked empirically (see :mod:`samjax.data.digits_dominoes`).
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

import collections
import concurrent.futures
import dataclasses
import os
import zlib
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Importing the builder modules registers them with TFDS.
from samjax.data import digits_dominoes  # pylint: disable=unused-import
from samjax.data import domainbed
from samjax.data import stacked_builders  # pylint: disable=unused-import
from samjax.data import waterbirds  # pylint: disable=unused-import

DATASET_NAMES = ('digits_dominoes', 'cifar_mnist', 'fmnist_mnist', 'celeb_a', 'waterbirds',
                 'domainbed')
NORMALIZATIONS = ('mean_pixel', 'imagenet', 'none')
SPLIT_NAMES = ('train', 'val', 'test', 'probe_train', 'probe_test')
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def default_data_config() -> ml_collections.ConfigDict:
  """Every data config field with its default (``name`` must be set)."""
  return ml_collections.ConfigDict({
      'name': '',
      'data_dir': None,
      'manual_dir': None,
      'image_size': None,
      'val_fraction': 0.1,
      'probe_examples_per_group': None,
      'max_train_examples': None,
      'augment': False,
      'normalization': 'mean_pixel',
      'domainbed_dataset': 'pacs',
      'held_out_domain': None,
      'domain_test_fraction': 0.2,
  })


# ----------------------------------------------------------------------------------------------
# Splits and datasets.


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Examples held in memory.

  Attributes:
    images: uint8 ``[N, H, W, C]``.
    labels: int32 ``[N]``, the training target.
    attributes: int32 ``[N]``, the other feature's value (DomainBed: the domain index).
    num_classes: number of label values.
    num_attributes: number of attribute values.
  """
  images: np.ndarray
  labels: np.ndarray
  attributes: np.ndarray
  num_classes: int
  num_attributes: int

  def __post_init__(self):
    n = len(self.images)
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'images must be uint8 [N, H, W, C], got {self.images.dtype} '
                       f'{self.images.shape}')
    for field, values in (('labels', self.labels), ('attributes', self.attributes)):
      if values.dtype != np.int32 or values.shape != (n,):
        raise ValueError(f'{field} must be int32 [{n}], got {values.dtype} {values.shape}')

  def __len__(self) -> int:
    return len(self.images)

  @property
  def groups(self) -> np.ndarray:
    """int32 ``[N]``: ``label * num_attributes + attribute``."""
    return self.labels * np.int32(self.num_attributes) + self.attributes

  def group_counts(self) -> np.ndarray:
    """int64 ``[num_classes * num_attributes]``: examples per group."""
    return np.bincount(self.groups, minlength=self.num_classes * self.num_attributes)

  def take(self, indices: np.ndarray) -> Split:
    """The examples at ``indices``, in that order."""
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                               attributes=self.attributes[indices])


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureDataset:
  """A dataset with two labelled features and its five splits.

  Attributes:
    name: the data config's ``name`` (DomainBed: ``'domainbed/<dataset>'``).
    train, val, test: training, validation (model selection) and test splits.
    probe_train, probe_test: disjoint group-balanced splits (every (label, attribute) group
      equally frequent) to train and evaluate linear probes; DomainBed: the held-out domain.
    num_classes, num_attributes: numbers of label and attribute values.
    label_feature, attribute_feature: human names of the two features, e.g. 'blond_hair'.
    easy_feature: 'label' or 'attribute', the feature SGD learns better.
    mean, std: float32 ``[C]`` per-channel normalisation constants (pixel units).
    label_names, attribute_names: names of the feature values.
  """
  name: str
  train: Split
  val: Split
  test: Split
  probe_train: Split
  probe_test: Split
  num_classes: int
  num_attributes: int
  label_feature: str
  attribute_feature: str
  easy_feature: str
  mean: np.ndarray
  std: np.ndarray
  label_names: tuple[str, ...] = ()
  attribute_names: tuple[str, ...] = ()

  @property
  def hard_feature(self) -> str:
    return 'attribute' if self.easy_feature == 'label' else 'label'

  @property
  def num_groups(self) -> int:
    return self.num_classes * self.num_attributes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])

  def splits(self) -> dict[str, Split]:
    return {name: getattr(self, name) for name in SPLIT_NAMES}

  def normalize(self, images_uint8: np.ndarray) -> np.ndarray:
    """float32 ``(images - mean) / std``."""
    scale = (1.0 / self.std).astype(np.float32)
    offset = (self.mean * scale).astype(np.float32)
    if images_uint8.shape[-1] > 1:
      # Broadcasting a length-3 channel vector is 13-16x slower in numpy than full-image
      # operands (experiments/benchmark.py, pipeline section); same values bit for bit.
      scale = np.ascontiguousarray(np.broadcast_to(scale, images_uint8.shape[1:]))
      offset = np.ascontiguousarray(np.broadcast_to(offset, images_uint8.shape[1:]))
    out = np.multiply(images_uint8, scale, dtype=np.float32)
    out -= offset
    return out

  def describe(self) -> str:
    """One line per split: size and examples per (label, attribute) group."""
    lines = [f'{self.name}: label={self.label_feature} {list(self.label_names)}, '
             f'attribute={self.attribute_feature} {list(self.attribute_names)}, '
             f'easy={self.easy_feature}, image shape {self.image_shape}']
    for name, split in self.splits().items():
      counts = split.group_counts().reshape(self.num_classes, self.num_attributes)
      lines.append(f'  {name:11s} {len(split):7d} examples, per (label, attribute) group: '
                   f'{counts.tolist()}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Config.


def _config_to_dict(data_config: Any) -> dict[str, Any]:
  if isinstance(data_config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    given = data_config.to_dict()
  elif isinstance(data_config, Mapping):
    given = dict(data_config)
  else:
    raise ValueError(f'data config must be a ConfigDict or a mapping, got {type(data_config)}')
  defaults = default_data_config().to_dict()
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f'unknown data config fields {unknown}; allowed fields: {sorted(defaults)}')
  return {**defaults, **given}


def _check_optional_positive_int(config: Mapping[str, Any], field: str) -> None:
  value = config[field]
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f'data.{field} must be None or a positive int, got {value!r}')


def _check_fraction(config: Mapping[str, Any], field: str) -> None:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
    raise ValueError(f'data.{field} must be a number in (0, 1), got {value!r}')


def validate_data_config(data_config: Any) -> dict[str, Any]:
  """The data config as a plain dict with defaults filled in; ValueError on a bad field."""
  config = _config_to_dict(data_config)
  if config['name'] not in DATASET_NAMES:
    raise ValueError(f'data.name must be one of {list(DATASET_NAMES)}, got {config["name"]!r}')
  if config['normalization'] not in NORMALIZATIONS:
    raise ValueError(f'data.normalization must be one of {list(NORMALIZATIONS)}, '
                     f'got {config["normalization"]!r}')
  for field in ('image_size', 'probe_examples_per_group', 'max_train_examples'):
    _check_optional_positive_int(config, field)
  for field in ('val_fraction', 'domain_test_fraction'):
    _check_fraction(config, field)
  for field in ('data_dir', 'manual_dir'):
    if config[field] is not None and not isinstance(config[field], (str, os.PathLike)):
      raise ValueError(f'data.{field} must be None or a path, got {config[field]!r}')
  if not isinstance(config['augment'], bool):
    raise ValueError(f'data.augment must be a bool, got {config["augment"]!r}')
  if config['name'] == 'domainbed':
    if config['domainbed_dataset'] not in domainbed.CONFIGS:
      raise ValueError(f'data.domainbed_dataset must be one of {list(domainbed.CONFIGS)}, '
                       f'got {config["domainbed_dataset"]!r}')
    domains = domainbed.CONFIGS[config['domainbed_dataset']].split_names
    held_out = config['held_out_domain']
    if not isinstance(held_out, str) or domainbed.canonical_folder_name(held_out) not in domains:
      raise ValueError(f'data.held_out_domain must be one of {list(domains)} for '
                       f'{config["domainbed_dataset"]}, got {held_out!r}')
  return config


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
  groups = split.groups
  counts = np.bincount(groups, minlength=split.num_classes * split.num_attributes)
  if balance:
    if counts.min() == 0:
      raise ValueError(
          'cannot balance the (label, attribute) groups: some are empty; counts per group '
          f'[label][attribute]: {counts.reshape(split.num_classes, -1).tolist()}')
    per_group = np.full_like(counts, counts.min())
  else:
    per_group = counts
  if max_per_group is not None:
    per_group = np.minimum(per_group, max_per_group)
  chosen = [rng.choice(np.flatnonzero(groups == g), n, replace=False)
            for g, n in enumerate(per_group) if n > 0]
  return split.take(np.sort(np.concatenate(chosen)))


def _concatenate(splits: Sequence[Split]) -> Split:
  return dataclasses.replace(
      splits[0], images=np.concatenate([s.images for s in splits]),
      labels=np.concatenate([s.labels for s in splits]),
      attributes=np.concatenate([s.attributes for s in splits]))


# ----------------------------------------------------------------------------------------------
# Normalisation.


def normalization_constants(method: str, train_images: np.ndarray,
                            chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel ``(mean, std)`` float32 ``[C]`` in pixel units (0..255)."""
  channels = train_images.shape[-1]
  if method == 'none':
    return np.zeros([channels], np.float32), np.full([channels], 255.0, np.float32)
  if method == 'imagenet':
    if channels != 3:
      raise ValueError(f"data.normalization='imagenet' needs RGB images, got {channels} channels")
    return IMAGENET_MEAN.copy(), IMAGENET_STD.copy()
  if method == 'mean_pixel':
    # Exact integer sums, chunked: the largest training sets are gigabytes.
    total = np.zeros([channels], np.int64)
    total_squares = np.zeros([channels], np.int64)
    for start in range(0, len(train_images), chunk_size):
      pixels = train_images[start:start + chunk_size].reshape(-1, channels)
      total += pixels.sum(axis=0, dtype=np.int64)
      total_squares += np.square(pixels, dtype=np.int64).sum(axis=0)
    count = train_images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_squares / count - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1.0).astype(np.float32)
  raise ValueError(f'data.normalization must be one of {list(NORMALIZATIONS)}, got {method!r}')


# ----------------------------------------------------------------------------------------------
# load_dataset.


def _prepared_builder(tfds_name: str, config: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(tfds_name, data_dir=config['data_dir'])
  manual_dir = config['manual_dir']
  if manual_dir is None:
    manual_dir = os.path.join(builder.data_dir_root, 'downloads', 'manual')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load_dataset(data_config: Any, *, seed: int = 0) -> FeatureDataset:
  """Builds (on first use) and loads the dataset named by ``data_config`` into memory.

  Args:
    data_config: the ``config.data`` fields described in the module docstring.
    seed: seed of the load-time random choices (validation hold-out, DomainBed parts, probe
      subsets, ``max_train_examples``); not of the training order.

  Returns:
    The :class:`FeatureDataset`.

  Raises:
    ValueError: for an unknown dataset, domain or field value, or a missing manual download.
  """
  config = validate_data_config(data_config)
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
    held_out = domainbed.canonical_folder_name(config['held_out_domain'])
    training_parts, test_parts = [], []
    for domain in domainbed.CONFIGS[config['domainbed_dataset']].split_names:
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


# ----------------------------------------------------------------------------------------------
# Batches.

_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1


def crop_padding(image_shape: Sequence[int]) -> int:
  """Padding of the random-crop augmentation: 1/8 of the shorter side (4 for 32x32)."""
  return max(1, min(image_shape[0], image_shape[1]) // 8)


def random_crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                         padding: int) -> np.ndarray:
  """Random crops of the zero-padded images, mirrored where ``flips``.

  Equivalent to zero-padding every side by ``padding``, cropping ``H x W`` at ``offsets`` and
  flipping horizontally, but copies each image's overlap with its crop window directly.

  Args:
    images: uint8 ``[B, H, W, C]``.
    offsets: int ``[B, 2]`` crop corners (row, column) in the padded image, in
      ``[0, 2 * padding]``.
    flips: bool ``[B]``, mirror horizontally.
    padding: zero padding on every side.

  Returns:
    uint8 ``[B, H, W, C]``.
  """
  _, height, width, _ = images.shape
  out = np.zeros_like(images)
  for i, (dy, dx) in enumerate(np.asarray(offsets) - padding):
    source = images[i, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)]
    out[i, max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)] = source
  out[flips] = out[flips, :, ::-1]
  return out


class TrainBatches:
  """Training batches as a pure function of ``(seed, step)``.

  Epoch ``e`` visits the examples in the order of a permutation drawn from ``(seed, e)``; step
  ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the incomplete last
  batch of every epoch is dropped). Resuming at step ``s`` therefore gives the same batches.

  With several processes every process draws the same global batch and materialises only its
  rows ``[process_index * B_local, (process_index + 1) * B_local)``, so the global batch does not
  depend on the process count. Augmentation parameters are drawn for the whole global batch from
  ``(seed, step)`` for the same reason.
  """

  def __init__(self, split: Split, dataset: FeatureDataset, global_batch_size: int, seed: int,
               augment: bool, process_index: int = 0, process_count: int = 1,
               normalize: bool = True):
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple of '
                       f'process_count {process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if len(split) < global_batch_size:
      raise ValueError(f'global_batch_size {global_batch_size} exceeds the {len(split)} '
                       'training examples')
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f'seed must be a non-negative int, got {seed!r}')
    self.split = split
    self.dataset = dataset
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = int(seed)
    self.augment = augment
    # False: uint8 images, normalised on the device (4x less host work and transfer).
    self.normalize = normalize
    self.process_index = process_index
    self.process_count = process_count
    self.steps_per_epoch = len(split) // global_batch_size
    self.padding = crop_padding(split.images.shape[1:])
    self._cached = (-1, np.zeros([0], np.int64))

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch`` (cached for the current epoch)."""
    # One tuple, read and replaced whole: prefetching threads (iterate) share this cache.
    cached_epoch, permutation = self._cached
    if epoch != cached_epoch:
      rng = np.random.default_rng(
          np.random.SeedSequence([self.seed, _PERMUTATION_STREAM, epoch]))
      permutation = rng.permutation(len(self.split))
      self._cached = (epoch, permutation)
    return permutation

  def global_indices(self, step: int) -> np.ndarray:
    """int64 ``[global_batch_size]``: the split indices of step ``step``'s global batch."""
    if step < 0:
      raise ValueError(f'step must be non-negative, got {step}')
    epoch, position = divmod(int(step), self.steps_per_epoch)
    start = position * self.global_batch_size
    return self.epoch_permutation(epoch)[start:start + self.global_batch_size]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of step ``step``'s global batch.

    Returns:
      ``{'image': float32 [B_local, H, W, C] normalised (uint8 as stored with
      ``normalize=False``), 'label': int32 [B_local], 'attribute': int32 [B_local]}``.
    """
    rows = slice(self.process_index * self.local_batch_size,
                 (self.process_index + 1) * self.local_batch_size)
    indices = self.global_indices(step)[rows]
    images = self.split.images[indices]
    if self.augment:
      rng = np.random.default_rng(
          np.random.SeedSequence([self.seed, _AUGMENTATION_STREAM, int(step)]))
      offsets = rng.integers(0, 2 * self.padding + 1, size=[self.global_batch_size, 2])
      flips = rng.random(self.global_batch_size) < 0.5
      images = random_crop_and_flip(images, offsets[rows], flips[rows], self.padding)
    return {
        'image': self.dataset.normalize(images) if self.normalize else images,
        'label': self.split.labels[indices],
        'attribute': self.split.attributes[indices],
    }

  def iterate(self, start_step: int = 0, num_workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """``batch_at(start_step), batch_at(start_step + 1), ...`` without end.

    With ``num_workers > 0``, that many threads prepare the next ``2 * num_workers`` batches
    ahead (numpy releases the GIL in gathers, crops and normalisation). Batches are pure
    functions of the step, so the order and the values are those of the sequential iterator.
    """
    if num_workers <= 0:
      step = start_step
      while True:
        yield self.batch_at(step)
        step += 1
    with concurrent.futures.ThreadPoolExecutor(num_workers, 'samjax-batches') as pool:
      ahead = 2 * num_workers
      pending = collections.deque(pool.submit(self.batch_at, start_step + i) for i in range(ahead))
      step = start_step + ahead
      try:
        while True:
          batch = pending.popleft().result()
          pending.append(pool.submit(self.batch_at, step))
          step += 1
          yield batch
      finally:
        for future in pending:
          future.cancel()


def eval_batches(split: Split, dataset: FeatureDataset,
                 batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """The split in order, in batches of exactly ``batch_size`` rows.

  The last batch is padded with zero images (label and attribute 0) to keep shapes static.

  Yields:
    ``(batch, num_valid)``: the batch dict (as in :meth:`TrainBatches.batch_at`) and the number
    of its leading rows that are real examples.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  for start in range(0, len(split), batch_size):
    stop = min(start + batch_size, len(split))
    num_valid = stop - start
    images = split.images[start:stop]
    labels = split.labels[start:stop]
    attributes = split.attributes[start:stop]
    if num_valid < batch_size:
      padding = batch_size - num_valid
      images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), np.uint8)])
      labels = np.concatenate([labels, np.zeros([padding], np.int32)])
      attributes = np.concatenate([attributes, np.zeros([padding], np.int32)])
    yield {'image': dataset.normalize(images), 'label': labels,
           'attribute': attributes}, num_valid

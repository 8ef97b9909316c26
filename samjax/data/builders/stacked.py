"""TFDS builders for CIFAR-MNIST and FMNIST-MNIST: two catalog images stacked vertically.

Every example is an MNIST digit (top) above an image of a second catalog dataset (bottom). The
two halves' classes are the example's two features:

===============  ====================================  ===================================
builder          top half (``mnist_digit``)            bottom half
===============  ====================================  ===================================
``cifar_mnist``  MNIST {0, 1}, padded to 32x32, RGB    CIFAR-10 {airplane, automobile}
                                                       (``cifar_class``); image 64x32x3
``fmnist_mnist`` MNIST {0, 1, 2, 3, 4}, 28x28 grey     Fashion-MNIST classes 0-4 {T-shirt/top,
                                                       trouser, pullover, dress, coat}
                                                       (``fashion_class``); image 56x28x1
===============  ====================================  ===================================

Splits (every source image is used at most once over all splits):

* ``train``: *correlated* pairs (top class ``k`` with bottom class ``k``) from 80% of every
  class of the sources' ``train`` splits.
* ``probe_train``: *group-balanced* pairs (every (top, bottom) class combination equally often,
  so the two features are independent) from the other 20% of the sources' ``train`` splits.
* ``test``: correlated pairs from one half of every class of the sources' ``test`` splits.
* ``probe_test``: group-balanced pairs from the other half.

Each builder builds deterministically from the TFDS catalog datasets ``mnist``, ``cifar10`` and
``fashion_mnist`` (loaded with ``tfds.load`` from the same ``data_dir``; prepared there on first
use). The construction follows Shah et al. (2020) (CIFAR-MNIST) and Kirichenko et al. (2022)
(FMNIST-MNIST); the sizes (approximately, from the real sources) are:

================  =======  ===========  ======  ==========
builder           train    probe_train  test    probe_test
================  =======  ===========  ======  ==========
``cifar_mnist``    8,000    2,000        ~990    ~980
``fmnist_mnist``  ~23,780   ~5,825       ~2,480  ~2,450
================  =======  ===========  ======  ==========

``load_dataset`` holds out ``data.val_fraction`` of ``train`` as the validation split.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from samjax.data.builders import composition
from samjax.data.builders.common import construction_rng

# Share of every source class of the sources' train split that goes to ``probe_train``.
PROBE_TRAIN_FRACTION = 0.2
# Share of every source class of the sources' test split that goes to ``probe_test``.
PROBE_TEST_FRACTION = 0.5


def mnist_to_cifar_format(images: np.ndarray) -> np.ndarray:
  """Pads 28x28x1 MNIST digits by 2 pixels to 32x32 and replicates grey to three channels."""
  padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
  return np.repeat(padded, 3, axis=-1)


def identity(images: np.ndarray) -> np.ndarray:
  """Keeps source images as they are."""
  return images


@dataclasses.dataclass(frozen=True)
class SourceHalf:
  """One half of a stacked example, taken from a TFDS catalog dataset.

  Attributes:
    tfds_name: the catalog dataset (``'mnist'``, ``'cifar10'``, ``'fashion_mnist'``).
    classes: the source's class values that are kept, in feature order.
    class_names: human names of those classes; the feature's ``ClassLabel`` names.
    feature: name of the class feature in the built dataset, e.g. ``'mnist_digit'``.
    index_feature: name of the feature holding the source image's position in its source split.
    to_half: maps source images ``uint8 [N, h, w, c]`` to the half's format.
  """
  tfds_name: str
  classes: tuple[int, ...]
  class_names: tuple[str, ...]
  feature: str
  index_feature: str
  to_half: Callable[[np.ndarray], np.ndarray] = identity


def load_catalog_split(tfds_name: str, split: str, data_dir: str | None):
  """Loads a whole catalog split into memory: ``(images uint8 [N,H,W,C], labels int64 [N])``."""
  ds = tfds.load(tfds_name, split=split, data_dir=data_dir, shuffle_files=False)
  images, labels = [], []
  for batch in tfds.as_numpy(ds.batch(4096)):
    images.append(batch['image'])
    labels.append(batch['label'])
  return np.concatenate(images), np.concatenate(labels)


class StackedPairsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: ``TOP`` images stacked above ``BOTTOM`` images (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  TOP: SourceHalf
  BOTTOM: SourceHalf
  IMAGE_SHAPE: tuple[int, int, int]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=self.IMAGE_SHAPE),
            self.TOP.feature: tfds.features.ClassLabel(names=self.TOP.class_names),
            self.BOTTOM.feature: tfds.features.ClassLabel(names=self.BOTTOM.class_names),
            self.TOP.index_feature: tfds.features.Scalar(np.int64),
            self.BOTTOM.index_feature: tfds.features.Scalar(np.int64),
        }),
        supervised_keys=None,
        description=self.__doc__,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The sources are TFDS catalog datasets.
    generators = {}
    for source_split, fractions, (correlated_split, balanced_split) in [
        ('train', (1 - PROBE_TRAIN_FRACTION, PROBE_TRAIN_FRACTION), ('train', 'probe_train')),
        ('test', (1 - PROBE_TEST_FRACTION, PROBE_TEST_FRACTION), ('test', 'probe_test')),
    ]:
      top_images, top_labels = load_catalog_split(
          self.TOP.tfds_name, source_split, self.data_dir_root)
      bottom_images, bottom_labels = load_catalog_split(
          self.BOTTOM.tfds_name, source_split, self.data_dir_root)
      top_pools = composition.split_class_pools(
          top_labels, self.TOP.classes, fractions,
          construction_rng(self.name, source_split, 'top_pools'))
      bottom_pools = composition.split_class_pools(
          bottom_labels, self.BOTTOM.classes, fractions,
          construction_rng(self.name, source_split, 'bottom_pools'))
      top_half = self.TOP.to_half(top_images)
      bottom_half = self.BOTTOM.to_half(bottom_images)

      top_idx, bottom_idx, positions = composition.correlated_pairs(
          top_pools[0], bottom_pools[0], construction_rng(self.name, correlated_split))
      generators[correlated_split] = self._generate_examples(
          top_half, bottom_half, top_idx, bottom_idx, positions, positions)
      top_idx, bottom_idx, top_pos, bottom_pos = composition.balanced_pairs(
          top_pools[1], bottom_pools[1], construction_rng(self.name, balanced_split))
      generators[balanced_split] = self._generate_examples(
          top_half, bottom_half, top_idx, bottom_idx, top_pos, bottom_pos)
    return generators

  def _generate_examples(self, top_half: np.ndarray, bottom_half: np.ndarray,
                         top_idx: np.ndarray, bottom_idx: np.ndarray,
                         top_positions: np.ndarray, bottom_positions: np.ndarray) -> Iterator:
    for key, (t, b, tp, bp) in enumerate(zip(top_idx, bottom_idx, top_positions,
                                             bottom_positions)):
      yield key, {
          'image': np.concatenate([top_half[t], bottom_half[b]], axis=0),
          self.TOP.feature: int(tp),
          self.BOTTOM.feature: int(bp),
          self.TOP.index_feature: int(t),
          self.BOTTOM.index_feature: int(b),
      }


_MNIST_BINARY = SourceHalf(
    tfds_name='mnist', classes=(0, 1), class_names=('0', '1'), feature='mnist_digit',
    index_feature='mnist_index', to_half=mnist_to_cifar_format)
_CIFAR_BINARY = SourceHalf(
    tfds_name='cifar10', classes=(0, 1), class_names=('airplane', 'automobile'),
    feature='cifar_class', index_feature='cifar_index')
_MNIST_FIVE = SourceHalf(
    tfds_name='mnist', classes=(0, 1, 2, 3, 4), class_names=('0', '1', '2', '3', '4'),
    feature='mnist_digit', index_feature='mnist_index')
_FASHION_FIVE = SourceHalf(
    tfds_name='fashion_mnist', classes=(0, 1, 2, 3, 4),
    class_names=('t_shirt_top', 'trouser', 'pullover', 'dress', 'coat'),
    feature='fashion_class', index_feature='fashion_index')


class CifarMnist(StackedPairsBuilder):
  """CIFAR-MNIST (binary; Shah et al., 2020): MNIST {0, 1} above CIFAR-10 {airplane, automobile}.

  Images are 64x32x3: the MNIST digit padded to 32x32 and replicated to RGB on top, the CIFAR-10
  image below. In ``train`` and ``test`` digit ``k`` always comes with CIFAR class ``k``; in
  ``probe_train`` and ``probe_test`` all four combinations are equally frequent.
  """

  TOP = _MNIST_BINARY
  BOTTOM = _CIFAR_BINARY
  IMAGE_SHAPE = (64, 32, 3)


class FmnistMnist(StackedPairsBuilder):
  """FMNIST-MNIST (5 classes; Kirichenko et al., 2022): MNIST 0-4 above Fashion-MNIST 0-4.

  Images are 56x28x1. In ``train`` and ``test`` digit ``k`` always comes with Fashion-MNIST class
  ``k``; in ``probe_train`` and ``probe_test`` all 25 combinations are equally frequent.
  """

  TOP = _MNIST_FIVE
  BOTTOM = _FASHION_FIVE
  IMAGE_SHAPE = (56, 28, 1)

"""TFDS builder ``digits_dominoes``: real handwritten digits with an easy and a hard feature.

The real-data default that trains anywhere in minutes, built offline from the 1,797 real 8x8
handwritten digits that ship with scikit-learn (``sklearn.datasets.load_digits``, the UCI
optdigits test set). Every example is a 32x16x1 "domino" of two digits:

* top half (``easy_digit``, the *easy* feature): a 0 or a 1, resized (bilinear) from 8x8 to
  16x16 and always at the same place;
* bottom half (``hard_digit``, the *hard* feature): a 3 or a 5, resized to 12x12 and placed at a
  random offset in ``{0..4}^2`` inside a black 16x16 cell. The pair {3, 5} is one of the most
  confusable pairs of the digits, and the position jitter means that a readout of the bottom half
  needs shape features rather than fixed pixels.

In ``train``, ``validation`` and ``test`` the two features are perfectly correlated (0 with 3,
1 with 5); in ``probe_train`` and ``probe_test`` all four combinations are equally frequent.

Choice of the pairs, checked empirically with this builder's data (Appendix B conv net; SGD,
momentum 0.9, lr 0.05, cosine schedule, batch 100, 20 epochs on ``train``; logistic-regression
probe on the standardised 1,024-d flattened features, fit on ``probe_train``, error on
``probe_test``; mean of 3 seeds):

=====================================  =================  ==================
representation                         easy probe error   hard probe error
=====================================  =================  ==================
random init (no training)              0.2%               20.0% (+- 0.6)
SGD on the correlated ``train``        0.7%               18.0% (+- 3.4)
trained on the hard digit (balanced)   0.2%               2.7%
=====================================  =================  ==================

SGD learns the easy feature perfectly and the hard one hardly at all, although the network can
learn it (last row). Without the jitter both features are linearly separable from raw pixels to
~1% error (a 3/5 probe after SGD: 0.6%), so no difference in learning could show. With about 36
distinct digit images per class in ``probe_test`` the hard probe error varies by a few percent
between training seeds: average several seeds.

Splits and leakage: sklearn ships no train/test partition of these digits, so every digit class
is first partitioned (fixed seed) into disjoint pools of 40% / 10% / 10% / 20% / 20% of its
images for ``train`` / ``validation`` / ``test`` / ``probe_train`` / ``probe_test``. No digit
image appears in two splits. Within a split, images are re-used with different partners (and
offsets) to reach the split sizes:

==============  ==============================  ========
split           distribution                    examples
==============  ==============================  ========
``train``       correlated                      3,000
``validation``  correlated                      500
``test``        correlated                      1,000
``probe_train`` group-balanced (4 x 500)        2,000
``probe_test``  group-balanced (4 x 500)        2,000
==============  ==============================  ========

The construction is a pure function of :data:`CONSTRUCTION_SEED`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from samjax.data.builders import composition
from samjax.data.builders.common import construction_rng

EASY_DIGITS = (0, 1)
HARD_DIGITS = (3, 5)
# Side of the square cell of each half, of the easy digit inside it, and of the jittered hard one.
CELL_SIZE = 16
HARD_DIGIT_SIZE = 12
IMAGE_SHAPE = (2 * CELL_SIZE, CELL_SIZE, 1)

# Pools of every digit class, and examples per split (per class if correlated, per group if
# balanced).
SPLITS = ('train', 'validation', 'test', 'probe_train', 'probe_test')
POOL_FRACTIONS = (0.4, 0.1, 0.1, 0.2, 0.2)
CORRELATED_PAIRS_PER_CLASS = {'train': 1500, 'validation': 250, 'test': 500}
BALANCED_PAIRS_PER_GROUP = {'probe_train': 500, 'probe_test': 500}


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 1,797 scikit-learn digits as ``(uint8 [N, 8, 8] in 0..255, int64 [N])``."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int64)


def resize_digits(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of ``uint8 [N, h, w]`` digits to ``[N, size, size]``."""
  return np.stack([
      np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
      for image in images])


class DigitsDominoes(tfds.core.GeneratorBasedBuilder):
  """Real 8x8 handwritten digits: an easy pair (0/1) stacked above a hard, jittered pair (3/5)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE),
            'easy_digit': tfds.features.ClassLabel(names=[str(d) for d in EASY_DIGITS]),
            'hard_digit': tfds.features.ClassLabel(names=[str(d) for d in HARD_DIGITS]),
            # Positions of the two digits in `sklearn.datasets.load_digits()`.
            'easy_index': tfds.features.Scalar(np.int64),
            'hard_index': tfds.features.Scalar(np.int64),
        }),
        supervised_keys=None,
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
        description=__doc__,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The digits ship with scikit-learn.
    digits, labels = load_sklearn_digits()
    easy_cells = resize_digits(digits, CELL_SIZE)
    hard_digits = resize_digits(digits, HARD_DIGIT_SIZE)
    easy_pools = composition.split_class_pools(
        labels, EASY_DIGITS, POOL_FRACTIONS, construction_rng(self.name, 'easy_pools'))
    hard_pools = composition.split_class_pools(
        labels, HARD_DIGITS, POOL_FRACTIONS, construction_rng(self.name, 'hard_pools'))
    generators = {}
    for split, easy_pool, hard_pool in zip(SPLITS, easy_pools, hard_pools):
      rng = construction_rng(self.name, split)
      if split in CORRELATED_PAIRS_PER_CLASS:
        easy_idx, hard_idx, positions = composition.correlated_pairs(
            easy_pool, hard_pool, rng, CORRELATED_PAIRS_PER_CLASS[split])
        easy_pos = hard_pos = positions
      else:
        easy_idx, hard_idx, easy_pos, hard_pos = composition.balanced_pairs(
            easy_pool, hard_pool, rng, BALANCED_PAIRS_PER_GROUP[split])
      offsets = rng.integers(0, CELL_SIZE - HARD_DIGIT_SIZE + 1, size=[len(hard_idx), 2])
      generators[split] = self._generate_examples(
          easy_cells, hard_digits, easy_idx, hard_idx, easy_pos, hard_pos, offsets)
    return generators

  def _generate_examples(self, easy_cells: np.ndarray, hard_digits: np.ndarray,
                         easy_idx: np.ndarray, hard_idx: np.ndarray, easy_positions: np.ndarray,
                         hard_positions: np.ndarray, offsets: np.ndarray) -> Iterator:
    for key, (e, h, ep, hp, (dy, dx)) in enumerate(
        zip(easy_idx, hard_idx, easy_positions, hard_positions, offsets)):
      hard_cell = np.zeros([CELL_SIZE, CELL_SIZE], np.uint8)
      hard_cell[dy:dy + HARD_DIGIT_SIZE, dx:dx + HARD_DIGIT_SIZE] = hard_digits[h]
      yield key, {
          'image': np.concatenate([easy_cells[e], hard_cell], axis=0)[..., None],
          'easy_digit': int(ep),
          'hard_digit': int(hp),
          'easy_index': int(e),
          'hard_index': int(h),
      }

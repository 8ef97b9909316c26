"""TFDS builder ``digits_textures``: real digits (easy) above patches of real photographs (hard).

The embedded real-data study (issue 15, item 6): everything ships with pip packages, nothing is
downloaded. Every example is a 32x16x1 "domino":

* top half (``easy_digit``, the *easy* feature): a handwritten 0 or 1 from scikit-learn's 1,797
  real 8x8 digits (``sklearn.datasets.load_digits``), resized to 12x12 and placed at a random
  offset (0-4 pixels down and right) in the 16x16 cell: 25 placements per digit, so the ~144
  training digits give thousands of distinct easy halves;
* bottom half (``texture``, the *hard* feature): a 16x16 grey patch of a real photograph bundled
  with scikit-image, class 0 from ``grass``, class 1 from ``gravel``. Every patch is standardised
  (``128 + 32 (x - mean(x)) / std(x)``), so that neither brightness nor contrast reveals the
  photograph: only the texture's structure does. Three hand-made statistics of a patch (std,
  mean |dx|, mean |dy|) decode this pair with 13 % error on ``probe_test`` (the earlier pair,
  grass+gravel vs brick+moon with contrast kept, with 0.4 %); a linear probe on the raw pixels is
  at chance.

Disjoint regions: every photograph is cut into 64x64 tiles, and the tiles are dealt to the five
splits in the proportions of :data:`POOL_FRACTIONS` (random order, fixed seed). A split's patches
lie entirely inside its own tiles, so no pixel appears in two splits, while every split samples
the whole photograph (cutting the photographs into one strip per split instead made the probe
splits differ in lighting, and a probe fit on one strip failed on the next). Within a tile,
patches lie on a grid of stride :data:`PATCH_STRIDE` (overlapping, all distinct) and are drawn
without replacement: every hard half of a split is a different patch, thousands per split (the
digits-dominoes benchmark had 146 distinct hard images in training).

In ``train``, ``validation`` and ``test`` the two features are perfectly correlated (digit 0 with
texture class 0); in ``probe_train`` and ``probe_test`` all four combinations are equally
frequent.

==============  ==============================  ========
split           distribution                    examples
==============  ==============================  ========
``train``       correlated                      2,000
``validation``  correlated                      500
``test``        correlated                      1,000
``probe_train`` group-balanced (4 x 250)        1,000
``probe_test``  group-balanced (4 x 500)        2,000
==============  ==============================  ========

The construction is a pure function of :data:`CONSTRUCTION_SEED`
(:func:`make_splits`); the builder writes exactly those arrays.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from samjax.data.builders import composition
from samjax.data.builders import digits_dominoes
from samjax.data.builders.common import construction_rng

EASY_DIGITS = (0, 1)
# Two texture classes of similar roughness, told apart by their structure (blades vs grains).
# Chosen with cheap probes (docs/real_data.md): hand-made statistics 0.13 error, raw pixels 0.49,
# untrained width-16 conv features 0.40, the conv net trained on this label alone 0.08.
TEXTURE_CLASSES = (('grass',), ('gravel',))
CELL_SIZE = 16
DIGIT_SIZE = 12  # the digit's side inside its 16x16 cell; the rest is the room to move
PATCH_CONTRAST = 32.0  # std of every standardised patch (grey levels)
IMAGE_SHAPE = (2 * CELL_SIZE, CELL_SIZE, 1)
PATCH_STRIDE = 4
# Photographs are cut into square tiles of this side, each tile belonging to one split.
BLOCK_SIZE = 64

SPLITS = ('train', 'validation', 'test', 'probe_train', 'probe_test')
POOL_FRACTIONS = (0.4, 0.1, 0.1, 0.2, 0.2)
CORRELATED_PER_CLASS = {'train': 1000, 'validation': 250, 'test': 500}
BALANCED_PER_GROUP = {'probe_train': 250, 'probe_test': 500}


def load_photograph(name: str) -> np.ndarray:
  """A bundled photograph as grey float32 ``[H, W]`` in 0..255."""
  if name in ('china', 'flower'):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    sample = datasets.load_sample_images()
    index = [path.endswith(f'{name}.jpg') for path in sample.filenames].index(True)
    image = sample.images[index]
  else:
    import skimage.data  # pylint: disable=g-import-not-at-top
    image = getattr(skimage.data, name)()
  image = np.asarray(image, np.float32)
  if image.ndim == 3:  # ITU-R 601 luma, as PIL's 'L' mode
    image = image[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
  return image


def block_assignment(shape: tuple[int, int], rng: np.random.Generator,
                     fractions=POOL_FRACTIONS, block: int = BLOCK_SIZE) -> np.ndarray:
  """int ``[rows, cols]``: the split of every ``block x block`` tile of a photograph.

  Tiles are dealt to the splits in the proportions of ``fractions`` (rounded), in random order:
  every split sees every part of the photograph (no region shift between splits) and no pixel
  belongs to two splits.
  """
  rows, cols = shape[0] // block, shape[1] // block
  bounds = np.round(np.cumsum(fractions) * rows * cols).astype(int)
  labels = np.searchsorted(bounds, np.arange(rows * cols), side='right')
  return rng.permutation(labels).reshape(rows, cols)


def block_patches(image: np.ndarray, tiles: np.ndarray, split: int, size: int = CELL_SIZE,
                  stride: int = PATCH_STRIDE, block: int = BLOCK_SIZE) -> np.ndarray:
  """All ``size x size`` patches on a stride grid inside the tiles assigned to ``split``."""
  patches = []
  for r, c in zip(*np.nonzero(tiles == split)):
    tile = image[r * block:(r + 1) * block, c * block:(c + 1) * block]
    patches += [tile[y:y + size, x:x + size] for y in range(0, block - size + 1, stride)
                for x in range(0, block - size + 1, stride)]
  return np.stack(patches)


def quantise_patches(patches: np.ndarray) -> np.ndarray:
  """Per-patch standardised: ``128 + PATCH_CONTRAST (x - mean) / std`` (brightness and contrast
  hide the photograph)."""
  patches = np.asarray(patches, np.float64)
  centred = patches - patches.mean(axis=(1, 2), keepdims=True)
  scale = PATCH_CONTRAST / np.maximum(centred.std(axis=(1, 2), keepdims=True), 1e-6)
  return np.clip(np.round(128.0 + centred * scale), 0, 255).astype(np.uint8)


def place_digits(digits: np.ndarray, rng: np.random.Generator, size: int = CELL_SIZE
                 ) -> np.ndarray:
  """``uint8 [N, size, size]``: each ``[N, d, d]`` digit at a uniform random offset in its cell."""
  room = size - digits.shape[1] + 1
  offsets = rng.integers(0, room, size=(len(digits), 2))
  cells = np.zeros((len(digits), size, size), np.uint8)
  for cell, digit, (y, x) in zip(cells, digits, offsets):
    cell[y:y + digits.shape[1], x:x + digits.shape[2]] = digit
  return cells


def texture_pools() -> list[dict[int, np.ndarray]]:
  """Per split, ``{texture class: uint8 [n, 16, 16] patches}`` from that split's tiles."""
  pools = [dict() for _ in SPLITS]
  for label, names in enumerate(TEXTURE_CLASSES):
    per_split = [[] for _ in SPLITS]
    for name in names:
      image = load_photograph(name)
      tiles = block_assignment(image.shape, construction_rng('digits_textures', 'tiles', name))
      for i in range(len(SPLITS)):
        per_split[i].append(block_patches(image, tiles, i))
    for i, chunks in enumerate(per_split):
      pools[i][label] = quantise_patches(np.concatenate(chunks))
  return pools


def make_splits() -> dict[str, dict[str, np.ndarray]]:
  """The five splits: ``{split: {'image', 'easy_digit', 'texture', 'easy_index'}}``.

  ``image`` is uint8 ``[N, 32, 16, 1]``; the labels are int64 positions (0/1); ``easy_index``
  is the digit's position in ``load_digits()``. Deterministic.
  """
  digits, labels = digits_dominoes.load_sklearn_digits()
  easy_digits = digits_dominoes.resize_digits(digits, DIGIT_SIZE)
  easy_pools = composition.split_class_pools(
      labels, EASY_DIGITS, POOL_FRACTIONS, construction_rng('digits_textures', 'easy_pools'))
  patches = texture_pools()
  splits = {}
  for split, easy_pool, patch_pool in zip(SPLITS, easy_pools, patches):
    rng = construction_rng('digits_textures', split)
    # Texture patches are indexed within their class's pool of this split.
    hard_pool = {k: np.arange(len(v)) for k, v in patch_pool.items()}
    if split in CORRELATED_PER_CLASS:
      num = CORRELATED_PER_CLASS[split]
      easy_idx, hard_idx, positions = composition.correlated_pairs(
          easy_pool, {k: rng.permutation(v)[:num] for k, v in hard_pool.items()}, rng, num)
      easy_pos = hard_pos = positions
    else:
      num = BALANCED_PER_GROUP[split]
      need = num * len(EASY_DIGITS)  # every patch used once: chunks of the permuted pool
      easy_idx, hard_idx, easy_pos, hard_pos = composition.balanced_pairs(
          easy_pool, {k: rng.permutation(v)[:need] for k, v in hard_pool.items()}, rng, num)
    hard_cells = np.stack([patch_pool[int(k)][int(i)] for k, i in zip(hard_pos, hard_idx)])
    easy_cells = place_digits(easy_digits[easy_idx], construction_rng('digits_textures', split,
                                                                      'placement'))
    images = np.concatenate([easy_cells, hard_cells], axis=1)[..., None]
    splits[split] = {'image': images, 'easy_digit': easy_pos.astype(np.int64),
                     'texture': hard_pos.astype(np.int64), 'easy_index': easy_idx}
  return splits


class DigitsTextures(tfds.core.GeneratorBasedBuilder):
  """Real digits (0/1, easy) above 16x16 patches of real photographs (grass vs gravel)."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '2.0.0': 'Issue 22: grass vs gravel, standardised patches; digits placed at '
                            'random offsets.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE),
            'easy_digit': tfds.features.ClassLabel(names=[str(d) for d in EASY_DIGITS]),
            'texture': tfds.features.ClassLabel(names=['+'.join(n) for n in TEXTURE_CLASSES]),
            'easy_index': tfds.features.Scalar(np.int64),
        }),
        supervised_keys=None,
        homepage='https://scikit-image.org/docs/stable/api/skimage.data.html',
        description=__doc__,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything ships with scikit-learn and scikit-image.
    splits = make_splits()
    return {name: self._generate_examples(arrays) for name, arrays in splits.items()}

  def _generate_examples(self, arrays: dict[str, np.ndarray]) -> Iterator:
    for key in range(len(arrays['image'])):
      yield key, {name: values[key] for name, values in arrays.items()}

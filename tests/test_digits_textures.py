"""The embedded digits_textures data set: disjoint tiles, distinct patches, correlated/balanced."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from samjax.data.builders import digits_textures


@pytest.fixture(scope='module')
def splits():
  return digits_textures.make_splits()


def test_shapes_sizes_and_feature_structure(splits):
  for name, arrays in splits.items():
    assert arrays['image'].dtype == np.uint8 and arrays['image'].shape[1:] == (32, 16, 1)
    easy, hard = arrays['easy_digit'], arrays['texture']
    counts = np.bincount(2 * easy + hard, minlength=4)
    if name in digits_textures.CORRELATED_PER_CLASS:
      assert np.array_equal(easy, hard)  # perfectly correlated
      assert counts[0] == counts[3] == digits_textures.CORRELATED_PER_CLASS[name]
    else:
      assert np.all(counts == digits_textures.BALANCED_PER_GROUP[name])  # independent
  assert len(splits['train']['image']) == 2000


def test_hard_halves_are_distinct_patches_within_a_split(splits):
  for arrays in splits.values():
    bottoms = arrays['image'][:, 16:].reshape(len(arrays['image']), -1)
    assert len(np.unique(bottoms, axis=0)) == len(bottoms)
  assert len(splits['train']['image']) >= 2000  # thousands of distinct hard patches


def test_tiles_partition_every_photograph_into_the_splits():
  rng = np.random.default_rng(0)
  tiles = digits_textures.block_assignment((512, 512), rng)
  counts = np.bincount(tiles.ravel(), minlength=5) / tiles.size
  np.testing.assert_allclose(counts, digits_textures.POOL_FRACTIONS, atol=1 / tiles.size)
  # Patches of one split come from its tiles only: mark the pixels each split's patches cover.
  image = np.arange(512 * 512, dtype=np.float64).reshape(512, 512)
  seen = []
  for split in range(5):
    pixels = set(np.unique(digits_textures.block_patches(image, tiles, split)).tolist())
    seen.append(pixels)
  for a in range(5):
    for b in range(a + 1, 5):
      assert not seen[a] & seen[b]


def test_patches_are_mean_free_so_brightness_does_not_tell_the_photograph(splits):
  bottoms = splits['probe_test']['image'][:, 16:, :, 0].astype(np.float64)
  assert np.all(np.abs(bottoms.mean(axis=(1, 2)) - 128) < 3)  # rounding and clipping only


@pytest.mark.slow
def test_tfds_builder_writes_make_splits(tmp_path, splits):
  builder = digits_textures.DigitsTextures(data_dir=str(tmp_path))
  builder.download_and_prepare()
  def rows(arrays):  # TFDS stores examples in the order of its key hash: compare as sets
    table = np.concatenate([arrays['image'].reshape(len(arrays['image']), -1).astype(np.int64)]
                           + [arrays[k][:, None] for k in ('easy_digit', 'texture', 'easy_index')],
                           axis=1)
    return table[np.lexsort(table.T[::-1])]

  for name in ('train', 'probe_test'):
    read = tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1, shuffle_files=False))
    np.testing.assert_array_equal(rows(read), rows(splits[name]))

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


def test_patches_are_standardised_so_brightness_and_contrast_do_not_tell_the_photograph(splits):
  bottoms = splits['probe_test']['image'][:, 16:, :, 0].astype(np.float64)
  assert np.all(np.abs(bottoms.mean(axis=(1, 2)) - 128) < 3)  # rounding and clipping only
  contrast = bottoms.std(axis=(1, 2))
  # Rounding moves the std a little (most by < 0.1); clipping at 0/255 lowers it for the few
  # patches with a pixel beyond 4 standard deviations.
  assert np.mean(np.abs(contrast - digits_textures.PATCH_CONTRAST) < 0.1) > 0.95
  assert np.all(contrast <= digits_textures.PATCH_CONTRAST + 0.5)
  # Per class, the contrast is the same (it told the old pair apart).
  texture = splits['probe_test']['texture']
  assert abs(contrast[texture == 0].mean() - contrast[texture == 1].mean()) < 0.5


def test_quantise_patches_is_the_closed_form():
  patch = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
  expected = 128 + digits_textures.PATCH_CONTRAST * (patch - 7.5) / patch.std()
  np.testing.assert_array_equal(digits_textures.quantise_patches(patch),
                                np.clip(np.round(expected), 0, 255).astype(np.uint8))


def test_digits_are_placed_whole_at_offsets_inside_the_cell():
  digits = np.full((200, 12, 12), 255, np.uint8)
  cells = digits_textures.place_digits(digits, np.random.default_rng(0))
  assert cells.shape == (200, 16, 16)
  assert np.all((cells > 0).sum(axis=(1, 2)) == 144)  # nothing cropped
  corners = {tuple(np.argwhere(c)[0]) for c in cells}
  assert corners == {(y, x) for y in range(5) for x in range(5)}  # all 25 offsets used


def test_easy_halves_are_mostly_distinct(splits):
  tops = splits['train']['image'][:, :16].reshape(2000, -1)
  digits = np.unique(splits['train']['easy_index'])
  assert len(np.unique(tops, axis=0)) > 5 * len(digits)  # placement multiplies the ~144 digits


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

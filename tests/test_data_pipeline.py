"""Tests of the in-memory side of samjax.data: splits, subsets, batches, config validation.

No TFDS building here: every dataset is synthetic and made in memory.
"""

import jax
import numpy as np
import pytest

from samjax import config as config_lib
from samjax.data import dataset as dataset_lib
from samjax.data import input as input_lib
from samjax.data import load as load_lib
from samjax.data.builders import composition
from samjax.data.dataset import FeatureDataset
from samjax.data.dataset import Split


def make_split(num_examples, image_shape=(8, 6, 3), num_classes=2, num_attributes=3, seed=0):
  rng = np.random.default_rng(seed)
  return Split(
      images=rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8),
      labels=rng.integers(0, num_classes, num_examples).astype(np.int32),
      attributes=rng.integers(0, num_attributes, num_examples).astype(np.int32),
      num_classes=num_classes, num_attributes=num_attributes)


def make_dataset(train):
  other = make_split(12, train.images.shape[1:], train.num_classes, train.num_attributes, seed=1)
  mean, std = dataset_lib.normalization_constants('mean_pixel', train.images)
  return FeatureDataset(
      name='synthetic', train=train, val=other, test=other, probe_train=other, probe_test=other,
      num_classes=train.num_classes, num_attributes=train.num_attributes, label_feature='a',
      attribute_feature='b', easy_feature='label', mean=mean, std=std)


@pytest.fixture(name='dataset')
def fixture_dataset():
  return make_dataset(make_split(103))


# ----------------------------------------------------------------------------------------------
# Split and FeatureDataset.


def test_split_groups_and_counts():
  split = make_split(50)
  np.testing.assert_array_equal(split.groups, split.labels * 3 + split.attributes)
  counts = split.group_counts()
  assert counts.shape == (6,) and counts.sum() == 50


def test_split_rejects_wrong_dtypes():
  split = make_split(5)
  with pytest.raises(ValueError, match='labels'):
    Split(split.images, split.labels.astype(np.int64), split.attributes, 2, 3)
  with pytest.raises(ValueError, match='images'):
    Split(split.images.astype(np.float32), split.labels, split.attributes, 2, 3)


def test_normalize_uses_mean_and_std(dataset):
  images = dataset.train.images[:4]
  expected = (images.astype(np.float64) - dataset.mean) / dataset.std
  np.testing.assert_allclose(dataset.normalize(images), expected, rtol=1e-5, atol=1e-5)
  assert dataset.normalize(images).dtype == np.float32


def test_mean_pixel_constants_match_numpy():
  images = make_split(40).images
  mean, std = dataset_lib.normalization_constants('mean_pixel', images, chunk_size=7)
  pixels = images.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-5)
  mean, std = dataset_lib.normalization_constants('none', images)
  np.testing.assert_array_equal(mean, 0.0)
  np.testing.assert_array_equal(std, 255.0)
  with pytest.raises(ValueError, match='RGB'):
    dataset_lib.normalization_constants('imagenet', images[..., :1])


# ----------------------------------------------------------------------------------------------
# Deterministic subsets.


def test_group_balanced_subset():
  split = make_split(300)
  subset = load_lib.group_balanced_subset(split, np.random.default_rng(0))
  counts = subset.group_counts()
  assert np.all(counts == split.group_counts().min())
  capped = load_lib.group_balanced_subset(split, np.random.default_rng(0), max_per_group=5)
  assert np.all(capped.group_counts() == 5)
  again = load_lib.group_balanced_subset(split, np.random.default_rng(0), max_per_group=5)
  np.testing.assert_array_equal(capped.images, again.images)


def test_group_balanced_subset_cap_only_keeps_imbalance():
  split = make_split(300)
  capped = load_lib.group_balanced_subset(
      split, np.random.default_rng(0), max_per_group=45, balance=False)
  np.testing.assert_array_equal(capped.group_counts(), np.minimum(split.group_counts(), 45))


def test_group_balanced_subset_raises_on_empty_group():
  split = make_split(30)
  split = split.take(np.flatnonzero(split.groups != 0))
  with pytest.raises(ValueError, match='empty'):
    load_lib.group_balanced_subset(split, np.random.default_rng(0))


def test_holdout_split_is_a_deterministic_partition():
  split = make_split(50)
  split = Split(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1), split.labels,
                split.attributes, 2, 3)
  rest, held_out = load_lib.holdout_split(split, 0.1, np.random.default_rng(3))
  assert len(held_out) == 5 and len(rest) == 45
  ids = np.concatenate([rest.images.ravel(), held_out.images.ravel()])
  np.testing.assert_array_equal(np.sort(ids), np.arange(50))
  _, again = load_lib.holdout_split(split, 0.1, np.random.default_rng(3))
  np.testing.assert_array_equal(held_out.images, again.images)


# ----------------------------------------------------------------------------------------------
# Stacked-pair recipes.


def test_correlated_pairs_use_every_image_once():
  rng = np.random.default_rng(0)
  top_labels = rng.integers(0, 2, 100)
  bottom_labels = rng.integers(0, 2, 80)
  top_pools, = composition.split_class_pools(top_labels, (0, 1), [1.0], rng)
  bottom_pools, = composition.split_class_pools(bottom_labels, (0, 1), [1.0], rng)
  top, bottom, classes = composition.correlated_pairs(top_pools, bottom_pools, rng)
  np.testing.assert_array_equal(top_labels[top], classes)
  np.testing.assert_array_equal(bottom_labels[bottom], classes)
  assert len(np.unique(top)) == len(top) and len(np.unique(bottom)) == len(bottom)
  assert len(top) == sum(min((top_labels == k).sum(), (bottom_labels == k).sum()) for k in (0, 1))


def test_balanced_pairs_are_balanced_and_disjoint_across_groups():
  rng = np.random.default_rng(0)
  top_labels = rng.integers(0, 5, 400)
  bottom_labels = rng.integers(0, 3, 300)
  top_pools, = composition.split_class_pools(top_labels, range(5), [1.0], rng)
  bottom_pools, = composition.split_class_pools(bottom_labels, range(3), [1.0], rng)
  top, bottom, top_class, bottom_class = composition.balanced_pairs(top_pools, bottom_pools, rng)
  np.testing.assert_array_equal(top_labels[top], top_class)
  np.testing.assert_array_equal(bottom_labels[bottom], bottom_class)
  counts = np.bincount(top_class * 3 + bottom_class, minlength=15)
  assert counts.min() == counts.max() > 0
  assert len(np.unique(top)) == len(top) and len(np.unique(bottom)) == len(bottom)
  # With a larger count images are re-used, but each stays in one group.
  top, _, top_class, bottom_class = composition.balanced_pairs(top_pools, bottom_pools, rng, 40)
  assert np.all(np.bincount(top_class * 3 + bottom_class) == 40)
  group_of_image = {}
  for image, group in zip(top, top_class * 3 + bottom_class):
    assert group_of_image.setdefault(image, group) == group


def test_split_class_pools_partition_each_class():
  labels = np.repeat(np.arange(3), 20)
  pools = composition.split_class_pools(labels, (0, 2), [0.5, 0.3, 0.2],
                                        np.random.default_rng(0))
  for k in (0, 2):
    members = np.concatenate([p[k] for p in pools])
    np.testing.assert_array_equal(np.sort(members), np.flatnonzero(labels == k))
  assert [len(p[0]) for p in pools] == [10, 6, 4]
  assert 1 not in pools[0]


# ----------------------------------------------------------------------------------------------
# TrainBatches.


def test_same_seed_and_step_give_the_same_batch(dataset):
  first = input_lib.TrainBatches(dataset.train, dataset, 10, seed=7, augment=True)
  second = input_lib.TrainBatches(dataset.train, dataset, 10, seed=7, augment=True)
  for step in (0, 3, 25, 11):  # Out of order, across epochs: a resumed run sees the same data.
    a, b = first.batch_at(step), second.batch_at(step)
    for key in ('image', 'label', 'attribute'):
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = input_lib.TrainBatches(dataset.train, dataset, 10, seed=8, augment=True)
  assert not np.array_equal(other_seed.global_indices(0), first.global_indices(0))


@pytest.mark.parametrize('num_workers', [0, 4])
def test_prefetching_iterator_equals_batch_at(dataset, num_workers):
  batches = input_lib.TrainBatches(dataset.train, dataset, 10, seed=3, augment=True)
  reference = input_lib.TrainBatches(dataset.train, dataset, 10, seed=3, augment=True)
  iterator = batches.iterate(start_step=5, num_workers=num_workers)
  for step in range(5, 125):  # 12 epoch boundaries, crossed by threads sharing one cache
    got, want = next(iterator), reference.batch_at(step)
    for key in ('image', 'label', 'attribute'):
      np.testing.assert_array_equal(got[key], want[key])
  iterator.close()


def test_epoch_visits_every_example_once():
  split = make_split(100)
  batches = input_lib.TrainBatches(split, make_dataset(split), 10, seed=0, augment=False)
  assert batches.steps_per_epoch == 10
  for epoch in range(2):
    visited = np.concatenate([batches.global_indices(epoch * 10 + s) for s in range(10)])
    np.testing.assert_array_equal(np.sort(visited), np.arange(100))
  assert not np.array_equal(batches.global_indices(0), batches.global_indices(10))


def test_remainder_is_dropped(dataset):
  batches = input_lib.TrainBatches(dataset.train, dataset, 10, seed=0, augment=False)
  assert batches.steps_per_epoch == 10
  visited = np.concatenate([batches.global_indices(s) for s in range(10)])
  assert len(np.unique(visited)) == 100


def test_batch_contents_match_the_indices(dataset):
  batches = input_lib.TrainBatches(dataset.train, dataset, 10, seed=1, augment=False)
  batch = batches.batch_at(4)
  indices = batches.global_indices(4)
  np.testing.assert_allclose(batch['image'], dataset.normalize(dataset.train.images[indices]))
  np.testing.assert_array_equal(batch['label'], dataset.train.labels[indices])
  np.testing.assert_array_equal(batch['attribute'], dataset.train.attributes[indices])
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32


@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards_concatenate_to_the_global_batch(dataset, augment, process_count):
  single = input_lib.TrainBatches(dataset.train, dataset, 20, seed=3, augment=augment)
  shards = [input_lib.TrainBatches(dataset.train, dataset, 20, seed=3, augment=augment,
                                  process_index=i, process_count=process_count)
            for i in range(process_count)]
  for step in (0, 6):
    whole = single.batch_at(step)
    parts = [shard.batch_at(step) for shard in shards]
    assert parts[0]['image'].shape[0] == 20 // process_count
    for key in ('image', 'label', 'attribute'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_augmentation_is_deterministic_and_changes_images(dataset):
  batches = input_lib.TrainBatches(dataset.train, dataset, 10, seed=0, augment=True)
  plain = input_lib.TrainBatches(dataset.train, dataset, 10, seed=0, augment=False)
  np.testing.assert_array_equal(batches.batch_at(2)['image'], batches.batch_at(2)['image'])
  assert batches.batch_at(2)['image'].shape == plain.batch_at(2)['image'].shape
  assert not np.array_equal(batches.batch_at(2)['image'], plain.batch_at(2)['image'])
  np.testing.assert_array_equal(batches.batch_at(2)['label'], plain.batch_at(2)['label'])


def test_random_crop_and_flip():
  images = np.arange(2 * 4 * 5 * 1, dtype=np.uint8).reshape(2, 4, 5, 1) + 1
  centred = np.full([2, 2], 2)
  np.testing.assert_array_equal(
      input_lib.random_crop_and_flip(images, centred, np.array([False, False]), 2), images)
  np.testing.assert_array_equal(
      input_lib.random_crop_and_flip(images, centred, np.array([True, False]), 2)[0],
      images[0, :, ::-1])
  shifted = input_lib.random_crop_and_flip(images, np.zeros([2, 2], int), np.zeros(2, bool), 2)
  np.testing.assert_array_equal(shifted[:, 2:, 2:], images[:, :2, :3])
  assert np.all(shifted[:, :2] == 0) and np.all(shifted[:, :, :2] == 0)


def test_random_crop_and_flip_matches_pad_then_crop():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (16, 7, 9, 2), dtype=np.uint8)
  padding = 3
  offsets = rng.integers(0, 2 * padding + 1, (16, 2))
  flips = rng.random(16) < 0.5
  padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  expected = np.stack([
      padded[i, y:y + 7, x:x + 9][:, ::-1 if f else 1]
      for i, ((y, x), f) in enumerate(zip(offsets, flips))])
  np.testing.assert_array_equal(
      input_lib.random_crop_and_flip(images, offsets, flips, padding), expected)


@pytest.mark.parametrize('image_shape, padding', [((7, 9, 2), 3), ((8, 6, 3), 1), ((32, 16, 1), 2)])
def test_crop_and_flip_on_device_equals_numpy(image_shape, padding):
  rng = np.random.default_rng(sum(image_shape))
  n = 64
  images = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
  offsets = rng.integers(0, 2 * padding + 1, (n, 2))
  offsets[:4] = [[0, 0], [2 * padding, 2 * padding], [0, 2 * padding], [2 * padding, 0]]
  flips = rng.random(n) < 0.5
  flips[:4] = [True, False, False, True]
  on_device = jax.jit(input_lib.crop_and_flip_on_device, static_argnums=3)(
      images, offsets.astype(np.int32), flips, padding)
  assert on_device.dtype == np.uint8
  np.testing.assert_array_equal(
      np.asarray(on_device), input_lib.random_crop_and_flip(images, offsets, flips, padding))


@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('process_count', [1, 2])
def test_device_inputs_gathered_on_device_equal_the_host_batch(dataset, augment, process_count):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  resident = input_lib.resident_split(dataset.train, mesh)
  gather = jax.jit(input_lib.gather_batch)
  shards = [input_lib.TrainBatches(dataset.train, dataset, 20, seed=5, augment=augment,
                                   process_index=i, process_count=process_count, normalize=False)
            for i in range(process_count)]
  for step in (0, 7):  # 7: the second epoch
    for shard in shards:
      inputs = shard.device_inputs(step)
      assert inputs['index'].dtype == np.int32 and ('offset' in inputs) == augment
      got, want = gather(resident, inputs), shard.batch_at(step)
      for key in ('image', 'label', 'attribute'):
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(np.asarray(got[key]), want[key])


def test_resident_split_is_replicated_on_every_device(dataset):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  resident = input_lib.resident_split(dataset.train, mesh)
  assert resident['image'].sharding.is_fully_replicated
  assert len(resident['image'].addressable_shards) == len(jax.devices())
  for shard in resident['image'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), dataset.train.images)
  np.testing.assert_array_equal(np.asarray(resident['label']), dataset.train.labels)
  np.testing.assert_array_equal(np.asarray(resident['attribute']), dataset.train.attributes)
  assert input_lib.example_nbytes(dataset.train) == 8 * 6 * 3 + 4 + 4


def test_choose_placement():
  mib = 2**20
  choose = input_lib.choose_placement
  # 2 MiB in 1024 examples of 2 KiB; the budget is inclusive.
  assert choose('auto', 1024, 2048, 2)[0] == 'replicated'
  assert choose('device', 1024, 2048, 2, num_devices=8)[0] == 'replicated'
  assert choose('auto', 1025, 2048, 2)[0] == 'host'  # one device: nothing to shard over
  # Sharded over 8 devices: ceil(1025 / 8) = 129 examples of 2 KiB per device.
  assert choose('auto', 1025, 2048, 129 * 2048 / mib, num_devices=8)[0] == 'sharded'
  assert choose('device', 1025, 2048, 129 * 2048 / mib, num_devices=8)[0] == 'sharded'
  assert choose('auto', 1025, 2048, 128 * 2048 / mib, num_devices=8)[0] == 'host'
  assert choose('host', 1, 1, 2048)[0] == 'host'
  assert choose('auto', 1, 1, 0)[0] == 'host'
  with pytest.raises(ValueError) as error:
    choose('device', 3 * 1024, 1024, 2, num_devices=1)
  message = str(error.value)
  assert message.startswith('config.data.placement: ') and '\n' not in message
  assert '3.0 MiB' in message and 'device_memory_budget_mb is 2;' in message
  with pytest.raises(ValueError, match='is not one of auto, device, host'):
    choose('gpu', 1, 1, 1)


@pytest.mark.parametrize('num_devices', [1, 3, 8])
def test_resident_split_sharded_holds_each_row_once_and_pads_with_zeros(dataset, num_devices):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))
  resident = input_lib.resident_split(dataset.train, mesh, 'sharded')
  n = len(dataset.train)  # 103: not a multiple of 3 or 8
  rows = -(-n // num_devices)
  for key, want in (('image', dataset.train.images), ('label', dataset.train.labels),
                    ('attribute', dataset.train.attributes)):
    array = resident[key]
    assert array.shape[0] == rows * num_devices and array.dtype == want.dtype
    for shard in array.addressable_shards:
      assert shard.data.shape[0] == rows
    np.testing.assert_array_equal(np.asarray(array)[:n], want)
    assert not np.asarray(array)[n:].any()


@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('num_devices', [2, 8])
def test_batches_from_a_sharded_split_equal_the_host_batch(dataset, augment, num_devices):
  """Written against jax.shard_map directly, not through the train step."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ('d',))
  resident = input_lib.resident_split(dataset.train, mesh, 'sharded')
  gather = jax.jit(jax.shard_map(
      lambda r, i: input_lib.gather_batch_from_shards(r, i, 'd'), mesh=mesh,
      in_specs=(P('d'), P('d')), out_specs=P('d')))
  batches = input_lib.TrainBatches(dataset.train, dataset, 24, seed=5, augment=augment,
                                   normalize=False)
  sharding = NamedSharding(mesh, P('d'))
  for step in (0, 4, 9):  # 4 steps per epoch: three epochs
    inputs = jax.device_put(batches.device_inputs(step), sharding)
    got, want = gather(resident, inputs), batches.batch_at(step)
    for key in ('image', 'label', 'attribute'):
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(np.asarray(got[key]), want[key])


def test_train_batches_validate_arguments(dataset):
  with pytest.raises(ValueError, match='multiple'):
    input_lib.TrainBatches(dataset.train, dataset, 10, 0, False, process_count=3)
  with pytest.raises(ValueError, match='exceeds'):
    input_lib.TrainBatches(dataset.train, dataset, 200, 0, False)
  with pytest.raises(ValueError, match='process_index'):
    input_lib.TrainBatches(dataset.train, dataset, 10, 0, False, process_index=2, process_count=2)


# ----------------------------------------------------------------------------------------------
# eval_batches.


def test_eval_batches_pad_the_last_batch():
  split = make_split(23)
  dataset = make_dataset(split)
  batches = list(input_lib.eval_batches(split, dataset, 10))
  assert [n for _, n in batches] == [10, 10, 3]
  assert all(b['image'].shape == (10, 8, 6, 3) for b, _ in batches)
  images = np.concatenate([b['image'][:n] for b, n in batches])
  np.testing.assert_allclose(images, dataset.normalize(split.images))
  labels = np.concatenate([b['label'][:n] for b, n in batches])
  np.testing.assert_array_equal(labels, split.labels)
  last, _ = batches[-1]
  np.testing.assert_allclose(last['image'][3:], dataset.normalize(np.zeros((7, 8, 6, 3), np.uint8)))
  assert np.all(last['label'][3:] == 0) and np.all(last['attribute'][3:] == 0)
  assert [n for _, n in input_lib.eval_batches(split, dataset, 23)] == [23]


# ----------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize('fields, message', [
    ({'name': 'imagenet'}, 'data.name'),
    ({'name': 'celeb_a', 'normalization': 'zca'}, 'data.normalization'),
    ({'name': 'celeb_a', 'image_size': 0}, 'data.image_size'),
    ({'name': 'celeb_a', 'val_fraction': 1.5}, 'data.val_fraction'),
    ({'name': 'celeb_a', 'augment': 'yes'}, 'data.augment'),
    ({'name': 'celeb_a', 'batch_size': 3}, 'batch_size'),
    ({'name': 'domainbed', 'domainbed_dataset': 'terra'}, 'data.domainbed_dataset'),
    ({'name': 'domainbed', 'held_out_domain': 'painting'}, 'art_painting'),
    ({'name': 'domainbed', 'domainbed_dataset': 'vlcs'}, 'caltech101'),
])
def test_bad_config_fields_raise_value_error(fields, message):
  with pytest.raises(ValueError, match=message):
    config_lib.data_config(fields)


def test_config_defaults_are_filled_in():
  config = config_lib.base_train_config().data
  config.name = 'domainbed'
  config.domainbed_dataset = 'office_home'
  config.held_out_domain = 'Real World'
  validated = config_lib.data_config(config)
  assert validated['val_fraction'] == 0.1 and validated['normalization'] == 'mean_pixel'

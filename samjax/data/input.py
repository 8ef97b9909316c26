"""The input pipeline: training batches as a pure function of ``(seed, step)``, evaluation batches.

:class:`TrainBatches` serves the training batch of any step (resuming at step ``s`` gives the
same batches); :meth:`TrainBatches.iterate` prefetches with threads; :func:`eval_batches`
iterates a split in fixed-shape batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Iterator, Sequence

import numpy as np

from samjax.data.dataset import FeatureDataset, Split


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

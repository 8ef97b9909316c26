"""The input pipeline: training batches as a pure function of ``(seed, step)``, evaluation batches.

:class:`TrainBatches` serves the training batch of any step (resuming at step ``s`` gives the
same batches); :meth:`TrainBatches.iterate` prefetches with threads; :func:`eval_batches`
iterates a split in fixed-shape batches.

Two placements of the training split (``config.data.placement``), which train bit-identically:

* host: :meth:`TrainBatches.batch_at` gathers, crops and flips each batch with numpy and the
  uint8 batch travels to the devices every step;
* device: :func:`resident_split` puts the uint8 split on the devices once, replicated on
  every device or, when it does not fit one device's budget, sharded over them; each step only
  :meth:`TrainBatches.device_inputs` travels (indices and crop/flip parameters, drawn by the
  same code as ``batch_at``'s) and :func:`gather_batch` (replicated) or
  :func:`gather_batch_from_shards` (sharded; jnp, inside the jitted step) makes the same uint8
  batch there. :func:`choose_placement` decides.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def crop_and_flip_on_device(images: jax.Array, offsets: jax.Array, flips: jax.Array,
                            padding: int) -> jax.Array:
  """:func:`random_crop_and_flip` in jnp (traceable), bit for bit the same uint8 result.

  Zero-pads every side by ``padding``, cuts ``H x W`` at ``offsets`` (row, column; in
  ``[0, 2 * padding]``, where ``lax.dynamic_slice`` never clamps) and mirrors where ``flips``.
  """
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  crops = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels)))(padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def _augment(images: jax.Array, inputs: dict[str, jax.Array]) -> jax.Array:
  if 'offset' not in inputs:
    return images
  padding = crop_padding(images.shape[1:])
  return crop_and_flip_on_device(images, inputs['offset'], inputs['flip'], padding)


def gather_batch(resident: dict[str, jax.Array], inputs: dict[str, jax.Array]) -> dict:
  """The uint8 batch of :meth:`TrainBatches.batch_at` (``normalize=False``), made with jnp.

  Args:
    resident: the split as :func:`resident_split` places it (replicated): ``{'image': uint8
      [N, H, W, C], 'label': int32 [N], 'attribute': int32 [N]}``.
    inputs: :meth:`TrainBatches.device_inputs`: ``{'index': int32 [B]}``, plus ``'offset'``
      int32 ``[B, 2]`` and ``'flip'`` bool ``[B]`` when augmenting.

  Returns:
    ``{'image': uint8 [B, H, W, C], 'label': int32 [B], 'attribute': int32 [B]}``.
  """
  # The indices come from a permutation of range(N): skipping the bounds handling is safe.
  batch = {k: v.at[inputs['index']].get(mode='promise_in_bounds') for k, v in resident.items()}
  return {**batch, 'image': _augment(batch['image'], inputs)}


def gather_batch_from_shards(resident_shard: dict[str, jax.Array], inputs: dict[str, jax.Array],
                             axis_name: str) -> dict:
  """:func:`gather_batch` on a split sharded over ``axis_name``; call inside ``shard_map``.

  The sampling is unchanged: the global batch is the one every other placement trains on.
  Device ``d`` of the ``D`` on the axis holds rows ``[d * R, (d + 1) * R)`` of the split
  (``R = ceil(N / D)``) and the ``d``-th ``B / D`` rows of the global batch are its own. Every
  device looks up the global batch's indices (an all-gather of ``B`` int32), takes the rows it
  holds and zeros elsewhere, and a reduce-scatter (``psum_scatter``) hands each device its own
  rows: exact, since every row is the sum of one device's row and zeros. Per step that moves
  about one global batch of uint8 between the devices; the crop and flip then use the device's
  own parameters.

  Args:
    resident_shard: this device's rows of :func:`resident_split` (``layout='sharded'``).
    inputs: this device's rows of :meth:`TrainBatches.device_inputs`.
    axis_name: the mesh axis the split and the batch are sharded over.

  Returns:
    This device's rows of the uint8 batch, as :func:`gather_batch`.
  """
  index = jax.lax.all_gather(inputs['index'], axis_name, tiled=True)
  rows = resident_shard['label'].shape[0]
  local = index - jax.lax.axis_index(axis_name) * rows
  held = (local >= 0) & (local < rows)
  local = jnp.where(held, local, 0)

  def own_rows(x):
    taken = x.at[local].get(mode='promise_in_bounds')
    taken = jnp.where(held.reshape(held.shape + (1,) * (x.ndim - 1)), taken, jnp.zeros_like(taken))
    return jax.lax.psum_scatter(taken, axis_name, scatter_dimension=0, tiled=True)

  batch = {k: own_rows(v) for k, v in resident_shard.items()}
  return {**batch, 'image': _augment(batch['image'], inputs)}


def example_nbytes(split: Split) -> int:
  """Bytes of one example as held in memory: uint8 image, int32 label and attribute."""
  return int(split.images[0].nbytes + split.labels.itemsize + split.attributes.itemsize)


def choose_placement(placement: str, num_examples: int, example_bytes: int, budget_mb: float,
                     num_devices: int = 1) -> tuple[str, str]:
  """``('replicated' | 'sharded' | 'host', why)`` for ``config.data.placement``.

  ``'auto'`` and ``'device'`` put the split on the devices: replicated on every device when it
  fits ``budget_mb`` MiB, else sharded over the ``num_devices`` devices when a shard
  (``ceil(N / D)`` examples) fits. Beyond that ``'auto'`` falls back to ``'host'`` and
  ``'device'`` is refused (``ValueError('config.data.placement: ...')``). The budget counts the
  resident split only; a step's own batch (and, sharded, one global batch of uint8 rows in
  flight) is the model's memory, as with any input.
  """
  if placement not in ('auto', 'device', 'host'):
    raise ValueError(f'config.data.placement: {placement!r} is not one of auto, device, host.')
  if placement == 'host':
    return 'host', 'data.placement is host'
  budget = budget_mb * 2**20
  whole = num_examples * example_bytes
  shard = -(-num_examples // num_devices) * example_bytes
  sizes = (f'the training split takes {whole / 2**20:.1f} MiB (uint8 images, labels, '
           f'attributes), {shard / 2**20:.1f} MiB per device sharded over {num_devices}, and '
           f'data.device_memory_budget_mb is {budget_mb:g}')
  if whole <= budget:
    return 'replicated', f'data.placement is {placement}; {sizes}'
  if num_devices > 1 and shard <= budget:
    return 'sharded', f'data.placement is {placement}; {sizes}'
  if placement == 'device':
    raise ValueError("config.data.placement: 'device' needs the training split, or its shard "
                     f'on each device, within the budget, but {sizes}; raise the budget, '
                     'use more devices, or use auto or host.')
  return 'host', f'data.placement is auto but {sizes}'


def _rows_of(array: np.ndarray, index: tuple, num_rows: int) -> np.ndarray:
  """``array`` zero-padded to ``num_rows`` rows, at ``index``, without copying the whole."""
  start, stop, _ = index[0].indices(num_rows)
  part = array[start:min(stop, len(array))][(slice(None), *index[1:])]
  missing = stop - max(start, len(array))
  if missing <= 0:
    return part
  return np.concatenate([part, np.zeros((missing, *part.shape[1:]), array.dtype)])


def resident_partition(layout: str, axis_name: str) -> P:
  """Where the resident split's rows live: ``P()`` when ``'replicated'``, ``P(axis_name)`` when
  ``'sharded'`` (the one place a layout name becomes a partitioning)."""
  if layout == 'replicated':
    return P()
  if layout == 'sharded':
    return P(axis_name)
  raise ValueError(f"layout must be 'replicated' or 'sharded', got {layout!r}")


def resident_split(split: Split, mesh: Mesh, layout: str = 'replicated') -> dict[str, jax.Array]:
  """The split on the devices of ``mesh`` (uint8 images, int32 labels, attributes).

  ``layout='replicated'``: every device holds the whole split (for :func:`gather_batch`).
  ``'sharded'``: the split, zero-padded to ``D * ceil(N / D)`` rows, is sharded over the mesh's
  first axis (for :func:`gather_batch_from_shards`; the padding is never indexed).

  Every process holds the whole split (every process loads it), so each one fills its own
  devices from its copy: correct with one process or several.
  """
  sharding = NamedSharding(mesh, resident_partition(layout, mesh.axis_names[0]))
  num_rows = len(split) if layout == 'replicated' else -(-len(split) // mesh.size) * mesh.size
  arrays = {'image': split.images, 'label': split.labels, 'attribute': split.attributes}
  return {k: jax.make_array_from_callback(
              (num_rows, *v.shape[1:]), sharding,
              lambda index, v=v: _rows_of(v, index, num_rows))
          for k, v in arrays.items()}


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

  def step_rows(self, step: int) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """This process's rows of step ``step``: what its batch is made from, on host or device.

    Returns:
      ``(indices, offsets, flips)``: int64 ``[B_local]`` split indices, int64 ``[B_local, 2]``
      crop corners in ``[0, 2 * padding]`` and bool ``[B_local]`` mirrors; ``offsets`` and
      ``flips`` are None without augmentation.
    """
    rows = slice(self.process_index * self.local_batch_size,
                 (self.process_index + 1) * self.local_batch_size)
    indices = self.global_indices(step)[rows]
    if not self.augment:
      return indices, None, None
    rng = np.random.default_rng(
        np.random.SeedSequence([self.seed, _AUGMENTATION_STREAM, int(step)]))
    offsets = rng.integers(0, 2 * self.padding + 1, size=[self.global_batch_size, 2])
    flips = rng.random(self.global_batch_size) < 0.5
    return indices, offsets[rows], flips[rows]

  def device_inputs(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of what a step on the resident split needs (:func:`gather_batch`).

    Returns:
      ``{'index': int32 [B_local]}``, plus ``'offset': int32 [B_local, 2], 'flip': bool
      [B_local]`` when augmenting.
    """
    indices, offsets, flips = self.step_rows(step)
    inputs = {'index': indices.astype(np.int32)}
    if offsets is not None:
      inputs.update(offset=offsets.astype(np.int32), flip=flips)
    return inputs

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of step ``step``'s global batch.

    Returns:
      ``{'image': float32 [B_local, H, W, C] normalised (uint8 as stored with
      ``normalize=False``), 'label': int32 [B_local], 'attribute': int32 [B_local]}``.
    """
    indices, offsets, flips = self.step_rows(step)
    images = self.split.images[indices]
    if offsets is not None:
      images = random_crop_and_flip(images, offsets, flips, self.padding)
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

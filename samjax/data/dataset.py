"""A data set with two labelled features, held in memory: :class:`Split`, :class:`FeatureDataset`.

Images are uint8; normalisation is ``x * scale - offset`` with :func:`scale_and_offset`, the one
arithmetic shared by the host (:meth:`FeatureDataset.normalize`) and the train step (on device).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from samjax.data.registry import NORMALIZATIONS

SPLIT_NAMES = ('train', 'val', 'test', 'probe_train', 'probe_test')
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def scale_and_offset(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``(1 / std, mean / std)``: ``(x - mean) / std == x * scale - offset``."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  scale = (1.0 / std).astype(np.float32)
  return scale, (mean * scale).astype(np.float32)



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
    scale, offset = scale_and_offset(self.mean, self.std)
    if images_uint8.shape[-1] > 1:
      # Broadcasting a length-3 channel vector is 13-16x slower in numpy than full-image
      # operands (the benchmark's pipeline section, experiments/bench/input.py); same values
      # bit for bit.
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



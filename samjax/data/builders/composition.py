"""Pure numpy recipes for datasets made of two images stacked on top of each other.

A *stacked* example shows an image from a ``top`` source above an image from a ``bottom`` source
(CIFAR-MNIST, FMNIST-MNIST, digits dominoes). Each half carries a class, and the two classes are
the example's two features. The recipes work on source indices only, so the same code serves the
TFDS builders (which then copy pixels) and the tests.

* :func:`split_class_pools` partitions every source class into disjoint pools (e.g. one pool for
  the correlated training split and one for the probe split), so that no source image appears in
  two splits.
* :func:`correlated_pairs` pairs top class ``k`` with bottom class ``k``: the two features are
  perfectly correlated (the training distribution).
* :func:`balanced_pairs` pairs every top class with every bottom class equally often: the two
  features are independent and every group ``(top class, bottom class)`` has the same count (the
  probe distribution).

All functions are deterministic given the ``numpy.random.Generator`` they receive.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

# Pools of source indices by class: {class value: int64 indices into the source split}.
ClassPools = Mapping[int, np.ndarray]


def split_class_pools(
    labels: np.ndarray,
    classes: Sequence[int],
    fractions: Sequence[float],
    rng: np.random.Generator,
) -> list[dict[int, np.ndarray]]:
  """Partitions the indices of every class into disjoint pools of the given fractions.

  Args:
    labels: int ``[N]``, the class of every source example.
    classes: the classes to keep; examples of other classes are dropped.
    fractions: the share of each pool, summing to 1. Pool boundaries are rounded per class.
    rng: randomness for the per-class shuffle.

  Returns:
    One ``{class: indices}`` dict per fraction. Within a class, pools are disjoint and cover all of
    that class's examples; indices inside a pool are in random order.
  """
  fractions = np.asarray(fractions, dtype=np.float64)
  if fractions.ndim != 1 or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
    raise ValueError(f'fractions must be non-negative and sum to 1, got {fractions.tolist()}')
  pools = [dict() for _ in fractions]
  cumulative = np.concatenate([[0.0], np.cumsum(fractions)])
  for value in classes:
    members = rng.permutation(np.flatnonzero(labels == value))
    bounds = np.round(cumulative * len(members)).astype(np.int64)
    for pool, start, stop in zip(pools, bounds[:-1], bounds[1:]):
      pool[int(value)] = members[start:stop]
  return pools


def cycled_draw(pool: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
  """Draws ``num`` items from ``pool`` using each item as evenly as possible.

  The result concatenates fresh permutations of ``pool`` until ``num`` items are drawn, so every
  item is used ``floor(num / len(pool))`` or one more times.
  """
  if num == 0:
    return np.zeros([0], dtype=np.int64)
  if len(pool) == 0:
    raise ValueError(f'cannot draw {num} items from an empty pool')
  repeats = -(-num // len(pool))
  return np.concatenate([rng.permutation(pool) for _ in range(repeats)])[:num].astype(np.int64)


def correlated_pairs(
    top_pools: ClassPools,
    bottom_pools: ClassPools,
    rng: np.random.Generator,
    pairs_per_class: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pairs the ``k``-th top class with the ``k``-th bottom class (perfect correlation).

  Classes are matched by their position in the (insertion-ordered) pools.

  Args:
    top_pools: ``{class: indices}`` of the top source.
    bottom_pools: ``{class: indices}`` of the bottom source, with as many classes.
    rng: randomness for the pairing.
    pairs_per_class: number of pairs per class. ``None`` uses every source image at most once:
      ``min(len(top pool), len(bottom pool))`` pairs per class. A larger number re-uses images
      (each as evenly as possible), pairing them with different partners.

  Returns:
    ``(top_indices, bottom_indices, class_positions)``, int64 arrays of equal length;
    ``class_positions`` is the shared class's position ``k`` in the pools.
  """
  if len(top_pools) != len(bottom_pools):
    raise ValueError(
        f'correlated pairs need as many top classes ({len(top_pools)}) as bottom classes '
        f'({len(bottom_pools)})')
  tops, bottoms, positions = [], [], []
  for position, (top_pool, bottom_pool) in enumerate(
      zip(top_pools.values(), bottom_pools.values())):
    num = min(len(top_pool), len(bottom_pool)) if pairs_per_class is None else pairs_per_class
    tops.append(cycled_draw(top_pool, num, rng))
    bottoms.append(cycled_draw(bottom_pool, num, rng))
    positions.append(np.full([num], position, dtype=np.int64))
  return np.concatenate(tops), np.concatenate(bottoms), np.concatenate(positions)


def balanced_pairs(
    top_pools: ClassPools,
    bottom_pools: ClassPools,
    rng: np.random.Generator,
    pairs_per_group: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Pairs every top class with every bottom class, the same number of times (independence).

  Each top class's pool is cut into one disjoint chunk per bottom class (and vice versa), so a
  source image belongs to exactly one group ``(top class, bottom class)``.

  Args:
    top_pools: ``{class: indices}`` of the top source (``A`` classes).
    bottom_pools: ``{class: indices}`` of the bottom source (``B`` classes).
    rng: randomness for the chunking and pairing.
    pairs_per_group: examples per group. ``None`` uses every source image at most once: the
      largest count that every chunk can supply. A larger number re-uses images within their
      group.

  Returns:
    ``(top_indices, bottom_indices, top_positions, bottom_positions)``: int64 arrays of length
    ``A * B * pairs_per_group``; the positions index the classes in the pools.
  """
  num_top, num_bottom = len(top_pools), len(bottom_pools)
  top_chunks = [np.array_split(rng.permutation(pool), num_bottom) for pool in top_pools.values()]
  bottom_chunks = [np.array_split(rng.permutation(pool), num_top)
                   for pool in bottom_pools.values()]
  if pairs_per_group is None:
    pairs_per_group = min(
        min(len(pool) for pool in top_pools.values()) // num_bottom,
        min(len(pool) for pool in bottom_pools.values()) // num_top)
  tops, bottoms, top_positions, bottom_positions = [], [], [], []
  for a in range(num_top):
    for b in range(num_bottom):
      tops.append(cycled_draw(top_chunks[a][b], pairs_per_group, rng))
      bottoms.append(cycled_draw(bottom_chunks[b][a], pairs_per_group, rng))
      top_positions.append(np.full([pairs_per_group], a, dtype=np.int64))
      bottom_positions.append(np.full([pairs_per_group], b, dtype=np.int64))
  return (np.concatenate(tops), np.concatenate(bottoms), np.concatenate(top_positions),
          np.concatenate(bottom_positions))

"""Helpers shared by the TFDS builders of samjax.data."""

from __future__ import annotations

import zlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# Seed of every builder's (fixed) construction: a built dataset depends on no training seed.
CONSTRUCTION_SEED = 0


def construction_rng(*tags: str) -> np.random.Generator:
  """A generator seeded by :data:`CONSTRUCTION_SEED` and string tags (one stream per purpose)."""
  return np.random.default_rng(
      np.random.SeedSequence([CONSTRUCTION_SEED, *(zlib.crc32(t.encode()) for t in tags)]))


def manual_dir_or_raise(dl_manager: tfds.download.DownloadManager,
                        instructions: str) -> epath.Path:
  """``dl_manager.manual_dir``, raising ValueError (not TFDS's AssertionError) if it is unusable.

  TFDS's message names the expected directory; ``instructions`` say what to put there.
  """
  try:
    return dl_manager.manual_dir
  except AssertionError as error:
    raise ValueError(f'{error}\n{instructions}') from None

"""Data sets with two labelled features: TFDS builders, loading into memory, the input pipeline.

* :mod:`samjax.data.builders`: the TFDS builders (importing it registers them with TFDS).
* :mod:`samjax.data.dataset`: :class:`Split`, :class:`FeatureDataset`, normalisation constants.
* :mod:`samjax.data.load`: :func:`load_dataset`, from a data config (schema: :mod:`samjax.config`).
* :mod:`samjax.data.input`: :class:`TrainBatches` (step-indexed) and :func:`eval_batches`.

The names below are imported on first use, so that ``samjax.data.dataset`` (numpy only) does not
pull in TensorFlow.
"""

import importlib

_EXPORTS = {
    'DATASET_NAMES': 'samjax.data.load',
    'FeatureDataset': 'samjax.data.dataset',
    'Split': 'samjax.data.dataset',
    'TrainBatches': 'samjax.data.input',
    'eval_batches': 'samjax.data.input',
    'group_balanced_subset': 'samjax.data.load',
    'load_dataset': 'samjax.data.load',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""Datasets with two labelled features (TFDS), in-memory splits and step-indexed batches.

See :mod:`samjax.data.pipeline` for the data config fields and the per-dataset choices.
Importing this package registers the TFDS builders ``digits_dominoes``, ``cifar_mnist``,
``fmnist_mnist``, ``waterbirds`` and ``domainbed``.
"""

from samjax.data.pipeline import DATASET_NAMES
from samjax.data.pipeline import default_data_config
from samjax.data.pipeline import eval_batches
from samjax.data.pipeline import FeatureDataset
from samjax.data.pipeline import group_balanced_subset
from samjax.data.pipeline import load_dataset
from samjax.data.pipeline import Split
from samjax.data.pipeline import TrainBatches
from samjax.data.pipeline import validate_data_config

__all__ = [
    'DATASET_NAMES',
    'FeatureDataset',
    'Split',
    'TrainBatches',
    'default_data_config',
    'eval_batches',
    'group_balanced_subset',
    'load_dataset',
    'validate_data_config',
]

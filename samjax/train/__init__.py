"""Real-data training, one module per concept.

* :mod:`~samjax.train.workdir`: the workdir's files, checks before writing, config.json, metrics.
* :mod:`~samjax.train.optim`: the optimizer chain a config describes.
* :mod:`~samjax.train.step`: the train state and the one jitted train step.
* :mod:`~samjax.train.loop`: :func:`train_and_evaluate`, the training loop.
* :mod:`~samjax.train.evaluate`: test and group errors, linear probes.
* :mod:`~samjax.train.checkpoint`: orbax checkpoints, restore with fallback.
"""

from samjax.train.evaluate import compute_features
from samjax.train.loop import DATA_SEED
from samjax.train.loop import load_run
from samjax.train.loop import train_and_evaluate
from samjax.train.loop import TrainingFault

__all__ = ['DATA_SEED', 'TrainingFault', 'compute_features', 'load_run',
           'train_and_evaluate']

"""Digits dominoes: real handwritten digits (scikit-learn) with an easy and a hard digit pair.

The real-data default that trains anywhere in minutes:
  python -m samjax.main --config=configs/digits_dominoes.py --workdir=runs/digits
"""

from samjax.config import base_train_config


def get_config(arg=None):
  """``arg``: optimizer name (sgd | sam | lsam | asam); default sam."""
  config = base_train_config()
  config.data.name = 'digits_dominoes'
  config.data.normalization = 'mean_pixel'
  config.model.name = 'convnet'
  config.optimizer.name = arg or 'sam'
  config.optimizer.rho = 0.05
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_epochs = 30
  config.checkpoint_every_steps = 200
  config.log_every_steps = 10
  return config

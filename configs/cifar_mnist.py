"""CIFAR-MNIST (binary): MNIST {0, 1} stacked with CIFAR-10 {airplane, automobile} (Appendix B).

Paper grid: lr {0.01, 0.05, 0.1} x rho {0, .01, .03, .05, .07, .1, .2}, batch 100, cosine,
momentum 0.9, no weight decay, mean-pixel normalisation, no augmentation, 20 epochs.
"""

from samjax.config import base_train_config


def get_config(arg=None):
  """``arg``: optimizer name (sgd | sam | lsam | asam); default sam."""
  config = base_train_config()
  config.data.name = 'cifar_mnist'
  config.data.normalization = 'mean_pixel'
  config.data.augment = False
  config.model.name = 'convnet'
  config.optimizer.name = arg or 'sam'
  config.optimizer.rho = 0.05
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.batch_size = 100
  config.num_epochs = 20
  return config

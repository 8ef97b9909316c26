"""Waterbirds: water vs land bird (label) with the background (attribute); ResNet-18.

Needs the manual download of `waterbird_complete95_forest2water2` (the tarball or its extracted
folder with metadata.csv) in data.manual_dir. Paper: ImageNet-pretrained ResNet-18, lr {5e-4, 1e-3,
5e-3, 1e-2} x rho {0, .01, .02, .05, .07}, batch 128, cosine, momentum 0.9, weight decay (value
lost; 1e-4 here), standard augmentation, down-scaled images (size lost; 112x112 here), 100 epochs.
Test error weights each group's error by its frequency in training.
"""

from samjax.config import base_train_config


def get_config(arg=None):
  """``arg``: optimizer name (sgd | sam | lsam | asam); default sam."""
  config = base_train_config()
  config.data.name = 'waterbirds'
  config.data.image_size = 112
  config.data.normalization = 'imagenet'
  config.data.augment = True
  config.model.name = 'resnet18'
  config.optimizer.name = arg or 'sam'
  config.optimizer.rho = 0.05
  config.optimizer.learning_rate = 0.001
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.batch_size = 128
  config.num_epochs = 100
  config.group_weighted_test_error = True
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  return config

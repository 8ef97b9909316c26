"""CelebA: blond vs dark hair (label) with gender (attribute, the hard feature); ResNet-18.

Paper: ImageNet-pretrained ResNet-18, lr {5e-4, 1e-3, 5e-3, 1e-2} x rho {0, .01, .02, .05, .07},
batch 128, cosine, momentum 0.9, weight decay (value lost; 1e-4 here), standard augmentation,
down-scaled images (size lost; 64x64 here), 20 epochs. Test error weights each group's error by
its frequency in training. Point model.init_checkpoint at a torchvision ResNet-18 state_dict
(.pth) or its .npz to start from pretrained weights.
"""

from samjax.config import base_train_config


def get_config(arg=None):
  """``arg``: optimizer name (sgd | sam | lsam | asam); default sam."""
  config = base_train_config()
  config.data.name = 'celeb_a'
  config.data.image_size = 64
  config.data.normalization = 'imagenet'
  config.data.augment = True
  config.model.name = 'resnet18'
  config.optimizer.name = arg or 'sam'
  config.optimizer.rho = 0.05
  config.optimizer.learning_rate = 0.005
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.batch_size = 128
  config.num_epochs = 20
  config.group_weighted_test_error = True
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  return config

"""The torchvision ResNet-18 converter: numerical equivalence with torch, and its error messages.

The reference is a ResNet-18 written here with torch.nn, with torchvision's module names (hence
its state_dict keys), so the test needs torch but not torchvision or downloaded weights.
"""

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samjax import models
from samjax.models import convert

import torch  # the test extra installs it
nn = torch.nn

TORCH_CLASSES = 10


class TorchBasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock."""

  def __init__(self, in_channels, channels, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class TorchResNet18(nn.Module):
  """torchvision.models.resnet18, same module names and state_dict keys."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    channels = 64
    for index, width in enumerate((64, 128, 256, 512), start=1):
      stride = 1 if index == 1 else 2
      setattr(self, f'layer{index}', nn.Sequential(
          TorchBasicBlock(channels, width, stride), TorchBasicBlock(width, width)))
      channels = width
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.fc(self.features(x))


def _randomised_torch_resnet18():
  """A ResNet-18 with random weights and random, non-trivial BatchNorm running statistics."""
  torch.manual_seed(0)
  model = TorchResNet18(TORCH_CLASSES)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
  return model


@pytest.fixture(scope='module')
def torch_resnet_and_file(tmp_path_factory):
  model = _randomised_torch_resnet18()
  path = tmp_path_factory.mktemp('weights') / 'resnet18.pth'
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope='module')
def flax_resnet():
  return models.create_model({'name': 'resnet18'}, TORCH_CLASSES)


def _template(num_classes, seed=0):
  """Stand-in for initialised variables (arrays of the right shapes) without compiling init."""
  model = models.create_model({'name': 'resnet18'}, num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _images():
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  return images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def test_eval_logits_and_features_match_torch(torch_resnet_and_file, flax_resnet):
  torch_model, path = torch_resnet_and_file
  variables = convert.load_pretrained(path, _template(TORCH_CLASSES))
  images, torch_images = _images()

  torch_model.eval()
  with torch.no_grad():
    torch_features = torch_model.features(torch_images).numpy()
    torch_logits = torch_model.fc(torch.from_numpy(torch_features)).numpy()
  logits, features = flax_resnet.apply(variables, images, train=False, return_features=True)

  scale = np.abs(torch_logits).max()
  assert scale > 0.1  # The comparison below is not vacuous.
  np.testing.assert_allclose(logits, torch_logits, atol=1e-4 * scale)
  np.testing.assert_allclose(features, torch_features, atol=1e-4 * np.abs(torch_features).max())


def test_train_step_batch_stats_match_torch(torch_resnet_and_file, flax_resnet):
  """One train-mode pass: torch's running-stat update (momentum 0.1, unbiased variance)."""
  torch_model, path = torch_resnet_and_file
  variables = convert.load_pretrained(path, _template(TORCH_CLASSES))
  images, torch_images = _images()

  torch_model = _randomised_torch_resnet18()  # Fresh copy: the fixture's stays untouched.
  torch_model.train()
  with torch.no_grad():
    torch_logits = torch_model(torch_images).numpy()
  logits, new_state = flax_resnet.apply(variables, images, train=True, mutable=['batch_stats'])

  np.testing.assert_allclose(logits, torch_logits, atol=1e-4 * np.abs(torch_logits).max())
  updated = {key: value.numpy() for key, value in torch_model.state_dict().items()}
  expected = convert.state_dict_to_variables(updated)['batch_stats']
  before = variables['batch_stats']
  for (path_, got), want, old in zip(
      jax.tree_util.tree_leaves_with_path(new_state['batch_stats']), jax.tree.leaves(expected),
      jax.tree.leaves(before)):
    assert not np.allclose(got, old), path_
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(path_))


def test_npz_route_gives_the_same_variables_without_torch(torch_resnet_and_file, tmp_path,
                                                          monkeypatch):
  _, path = torch_resnet_and_file
  npz_path = convert.save_npz_from_state_dict(path, tmp_path / 'resnet18')
  assert npz_path.endswith('.npz')
  template = _template(TORCH_CLASSES)
  from_torch = convert.load_pretrained(path, template)

  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
  from_npz = convert.load_pretrained(npz_path, template)
  jax.tree.map(np.testing.assert_array_equal, from_torch, from_npz)
  assert jax.tree.structure(from_torch) == jax.tree.structure(template)

  with pytest.raises(ImportError, match='pip install torch'):
    convert.load_pretrained(path, template)


def test_conversion_without_template_infers_resnet18(torch_resnet_and_file):
  torch_model, path = torch_resnet_and_file
  variables = convert.state_dict_to_variables(convert.load_state_dict(path))
  assert variables['params']['head']['kernel'].shape == (512, TORCH_CLASSES)
  np.testing.assert_array_equal(variables['params']['layer2_0']['downsample_conv']['kernel'],
                                torch_model.layer2[0].downsample[0].weight.detach().numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['layer3_1']['bn2']['var'],
                                torch_model.layer3[1].bn2.running_var.numpy())


def test_head_kept_when_class_count_differs(torch_resnet_and_file, caplog):
  torch_model, path = torch_resnet_and_file
  template = _template(num_classes=2)
  with caplog.at_level(logging.INFO):
    variables = convert.load_pretrained(path, template)
  jax.tree.map(np.testing.assert_array_equal, variables['params']['head'],
               template['params']['head'])
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                torch_model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  assert 'keeping the initialised head' in caplog.text

  with pytest.raises(ValueError, match=r'fc\.weight: got \(10, 512\), expected \(2, 512\)'):
    convert.load_pretrained(path, template, skip_head_if_shape_mismatch=False)


def _state_dict(torch_model):
  return {key: value.numpy().copy() for key, value in torch_model.state_dict().items()}


def test_missing_key_raises(torch_resnet_and_file):
  state_dict = _state_dict(torch_resnet_and_file[0])
  del state_dict['layer3.1.bn2.running_var']
  with pytest.raises(ValueError, match=r"missing keys: \['layer3\.1\.bn2\.running_var'\]"):
    convert.state_dict_to_variables(state_dict, _template(TORCH_CLASSES))


def test_wrong_shape_and_unexpected_key_raise(torch_resnet_and_file, tmp_path):
  state_dict = _state_dict(torch_resnet_and_file[0])
  state_dict['layer1.0.conv2.weight'] = np.zeros((64, 32, 3, 3), np.float32)
  state_dict['layer5.0.conv1.weight'] = np.zeros((1,), np.float32)
  npz_path = tmp_path / 'broken.npz'
  np.savez(npz_path, **state_dict)
  with pytest.raises(ValueError) as error:
    convert.load_pretrained(npz_path, _template(TORCH_CLASSES))
  message = str(error.value)
  assert 'layer1.0.conv2.weight: got (64, 32, 3, 3), expected (64, 64, 3, 3)' in message
  assert "unexpected keys: ['layer5.0.conv1.weight']" in message


def test_variables_without_batch_stats_raise(torch_resnet_and_file):
  _, path = torch_resnet_and_file
  params_only = {'params': _template(TORCH_CLASSES)['params']}
  with pytest.raises(ValueError, match='batch_stats'):
    convert.load_pretrained(path, params_only)

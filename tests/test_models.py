"""Tests for samjax.models: shapes, the common interface, BatchNorm state, and torch equivalence."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import samjax
from samjax import models
from samjax.models.layers import BatchNorm

NUM_CLASSES = 5


@pytest.fixture(scope='module')
def resnet_and_variables():
  model = models.create_model({'name': 'resnet18'}, NUM_CLASSES)
  variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  return model, variables


@pytest.fixture(scope='module')
def convnet_and_variables():
  model = models.create_model(ml_collections.ConfigDict({'name': 'convnet'}), NUM_CLASSES)
  variables = models.init_variables(model, jax.random.key(0), (1, 28, 36, 3))
  return model, variables


def test_convnet_output_shapes(convnet_and_variables):
  model, variables = convnet_and_variables
  images = jnp.ones((4, 28, 36, 3))
  logits = model.apply(variables, images, train=True)
  logits2, features = model.apply(variables, images, train=False, return_features=True)
  assert logits.shape == (4, NUM_CLASSES) and logits.dtype == jnp.float32
  # 28x36 -> 14x18 -> 7x9 -> 4x5 with torch's padding; 128 channels.
  assert features.shape == (4, 128 * 4 * 5)
  np.testing.assert_allclose(logits, logits2, rtol=1e-6)


def test_convnet_width():
  model = models.create_model({'name': 'convnet', 'width': 8}, 3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert shapes['params']['conv3']['kernel'].shape == (3, 3, 16, 32)
  assert shapes['params']['head']['kernel'].shape == (32 * 4 * 4, 3)


def test_resnet_output_shapes(resnet_and_variables):
  model, variables = resnet_and_variables
  logits, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_features=True), variables,
      jnp.zeros((3, 64, 48, 3)))
  assert logits.shape == (3, NUM_CLASSES) and features.shape == (3, 512)
  assert logits.dtype == features.dtype == jnp.float32
  assert set(variables) == {'params', 'batch_stats'}
  params = variables['params']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert 'downsample_conv' in params['layer2_0'] and 'downsample_conv' not in params['layer1_0']
  assert params['head']['kernel'].shape == (512, NUM_CLASSES)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  # torchvision resnet18 has 11,689,512 parameters with a 1000-class fc.
  assert num_params == 11_689_512 - 513 * 1000 + 513 * NUM_CLASSES


@pytest.mark.parametrize('fixture', ['convnet_and_variables', 'resnet_and_variables'])
def test_head_mask_selects_exactly_the_head(fixture, request):
  _, variables = request.getfixturevalue(fixture)
  mask = samjax.head_mask(variables['params'])
  selected = {
      tuple(k.key for k in path)
      for path, is_head in jax.tree_util.tree_leaves_with_path(mask) if is_head
  }
  assert selected == {('head', 'kernel'), ('head', 'bias')}


def test_batch_stats_update_in_train_mode_only(resnet_and_variables):
  model, variables = resnet_and_variables
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  _, train_state = model.apply(variables, images, train=True, mutable=['batch_stats'])
  _, eval_state = model.apply(variables, images, train=False, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         train_state['batch_stats'])
  assert all(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'],
               eval_state['batch_stats'])
  # Eval mode needs no mutable collection at all.
  model.apply(variables, images, train=False)


def test_batchnorm_matches_torch_batchnorm2d():
  import torch  # the test extra installs it
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(4, 5, 6, 7)).astype(np.float32)  # NHWC
  scale, bias = rng.uniform(0.5, 1.5, 7), rng.normal(size=7)
  mean, var = rng.normal(size=7), rng.uniform(0.5, 2.0, 7)

  torch_bn = torch.nn.BatchNorm2d(7)
  with torch.no_grad():
    for name, value in dict(weight=scale, bias=bias, running_mean=mean, running_var=var).items():
      getattr(torch_bn, name).copy_(torch.tensor(value, dtype=torch.float32))
  variables = {
      'params': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)},
      'batch_stats': {'mean': jnp.asarray(mean, jnp.float32), 'var': jnp.asarray(var, jnp.float32)},
  }
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  torch_bn.train()
  with torch.no_grad():
    y_torch = torch_bn(x_torch).numpy().transpose(0, 2, 3, 1)
  y, state = BatchNorm(use_running_average=False).apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_torch, atol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['mean'], torch_bn.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['var'], torch_bn.running_var.numpy(), rtol=1e-5)

  # Eval mode normalises with the running statistics just updated, in both.
  torch_bn.eval()
  with torch.no_grad():
    y_torch = torch_bn(x_torch).numpy().transpose(0, 2, 3, 1)
  y = BatchNorm(use_running_average=True).apply({**variables, **state}, x)
  np.testing.assert_allclose(y, y_torch, atol=1e-5)


def test_convnet_matches_torch(convnet_and_variables):
  import torch  # the test extra installs it
  nn = torch.nn
  model, variables = convnet_and_variables
  torch_model = nn.Sequential(
      nn.Conv2d(3, 32, kernel_size=5, stride=2, padding=2), nn.ReLU(),
      nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1), nn.ReLU(),
      nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1), nn.ReLU(),
      nn.Flatten(), nn.Linear(128 * 4 * 5, NUM_CLASSES))
  params = variables['params']
  with torch.no_grad():
    for index, layer in zip((1, 2, 3), (0, 2, 4)):
      kernel = np.asarray(params[f'conv{index}']['kernel'])
      torch_model[layer].weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
      torch_model[layer].bias.copy_(torch.from_numpy(np.array(params[f'conv{index}']['bias'])))
    torch_model[7].weight.copy_(torch.from_numpy(np.asarray(params['head']['kernel']).T.copy()))
    torch_model[7].bias.copy_(torch.from_numpy(np.array(params['head']['bias'])))

  images = np.random.default_rng(0).normal(size=(3, 28, 36, 3)).astype(np.float32)
  logits, features = model.apply(variables, images, return_features=True)
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_features = torch_model[:7](x).numpy()
    torch_logits = torch_model(x).numpy()
  np.testing.assert_allclose(features, torch_features, atol=1e-5)
  np.testing.assert_allclose(logits, torch_logits, atol=1e-5)


def test_convnet_init_matches_torch_default_scale(convnet_and_variables):
  _, variables = convnet_and_variables
  kernel = np.asarray(variables['params']['conv2']['kernel'])
  bound = 1 / np.sqrt(3 * 3 * 32)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.abs(np.asarray(variables['params']['conv2']['bias'])).max() <= bound


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(convnet_and_variables):
  _, variables = convnet_and_variables
  model = models.create_model({'name': 'convnet', 'dtype': 'bfloat16'}, NUM_CLASSES)
  bf16_variables = models.init_variables(model, jax.random.key(0), (1, 28, 36, 3))
  assert {x.dtype for x in jax.tree.leaves(bf16_variables)} == {jnp.dtype(jnp.float32)}

  images = jax.random.normal(jax.random.key(2), (2, 28, 36, 3))
  logits, features = model.apply(variables, images, return_features=True)
  assert logits.dtype == features.dtype == jnp.float32
  reference = models.create_model({'name': 'convnet'}, NUM_CLASSES).apply(variables, images)
  np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()))

  resnet = models.create_model({'name': 'resnet18', 'dtype': 'bfloat16'}, NUM_CLASSES)
  shapes = jax.eval_shape(lambda: resnet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  logits = jax.eval_shape(lambda v: resnet.apply(v, jnp.zeros((2, 32, 32, 3))), shapes)
  assert logits.dtype == jnp.float32


def test_unknown_model_name_raises():
  with pytest.raises(ValueError, match=r"model\.name 'vgg'.*convnet.*resnet18"):
    models.create_model({'name': 'vgg'}, 2)
  with pytest.raises(ValueError, match=r'model\.dtype'):
    models.create_model({'name': 'convnet', 'dtype': 'float16'}, 2)

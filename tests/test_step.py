"""The jitted, sharded train step: data-parallel equivalence and BatchNorm semantics."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import samjax
from samjax import diagnostics
from samjax.train import optim
from samjax.train import step as step_lib


class TinyNet(nn.Module):
  num_classes: int = 3
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    h = nn.Dense(8)(x.reshape(x.shape[0], -1))
    if self.use_bn:
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    h = nn.relu(h)
    logits = nn.Dense(self.num_classes, name='head')(h)
    return (logits, h) if return_features else logits


def opt_config(name='sam', rho=0.1, lr=0.1, momentum=0.9, schedule='constant'):
  return ml_collections.ConfigDict(dict(name=name, rho=rho, learning_rate=lr, momentum=momentum,
                                        weight_decay=1e-3, schedule=schedule, grad_clip_norm=0.0,
                                        adaptive_eta=0.01, head='head', nesterov=False))


def make_batch(seed=0, n=32):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
          'label': rng.integers(0, 3, size=n).astype(np.int32)}


def run_steps(model, config, devices, batches, perturbation='sync', log_diagnostics=False):
  mesh = step_lib.make_mesh(devices)
  tx, step = step_lib.make_train_step(model, mesh, step_lib.StepSpec(
      config, 10, perturbation=perturbation, log_diagnostics=log_diagnostics, donate=False))
  state = step_lib.create_train_state(model, tx, jax.random.key(0), batches[0]['image'][:1])
  metrics = None
  for b in batches:
    state, metrics = step(state, b)
  return state, metrics


@pytest.mark.parametrize('name', ['sgd', 'sam', 'lsam', 'asam'])
def test_sharded_step_equals_single_device_step(name):
  model = TinyNet()
  batches = [make_batch(s) for s in range(3)]
  single, m1 = run_steps(model, opt_config(name), jax.devices()[:1], batches)
  sharded, m8 = run_steps(model, opt_config(name), jax.devices()[:8], batches)
  # BatchNorm uses the global batch's statistics in the synced step, so the two must agree.
  for a, b in zip(jax.tree.leaves((single.params, single.batch_stats)),
                  jax.tree.leaves((sharded.params, sharded.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)


def test_one_sam_step_matches_hand_computation_and_keeps_clean_batch_stats():
  model = TinyNet()
  batch = make_batch(1)
  config = opt_config('sam', momentum=0.0)
  state, _ = run_steps(model, config, jax.devices()[:1], [batch])
  init = model.init(jax.random.key(0), jnp.asarray(batch['image'][:1]), train=False)
  params, stats = init['params'], init['batch_stats']

  def loss(p):
    logits, upd = model.apply({'params': p, 'batch_stats': stats}, batch['image'], train=True,
                              mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean(), upd

  (_, clean_updates), g = jax.value_and_grad(loss, has_aux=True)(params)
  phantom, _ = samjax.phantom_params(params, g, 0.1)
  (_, phantom_updates), g_phantom = jax.value_and_grad(loss, has_aux=True)(phantom)
  expected = jax.tree.map(lambda p, gp: p - 0.1 * (gp + 1e-3 * p), params, g_phantom)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Running statistics come from the clean pass at theta, not from the phantom pass.
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(clean_updates['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  differs = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.batch_stats),
                                                   jax.tree.leaves(phantom_updates['batch_stats']))]
  assert any(differs)


@pytest.mark.parametrize('name', ['sam', 'lsam'])
def test_per_device_perturbation_equals_its_closed_form(name):
  model = TinyNet()
  batch = make_batch(2, n=32)
  config = opt_config(name, momentum=0.0)
  state, metrics = run_steps(model, config, jax.devices()[:8], [batch], perturbation='per_device',
                             log_diagnostics=True)
  assert 0.0 <= float(metrics['gini_phantom']) <= 1.0
  init = model.init(jax.random.key(0), jnp.asarray(batch['image'][:1]), train=False)
  params, stats = init['params'], init['batch_stats']
  mask = samjax.head_mask(params) if name == 'lsam' else None

  def shard_loss(p, i):  # each device normalises with its own shard's batch statistics
    sl = slice(4 * i, 4 * i + 4)
    logits, upd = model.apply({'params': p, 'batch_stats': stats}, batch['image'][sl], train=True,
                              mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'][sl]).mean(), upd

  phantom_grads, new_stats = [], []
  for i in range(8):
    (_, upd), g = jax.value_and_grad(shard_loss, has_aux=True)(params, i)
    phantom, _ = samjax.phantom_params(params, g, 0.1, mask=mask)
    phantom_grads.append(jax.grad(lambda p: shard_loss(p, i)[0])(phantom))
    new_stats.append(upd['batch_stats'])
  mean = lambda trees: jax.tree.map(lambda *v: sum(v) / len(v), *trees)
  expected = jax.tree.map(lambda p, gp: p - 0.1 * (gp + 1e-3 * p), params, mean(phantom_grads))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(mean(new_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_metrics_report_schedule_norms_and_in_step_gini():
  model = TinyNet(use_bn=False)
  batch = make_batch(3)
  config = opt_config('sam', momentum=0.0, schedule='cosine')
  state, metrics = run_steps(model, config, jax.devices()[:8], [batch], log_diagnostics=True)
  assert set(metrics) >= {'loss', 'accuracy', 'learning_rate', 'grad_norm', 'sam_cosine',
                          'perturbation_norm', 'gini_real', 'gini_phantom'}
  np.testing.assert_allclose(metrics['learning_rate'], 0.1)  # cosine schedule at step 0
  np.testing.assert_allclose(metrics['perturbation_norm'], 0.1, rtol=1e-5)
  # The in-step Gini equals the offline computation on the same batch and parameters.
  init = model.init(jax.random.key(0), jnp.asarray(batch['image'][:1]), train=False)
  params = init['params']
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, batch['image']), batch['label']).mean()
  phantom, _ = samjax.phantom_params(params, jax.grad(loss)(params), 0.1)
  real_w = diagnostics.importance_weights(model.apply({'params': params}, batch['image']), batch['label'])
  phantom_w = diagnostics.importance_weights(model.apply({'params': phantom}, batch['image']), batch['label'])
  np.testing.assert_allclose(metrics['gini_real'], diagnostics.gini(real_w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['gini_phantom'], diagnostics.gini(phantom_w), rtol=1e-5, atol=1e-6)
  assert int(state.step) == 1


def test_unknown_optimizer_is_a_value_error():
  with pytest.raises(ValueError, match='optimizer.name'):
    optim.make_optimizer(opt_config('adamw'), 10)


def test_gradient_clipping_acts_on_the_applied_phantom_gradient():
  # f(w) = c/2 ||w||^2: g = c w; SAM's phantom w + rho g/|g|; applied gradient g' = c (w + e),
  # clipped to norm `clip`, then one SGD step. A clip before SAM would leave g' unclipped (SAM
  # normalises the ascent direction), so the update would be -lr c (w + e).
  c, rho, lr, clip = 3.0, 0.2, 0.1, 0.5
  config = opt_config('sam', rho=rho, lr=lr, momentum=0.0)
  config.weight_decay = 0.0
  config.grad_clip_norm = clip
  tx = optim.make_optimizer(config, 10)
  w = {'w': jnp.array([1.0, -2.0, 0.5])}
  grad_fn = lambda p: jax.tree.map(lambda x: c * x, p)
  updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
  g = c * np.array([1.0, -2.0, 0.5])
  phantom_grad = c * (np.array([1.0, -2.0, 0.5]) + rho * g / np.linalg.norm(g))
  assert np.linalg.norm(phantom_grad) > clip  # the clip is active
  expected = -lr * phantom_grad * clip / np.linalg.norm(phantom_grad)
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-6)
  parts, sam_index = optim.optimizer_parts(config, 10)
  assert sam_index == 0 and isinstance(parts[0].init(w), samjax.SamState)


def test_uint8_batches_normalised_in_the_step_equal_host_normalised_batches():
  model = TinyNet()
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, size=(32, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, size=32).astype(np.int32)
  mean, std = np.array([101.5], np.float32), np.array([37.25], np.float32)
  host = {'image': ((images.astype(np.float32) - mean) / std).astype(np.float32), 'label': labels}
  mesh = step_lib.make_mesh(jax.devices()[:8])
  config = opt_config('sam')
  tx, on_host = step_lib.make_train_step(model, mesh, step_lib.StepSpec(config, 10, donate=False))
  _, on_device = step_lib.make_train_step(model, mesh, step_lib.StepSpec(
      config, 10, donate=False, image_normalization=(mean, std)))
  state = step_lib.create_train_state(model, tx, jax.random.key(0), host['image'][:1])
  a, ma = on_host(state, host)
  b, mb = on_device(state, {'image': images, 'label': labels})
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-6)


@pytest.mark.parametrize('perturbation', ['sync', 'per_device'])
@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('layout', ['replicated', 'sharded'])
def test_step_on_the_resident_split_equals_the_step_on_host_batches(perturbation, augment,
                                                                    layout):
  """Same indices and crop/flip draws (TrainBatches), exact uint8 crop/flip: bit-identical."""
  from samjax.data import dataset as dataset_lib
  from samjax.data import input as input_lib
  rng = np.random.default_rng(5)
  split = dataset_lib.Split(images=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
                            labels=rng.integers(0, 3, 40).astype(np.int32),
                            attributes=rng.integers(0, 2, 40).astype(np.int32),
                            num_classes=3, num_attributes=2)
  batches = input_lib.TrainBatches(split, None, 16, seed=3, augment=augment, normalize=False)
  mean, std = np.array([101.5], np.float32), np.array([37.25], np.float32)
  mesh = step_lib.make_mesh(jax.devices()[:8])
  model, config = TinyNet(), opt_config('sam')
  spec = step_lib.StepSpec(config, 10, donate=False, perturbation=perturbation,
                           image_normalization=(mean, std))
  tx, host_step = step_lib.make_train_step(model, mesh, spec)
  _, device_step = step_lib.make_train_step(model, mesh,
                                            dataclasses.replace(spec, device_data=layout))
  resident = input_lib.resident_split(split, mesh, layout)
  state = step_lib.create_train_state(model, tx, jax.random.key(0), np.zeros((1, 8, 8, 1)))
  host, device = state, state
  for step in range(5):  # crosses the epoch boundary (2 steps per epoch)
    host, host_metrics = host_step(host, batches.batch_at(step))
    device, device_metrics = device_step(device, batches.device_inputs(step), resident)
    for x, y in zip(jax.tree.leaves((host, host_metrics)), jax.tree.leaves((device, device_metrics))):
      np.testing.assert_array_equal(x, y)


def test_the_resident_split_is_an_argument_of_the_step_not_a_constant_in_it():
  from samjax.data import dataset as dataset_lib
  from samjax.data import input as input_lib
  mesh = step_lib.make_mesh(jax.devices()[:8])
  model = TinyNet()
  tx, step = step_lib.make_train_step(model, mesh, step_lib.StepSpec(
      opt_config('sam'), 10, device_data='replicated',
      image_normalization=(np.zeros(1), np.ones(1))))
  state = step_lib.create_train_state(model, tx, jax.random.key(0), np.zeros((1, 8, 8, 1)))
  inputs = {'index': np.arange(16, dtype=np.int32), 'offset': np.zeros((16, 2), np.int32),
            'flip': np.zeros(16, bool)}
  sizes = {}
  for n in (16, 4096):
    # Random, not constant, images: a constant array would be printed as one splat value.
    images = np.random.default_rng(n).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    split = dataset_lib.Split(images=images,
                              labels=np.zeros(n, np.int32), attributes=np.zeros(n, np.int32),
                              num_classes=3, num_attributes=1)
    resident = input_lib.resident_split(split, mesh)
    lowered = step.lower(state, inputs, resident)
    args, _ = lowered.args_info
    assert args[2]['image'].shape == (n, 8, 8, 1)
    sizes[n] = len(lowered.as_text())
  # 256 KiB of images would show in the program text if they were embedded in it.
  assert abs(sizes[4096] - sizes[16]) < 100, sizes


@pytest.mark.parametrize('field, value', [('perturbation', 'async'), ('microbatches', 0),
                                          ('microbatch_mode', 'ghost')])
def test_a_step_spec_refuses_an_unknown_option(field, value):
  with pytest.raises(ValueError, match=field):
    step_lib.StepSpec(opt_config('sam'), 10, **{field: value})

"""SAM with gradient accumulation (micro-batches) and with bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samjax
from samjax import models
from samjax.train import step as step_lib
from samjax.config import base_train_config, validate_train_config
from test_step import TinyNet, make_batch, opt_config


def run(model, config, batch, *, k, mode='full_batch', devices=8, steps=2):
  mesh = step_lib.make_mesh(jax.devices()[:devices])
  tx, step = step_lib.make_train_step(model, mesh, step_lib.StepSpec(
      config, 10, donate=False, microbatches=k, microbatch_mode=mode, log_diagnostics=True))
  state = step_lib.create_train_state(model, tx, jax.random.key(0), batch['image'][:1])
  for _ in range(steps):
    state, metrics = step(state, batch)
  return state, metrics


@pytest.mark.parametrize('name', ['sam', 'lsam', 'asam'])
def test_full_batch_accumulation_equals_the_unaccumulated_step(name):
  model, batch = TinyNet(use_bn=False), make_batch(5, n=32)
  config = opt_config(name)
  plain, m1 = run(model, config, batch, k=1)
  accumulated, m4 = run(model, config, batch, k=4)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for key in ('loss', 'grad_norm', 'sam_cosine', 'gini_real', 'gini_phantom'):
    np.testing.assert_allclose(m1[key], m4[key], rtol=2e-5, atol=1e-6)


def micro_losses(model, params, stats, batch, k):
  """Per-micro-batch loss functions (rows i, i+k, ...), each with its own BatchNorm statistics."""
  def loss(p, i):
    x, y = batch['image'][i::k], batch['label'][i::k]
    variables = {'params': p, 'batch_stats': stats} if stats else {'params': p}
    if stats:
      logits, upd = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:
      logits, upd = model.apply(variables, x, train=True), {'batch_stats': {}}
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd['batch_stats']
  return loss


def test_full_batch_accumulation_with_batchnorm_equals_ghost_batch_closed_form():
  model, batch, k, rho, lr = TinyNet(use_bn=True), make_batch(6, n=16), 4, 0.1, 0.1
  state, _ = run(model, opt_config('sam', rho=rho, lr=lr, momentum=0.0), batch, k=k, devices=1,
                 steps=1)
  init = model.init(jax.random.key(0), jnp.asarray(batch['image'][:1]), train=False)
  params, stats = init['params'], init['batch_stats']
  loss = micro_losses(model, params, stats, batch, k)
  mean = lambda trees: jax.tree.map(lambda *v: sum(v) / len(v), *trees)
  grad_at = lambda p: mean([jax.grad(lambda q: loss(q, i)[0])(p) for i in range(k)])
  phantom, _ = samjax.phantom_params(params, grad_at(params), rho)
  expected = jax.tree.map(lambda p, g: p - lr * (g + 1e-3 * p), params, grad_at(phantom))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  expected_stats = mean([loss(params, i)[1] for i in range(k)])
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(expected_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['sam', 'lsam'])
def test_per_microbatch_perturbation_equals_its_closed_form(name):
  model, batch, k, rho, lr = TinyNet(use_bn=True), make_batch(7, n=16), 4, 0.1, 0.1
  state, metrics = run(model, opt_config(name, rho=rho, lr=lr, momentum=0.0), batch, k=k,
                       mode='per_microbatch', devices=1, steps=1)
  init = model.init(jax.random.key(0), jnp.asarray(batch['image'][:1]), train=False)
  params, stats = init['params'], init['batch_stats']
  loss = micro_losses(model, params, stats, batch, k)
  mask = samjax.head_mask(params) if name == 'lsam' else None
  phantom_grads = []
  for i in range(k):
    g = jax.grad(lambda q: loss(q, i)[0])(params)
    phantom, _ = samjax.phantom_params(params, g, rho, mask=mask)
    phantom_grads.append(jax.grad(lambda q: loss(q, i)[0])(phantom))
  mean = jax.tree.map(lambda *v: sum(v) / len(v), *phantom_grads)
  expected = jax.tree.map(lambda p, g: p - lr * (g + 1e-3 * p), params, mean)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(metrics['perturbation_norm'], rho, rtol=1e-5)
  assert int(state.opt_state[0].count) == 1


def test_per_microbatch_sharded_equals_single_device():
  model, batch = TinyNet(use_bn=False), make_batch(8, n=32)
  config = opt_config('sam')
  one, _ = run(model, config, batch, k=2, mode='per_microbatch', devices=1)
  eight, _ = run(model, config, batch, k=2, mode='per_microbatch', devices=8)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32_and_keeps_float32_state():
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(32, 16, 16, 1)).astype(np.float32),
           'label': rng.integers(0, 2, size=32).astype(np.int32)}
  config = opt_config('sam', rho=0.05, lr=0.05)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    model = models.create_model({'name': 'convnet', 'dtype': dtype}, 2)
    mesh = step_lib.make_mesh(jax.devices()[:1])
    tx, step = step_lib.make_train_step(model, mesh, step_lib.StepSpec(config, 10, donate=False))
    state = step_lib.create_train_state(model, tx, jax.random.key(0), batch['image'][:1])
    trace = []
    for _ in range(8):
      state, metrics = step(state, batch)
      trace.append(float(metrics['loss']))
      assert np.isfinite(float(metrics['grad_norm']))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.opt_state))
               if jnp.issubdtype(x.dtype, jnp.floating))
    losses[dtype] = np.array(trace)
  # Stated tolerance: bf16 has an 8-bit mantissa (relative error ~4e-3 per op).
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], atol=0.03)
  assert losses['bfloat16'][-1] < losses['bfloat16'][0]


def test_norm_of_tiny_bfloat16_gradients_is_finite():
  params = {'w': jnp.ones(4, jnp.bfloat16)}
  grads = {'w': jnp.full(4, 1e-30, jnp.bfloat16)}
  phantom, perturbation = samjax.phantom_params(params, grads, 0.05)
  assert np.all(np.isfinite(np.asarray(phantom['w'], np.float32)))
  zero = {'w': jnp.zeros(4, jnp.bfloat16)}
  phantom, _ = samjax.phantom_params(params, zero, 0.05)
  np.testing.assert_array_equal(np.asarray(phantom['w'], np.float32), 1.0)


def test_bad_accumulation_and_dtype_configs_name_the_field():
  config = base_train_config()
  config.batch_size, config.microbatches = 32, 3
  with pytest.raises(ValueError, match='config.batch_size.*microbatches x devices'):
    validate_train_config(config, num_devices=2)
  config = base_train_config()
  config.compute_dtype = 'float16'
  with pytest.raises(ValueError, match='config.compute_dtype: float16 is refused'):
    validate_train_config(config, num_devices=1)
  config = base_train_config()
  config.microbatch_mode = 'sometimes'
  with pytest.raises(ValueError, match='config.microbatch_mode'):
    validate_train_config(config, num_devices=1)

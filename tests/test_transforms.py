"""The SAM family against closed forms, optax.contrib.sam, and data-parallel mathematics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import samjax

A = np.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]], np.float32)


def quadratic_loss(params):
  w = params['w']
  return 0.5 * w @ (jnp.asarray(A) @ w) + jnp.sum(params['b'] ** 2)


def quadratic_grad_np(params):
  return {'w': A @ params['w'], 'b': 2.0 * params['b']}


def np_params():
  return {'w': np.array([1.0, -2.0, 0.5], np.float32), 'b': np.array([0.3, -0.1], np.float32)}


def run_update(tx, params, grad_fn):
  state = tx.init(params)
  grads = grad_fn(params)
  return tx.update(grads, state, params, grad_fn=grad_fn)


def test_sam_one_step_matches_closed_form():
  params = np_params()
  rho = 0.1
  out, state = run_update(samjax.sam(rho), jax.tree.map(jnp.asarray, params), jax.grad(quadratic_loss))
  g = quadratic_grad_np(params)
  norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
  phantom = {k: params[k] + rho * g[k] / norm for k in params}
  expected = quadratic_grad_np(phantom)
  for k in params:
    np.testing.assert_allclose(out[k], expected[k], rtol=1e-6)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.perturbation_norm, rho, rtol=1e-6)
  flat_g = np.concatenate([g['b'], g['w']])
  flat_e = np.concatenate([expected['b'], expected['w']])
  cosine = flat_g @ flat_e / np.linalg.norm(flat_g) / np.linalg.norm(flat_e)
  np.testing.assert_allclose(state.cosine, cosine, rtol=1e-6)
  assert int(state.count) == 1


def test_asam_one_step_matches_closed_form():
  params = np_params()
  rho, eta = 0.5, 0.01
  tx = samjax.sam(rho, adaptive=True, adaptive_eta=eta)
  out, _ = run_update(tx, jax.tree.map(jnp.asarray, params), jax.grad(quadratic_loss))
  g = quadratic_grad_np(params)
  t = {k: np.abs(params[k]) + eta for k in params}
  norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in params))
  phantom = {k: params[k] + rho * t[k] ** 2 * g[k] / norm for k in params}
  expected = quadratic_grad_np(phantom)
  for k in params:
    np.testing.assert_allclose(out[k], expected[k], rtol=1e-5)


def two_layer_loss(params, x, y):
  h = jnp.tanh(x @ params['body']['kernel'])
  logits = h @ params['head']['kernel'] + params['head']['bias']
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[:, 0], y))


def two_layer_setup(seed=0, n=16):
  rng = np.random.default_rng(seed)
  params = {'body': {'kernel': rng.normal(size=(4, 5)).astype(np.float32)},
            'head': {'kernel': rng.normal(size=(5, 1)).astype(np.float32),
                     'bias': np.zeros((1,), np.float32)}}
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (rng.uniform(size=n) > 0.5).astype(np.float32)
  return jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y)


def test_lsam_perturbs_only_the_head_and_returns_every_gradient():
  params, x, y = two_layer_setup()
  grad_fn = jax.grad(lambda p: two_layer_loss(p, x, y))
  rho = 0.3
  out, state = run_update(samjax.lsam(rho), params, grad_fn)
  g = grad_fn(params)
  head_norm = np.sqrt(sum(np.sum(np.asarray(v) ** 2) for v in jax.tree.leaves(g['head'])))
  phantom = {'body': params['body'],
             'head': jax.tree.map(lambda p, gv: p + rho * gv / head_norm, params['head'], g['head'])}
  expected = grad_fn(phantom)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The body's gradient changes too: the descent gradient is taken at (theta, v~).
  assert not np.allclose(out['body']['kernel'], g['body']['kernel'])
  np.testing.assert_allclose(state.perturbation_norm, rho, rtol=1e-6)


def test_phantom_params_leaves_unmasked_leaves_untouched():
  params, x, y = two_layer_setup()
  g = jax.grad(lambda p: two_layer_loss(p, x, y))(params)
  phantom, perturbation = samjax.phantom_params(params, g, 0.2, mask={'body': False, 'head': True})
  assert phantom['body']['kernel'] is params['body']['kernel']
  np.testing.assert_array_equal(perturbation['body']['kernel'], 0.0)


def test_mask_as_pytree_equals_lsam():
  params, x, y = two_layer_setup()
  grad_fn = jax.grad(lambda p: two_layer_loss(p, x, y))
  mask = {'body': {'kernel': False}, 'head': {'kernel': True, 'bias': True}}
  out_mask, _ = run_update(samjax.sam(0.3, mask=mask), params, grad_fn)
  out_lsam, _ = run_update(samjax.lsam(0.3), params, grad_fn)
  for a, b in zip(jax.tree.leaves(out_mask), jax.tree.leaves(out_lsam)):
    np.testing.assert_array_equal(a, b)


def test_rho_zero_equals_base_optimizer():
  params, x, y = two_layer_setup()
  grad_fn = jax.grad(lambda p: two_layer_loss(p, x, y))
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(samjax.sam(0.0), optax.sgd(0.1, momentum=0.9))
  p_sam, p_base = params, params
  s_sam, s_base = tx.init(params), base.init(params)
  for _ in range(5):
    u, s_sam = tx.update(grad_fn(p_sam), s_sam, p_sam, grad_fn=grad_fn)
    p_sam = optax.apply_updates(p_sam, u)
    u, s_base = base.update(grad_fn(p_base), s_base, p_base)
    p_base = optax.apply_updates(p_base, u)
  for a, b in zip(jax.tree.leaves(p_sam), jax.tree.leaves(p_base)):
    np.testing.assert_array_equal(a, b)


def test_matches_optax_contrib_sam_opaque_over_many_steps():
  params, x, y = two_layer_setup(seed=1, n=32)
  grad_fn = jax.grad(lambda p: two_layer_loss(p, x, y))
  lr, rho = 0.2, 0.05
  ours = optax.chain(samjax.sam(rho), optax.sgd(lr))
  theirs = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                             opaque_mode=True)

  @jax.jit
  def step_ours(p, s):
    u, s = ours.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  @jax.jit
  def step_theirs(p, s):
    u, s = theirs.update(grad_fn(p), s, p, grad_fn=lambda q, _: grad_fn(q))
    return optax.apply_updates(p, u), s

  p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
  for _ in range(50):
    p1, s1 = step_ours(p1, s1)
    p2, s2 = step_theirs(p2, s2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # And SAM really moved away from plain SGD over those steps.
  p3 = params
  for _ in range(50):
    p3 = jax.tree.map(lambda p, g: p - lr * g, p3, grad_fn(p3))
  assert not np.allclose(p1['head']['kernel'], p3['head']['kernel'], atol=1e-4)


@pytest.mark.parametrize('adaptive', [False, True])
def test_zero_gradient_stays_finite(adaptive):
  params = {'w': jnp.zeros(3), 'b': jnp.ones(2)}
  grad_fn = lambda p: jax.tree.map(jnp.zeros_like, p)
  out, state = jax.jit(lambda p: run_update(samjax.sam(0.1, adaptive=adaptive), p, grad_fn))(params)
  for leaf in jax.tree.leaves((out, state)):
    assert np.all(np.isfinite(leaf))
  np.testing.assert_array_equal(state.perturbation_norm, 0.0)


def test_rho_schedule_follows_step_count():
  params = jax.tree.map(jnp.asarray, np_params())
  grad_fn = jax.grad(quadratic_loss)
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  tx = samjax.sam(schedule)
  state = tx.init(params)
  norms = []
  for _ in range(4):
    _, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    norms.append(float(state.perturbation_norm))
  np.testing.assert_allclose(norms, [0.0, 0.25, 0.5, 0.75], atol=1e-6)


def test_composes_with_clip_decay_momentum_and_cosine_schedule():
  params, x, y = two_layer_setup(seed=2)
  grad_fn = jax.grad(lambda p: two_layer_loss(p, x, y))
  rho, wd, clip, momentum = 0.1, 5e-3, 0.5, 0.9
  schedule = optax.cosine_decay_schedule(0.3, decay_steps=6)
  tx = optax.chain(optax.clip_by_global_norm(clip), samjax.sam(rho), optax.add_decayed_weights(wd),
                   optax.sgd(schedule, momentum=momentum))
  state = tx.init(params)
  p = params
  ref = jax.tree.map(np.asarray, params)
  trace = jax.tree.map(np.zeros_like, ref)
  np_grad = lambda q: jax.tree.map(np.asarray, grad_fn(jax.tree.map(jnp.asarray, q)))
  for step in range(6):
    u, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
    p = optax.apply_updates(p, u)
    # Reference written out by hand: clip the ascent gradient, perturb, take the raw phantom
    # gradient, add weight decay at theta, momentum, cosine learning rate.
    g = np_grad(ref)
    gnorm = np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(g)))
    g = jax.tree.map(lambda v: v * min(1.0, clip / gnorm), g)
    cnorm = np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(g)))
    phantom = jax.tree.map(lambda w, v: w + rho * v / cnorm, ref, g)
    d = jax.tree.map(lambda v, w: v + wd * w, np_grad(phantom), ref)
    trace = jax.tree.map(lambda t, v: momentum * t + v, trace, d)
    lr = 0.3 * 0.5 * (1 + np.cos(np.pi * step / 6))
    ref = jax.tree.map(lambda w, t: w - lr * t, ref, trace)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_vmaps_over_rho():
  params = jax.tree.map(jnp.asarray, np_params())
  grad_fn = jax.grad(quadratic_loss)

  def out_for(rho):
    return run_update(samjax.sam(rho), params, grad_fn)[0]

  rhos = jnp.array([0.0, 0.1, 0.2])
  batched = jax.vmap(out_for)(rhos)
  for i, rho in enumerate([0.0, 0.1, 0.2]):
    single = out_for(rho)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(a[i], b, rtol=1e-6)


# ---- data parallel: the user's own pmap / shard_map ------------------------------------------

NUM_DEVICES = 8


def shard_data(x, y):
  return x.reshape(NUM_DEVICES, -1, x.shape[-1]), y.reshape(NUM_DEVICES, -1)


def reference_parallel(params, xs, ys, rho, sync, adaptive=False, mask=None):
  """Single-device mathematics of the data-parallel SAM step, one shard at a time."""
  shard_grad = lambda p, i: jax.grad(lambda q: two_layer_loss(q, xs[i], ys[i]))(p)
  grads = [shard_grad(params, i) for i in range(NUM_DEVICES)]
  mean = lambda trees: jax.tree.map(lambda *v: sum(v) / len(v), *trees)
  outs = []
  for i in range(NUM_DEVICES):
    ascent = mean(grads) if sync else grads[i]
    phantom, _ = samjax.phantom_params(params, ascent, rho, adaptive=adaptive, mask=mask)
    outs.append(shard_grad(phantom, i))
  return mean(outs)


@pytest.mark.parametrize('sync', [True, False])
def test_inside_users_pmap(sync):
  assert jax.device_count() >= NUM_DEVICES
  params, x, y = two_layer_setup(seed=3, n=64)
  xs, ys = shard_data(x, y)
  rho = 0.2
  tx = samjax.sam(rho, axis_name='batch', sync_perturbation=sync)

  def step(p, xb, yb):
    grad_fn = jax.grad(lambda q: two_layer_loss(q, xb, yb))
    out, state = tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)
    return out, state.grad_norm

  out, grad_norm = jax.pmap(step, axis_name='batch', in_axes=(None, 0, 0))(params, xs, ys)
  expected = reference_parallel(params, xs, ys, rho, sync)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    for d in range(NUM_DEVICES):  # replicated: every device holds the averaged gradient
      np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=1e-7)
  full = jax.grad(lambda q: two_layer_loss(q, x, y))(params)
  np.testing.assert_allclose(grad_norm[0], optax.tree.norm(full), rtol=1e-5)


@pytest.mark.parametrize('sync', [True, False])
@pytest.mark.parametrize('variant', ['sam', 'lsam', 'asam'])
@pytest.mark.parametrize('check_vma', [False, True])
def test_inside_users_shard_map(sync, variant, check_vma):
  params, x, y = two_layer_setup(seed=4, n=64)
  rho = 0.2
  kwargs = {'sam': {}, 'lsam': {'mask': {'body': False, 'head': True}}, 'asam': {'adaptive': True}}[variant]
  tx = samjax.sam(rho, axis_name='data', sync_perturbation=sync, **kwargs)
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ('data',))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=P(),
                     check_vma=check_vma)
  def step(p, xb, yb):
    if check_vma:
      # Under check_vma, the gradient with respect to replicated params is already summed over
      # the axis; marking them device-varying gives the per-device gradient sam() expects.
      p = jax.lax.pcast(p, 'data', to='varying')
    grad_fn = jax.grad(lambda q: two_layer_loss(q, xb, yb))
    out, _ = tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)
    return out

  out = jax.jit(step)(params, x, y)
  xs, ys = shard_data(x, y)
  expected = reference_parallel(params, xs, ys, rho, sync, adaptive=kwargs.get('adaptive', False),
                                mask=kwargs.get('mask'))
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  if sync:  # one phantom for the global batch: the full-batch SAM gradient
    full_grad_fn = jax.grad(lambda q: two_layer_loss(q, x, y))
    single, _ = run_update(samjax.sam(rho, **kwargs), params, full_grad_fn)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(single)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize('rho', [-0.1, float('nan'), 'big'])
def test_bad_rho_is_a_value_error(rho):
  with pytest.raises(ValueError, match='rho'):
    samjax.sam(rho)


def test_mask_structure_mismatch_is_a_value_error_at_init():
  params, _, _ = two_layer_setup()
  tx = samjax.sam(0.1, mask={'encoder': True, 'head': False})
  with pytest.raises(ValueError, match='mask does not match'):
    tx.init(params)


def test_missing_grad_fn_is_a_value_error():
  params, _, _ = two_layer_setup()
  tx = samjax.sam(0.1)
  with pytest.raises(ValueError, match='grad_fn'):
    tx.update(params, tx.init(params), params)


def test_lsam_without_a_head_is_a_value_error():
  params = {'dense': {'kernel': jnp.ones((2, 2))}}
  tx = samjax.lsam(0.1)
  with pytest.raises(ValueError, match="named 'head'"):
    tx.init(params)

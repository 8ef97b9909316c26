"""samjax on a two-axis mesh, as a client writes it: a batch sharded over ('data', 'replica').

Expected values come from jax.grad on one device, shard by shard, phantoms written out in numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import samjax

AXES = ('data', 'replica')
N = 8  # 4 x 2 CPU devices (tests/conftest.py)


def loss_fn(params, x, y):
  logits = jnp.tanh(x @ params['body']['w']) @ params['head']['w'] + params['head']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def setup(seed=0, n=64):
  rng = np.random.default_rng(seed)
  params = {'body': {'w': rng.normal(size=(5, 6))}, 'head': {'w': rng.normal(size=(6, 3)),
                                                             'b': np.zeros(3)}}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
  return params, x, y


def mesh():
  return Mesh(np.array(jax.devices()[:N]).reshape(4, 2), AXES)


def shard_step(fn, out_specs=(P(), P())):
  """``fn(params, x, y)`` under shard_map with the batch sharded over both mesh axes."""
  return jax.jit(jax.shard_map(fn, mesh=mesh(), in_specs=(P(), P(AXES), P(AXES)),
                               out_specs=out_specs))


def hand_sam(params, x, y, rho, *, sync, head_only=False):
  """Data-parallel SAM over N shards by hand; returns (update, mean clean gradient)."""
  xs, ys = np.asarray(x).reshape(N, -1, 5), np.asarray(y).reshape(N, -1)
  grad = lambda p, i: jax.tree.map(np.asarray, jax.grad(loss_fn)(
      jax.tree.map(jnp.asarray, p), xs[i], ys[i]))
  mean = lambda trees: jax.tree.map(lambda *v: np.mean(v, axis=0), *trees)
  p0 = jax.tree.map(np.asarray, params)

  def phantom(g):
    keys = ['head'] if head_only else list(p0)
    norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for k in keys
                       for v in jax.tree.leaves(g[k])))
    return {k: jax.tree.map(lambda p, v: p + rho * v / norm, p0[k], g[k]) if k in keys else p0[k]
            for k in p0}

  grads = [grad(p0, i) for i in range(N)]
  outs = [grad(phantom(mean(grads) if sync else grads[i]), i) for i in range(N)]
  return mean(outs), mean(grads)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def test_per_device_grad_over_two_axes_is_each_devices_own_gradient():
  params, x, y = setup()

  def per_device(p, xb, yb):
    g = samjax.per_device_grad(loss_fn, AXES)(p, xb, yb)
    return jax.tree.map(lambda v: v[None], g)

  got = shard_step(per_device, out_specs=P(AXES))(params, x, y)
  xs, ys = x.reshape(N, -1, 5), y.reshape(N, -1)
  for i in range(N):
    assert_close(jax.tree.map(lambda v: v[i], got), jax.grad(loss_fn)(params, xs[i], ys[i]))


@pytest.mark.parametrize('factory', [samjax.sam, samjax.lsam])
@pytest.mark.parametrize('sync', [True, False])
def test_sam_over_two_axes_equals_hand_computed_sam(factory, sync):
  params, x, y = setup(seed=1)
  tx = factory(0.3, axis_name=AXES, sync_perturbation=sync)

  def step(p, xb, yb):
    grad_fn = samjax.per_device_grad(loss_fn, AXES)
    out, state = tx.update(grad_fn(p, xb, yb), tx.init(p), p,
                           grad_fn=lambda q: grad_fn(q, xb, yb))
    return out, state.grad_norm

  out, grad_norm = shard_step(step)(params, x, y)
  head_only = factory is samjax.lsam
  want, mean_grad = hand_sam(params, x, y, 0.3, sync=sync, head_only=head_only)
  assert_close(out, want)
  norm_of = mean_grad['head'] if head_only else mean_grad
  np.testing.assert_allclose(
      grad_norm, np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(norm_of))), rtol=1e-5)


def test_accumulated_grad_over_two_axes_equals_hand_computed_sam():
  params, x, y = setup(seed=2)
  tx = samjax.sam(0.2, axis_name=AXES)

  def step(p, xb, yb):
    grad = samjax.accumulated_grad(lambda q, b: loss_fn(q, *b), 2, axis_name=AXES)
    return tx.update(grad(p, (xb, yb)), tx.init(p), p, grad_fn=lambda q: grad(q, (xb, yb)))[0]

  assert_close(shard_step(step, out_specs=P())(params, x, y),
               hand_sam(params, x, y, 0.2, sync=True)[0])


def test_plain_grad_with_a_tuple_axis_is_refused():
  params, x, y = setup()
  tx = samjax.sam(0.1, axis_name=AXES)

  def step(p, xb, yb):
    grad_fn = lambda q: jax.grad(loss_fn)(q, xb, yb)  # summed over both axes
    return tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)[0]

  with pytest.raises(ValueError, match=r"does not vary over 'data'.*per_device_grad\(loss_fn, "
                     r"\('data', 'replica'\)\)"):
    shard_step(step, out_specs=P())(params, x, y)


def test_per_device_grad_over_one_of_two_sharded_axes_is_refused():
  params, x, y = setup()

  def step(p, xb, yb):
    return samjax.per_device_grad(loss_fn, 'data')(p, xb, yb)  # would be summed over 'replica'

  with pytest.raises(ValueError, match=r"varies over the mesh axes \('replica',\).*"
                     r"per_device_grad\(fun, \('data', 'replica'\)\)"):
    shard_step(step, out_specs=P())(params, x, y)


@pytest.mark.parametrize('axis_name', [None, 'data'])
def test_per_device_gradients_without_their_axes_are_refused(axis_name):
  """sam() inside shard_map with per-device gradients but no (or too few) axis names."""
  params, x, y = setup()
  tx = samjax.sam(0.1, axis_name=axis_name)

  def step(p, xb, yb):
    grad_fn = samjax.per_device_grad(loss_fn, AXES)
    return tx.update(grad_fn(p, xb, yb), tx.init(p), p, grad_fn=lambda q: grad_fn(q, xb, yb))[0]

  with pytest.raises(ValueError, match=r"varies over the mesh axes .*Pass axis_name="
                     r"\('data', 'replica'\)"):
    shard_step(step, out_specs=P())(params, x, y)


def test_sam_without_axis_name_on_a_one_axis_mesh_names_axis_name():
  params, x, y = setup()
  one_axis = Mesh(np.array(jax.devices()[:N]), ('data',))
  tx = samjax.sam(0.1)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=one_axis, in_specs=(P(), P('data'), P('data')),
                     out_specs=P())
  def step(p, xb, yb):
    grad_fn = samjax.per_device_grad(loss_fn, 'data')
    return tx.update(grad_fn(p, xb, yb), tx.init(p), p, grad_fn=lambda q: grad_fn(q, xb, yb))[0]

  with pytest.raises(ValueError, match=r"Pass axis_name='data'"):
    step(params, x, y)

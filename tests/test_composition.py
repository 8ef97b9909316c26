"""samjax.sam composed as a client composes it: own models, own chains, own shard_map/pmap steps.

Every expected value is computed independently of samjax: per-shard gradients with jax.grad on
one device, phantoms written out in numpy.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import samjax

N = 8  # CPU devices (tests/conftest.py)


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params['body']['w'])
  logits = h @ params['head']['w'] + params['head']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def setup(seed=0, n=64):
  rng = np.random.default_rng(seed)
  params = {'body': {'w': rng.normal(size=(5, 6)).astype(np.float32)},
            'head': {'w': rng.normal(size=(6, 3)).astype(np.float32),
                     'b': np.zeros(3, np.float32)}}
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = rng.integers(0, 3, size=n).astype(np.int32)
  return jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y)


def np_tree(t):
  return jax.tree.map(np.asarray, t)


def flat_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(tree))))


def hand_phantom(params, g, rho, head_only=False):
  """theta + rho g / ||g||, over all leaves or the head only, in numpy."""
  sel = {k: (k == 'head') or not head_only for k in params}
  norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2)
                     for k in params if sel[k] for v in jax.tree.leaves(g[k])))
  return {k: (jax.tree.map(lambda p, v: np.asarray(p) + rho * np.asarray(v) / norm, params[k], g[k])
              if sel[k] else np_tree(params[k])) for k in params}


def hand_parallel_sam(params, x, y, rho, *, sync, head_only=False):
  """Data-parallel SAM on N shards, by hand: per-shard gradients from jax.grad on one device."""
  xs, ys = x.reshape(N, -1, x.shape[-1]), y.reshape(N, -1)
  grad = lambda p, i: np_tree(jax.grad(mlp_loss)(jax.tree.map(jnp.asarray, p), xs[i], ys[i]))
  grads = [grad(params, i) for i in range(N)]
  mean = lambda trees: jax.tree.map(lambda *v: np.mean(v, axis=0), *trees)
  outs = [grad(hand_phantom(params, mean(grads) if sync else grads[i], rho, head_only), i)
          for i in range(N)]
  return mean(outs), mean(grads)


def mesh():
  return Mesh(np.array(jax.devices()[:N]), ('data',))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


# ---- 1. the invariant-gradient guard ---------------------------------------------------------

def test_plain_grad_under_check_vma_shard_map_is_a_clear_error():
  params, x, y = setup()
  tx = samjax.sam(0.1, axis_name='data')

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=P())
  def step(p, xb, yb):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, xb, yb)  # summed over the axis: the bug
    return tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)[0]

  with pytest.raises(ValueError, match=r"gradient passed to update\(\) does not vary over 'data'"
                     r".*samjax.per_device_grad"):
    jax.jit(step)(params, x, y)


@pytest.mark.parametrize('sync', [True, False])
def test_a_summed_phantom_gradient_is_a_clear_error(sync):
  params, x, y = setup()
  tx = samjax.sam(0.1, axis_name='data', sync_perturbation=sync)

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=P())
  def step(p, xb, yb):
    grads = samjax.per_device_grad(mlp_loss, 'data')(p, xb, yb)
    # grad_fn differentiates at the phantom, which is replicated when sync=True: summed.
    # With sync=False the phantom varies, but the leaves could still be invariant: guard both.
    grad_fn = lambda q: jax.lax.psum(jax.grad(mlp_loss)(q, xb, yb), 'data')
    return tx.update(grads, tx.init(p), p, grad_fn=grad_fn)[0]

  with pytest.raises(ValueError, match=r"grad_fn\(phantom\) does not vary over 'data'"):
    jax.jit(step)(params, x, y)


def test_axis_name_outside_any_mapped_axis_is_a_clear_error():
  params, x, y = setup()
  tx = samjax.sam(0.1, axis_name='data')
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  with pytest.raises(ValueError, match="axis 'data' is not bound"):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)


# ---- 2. per_device_grad: both sync modes, shard_map and pmap ---------------------------------

@pytest.mark.parametrize('head_only', [False, True])
@pytest.mark.parametrize('sync', [True, False])
def test_per_device_grad_in_shard_map_equals_hand_computed_sam(sync, head_only):
  params, x, y = setup(seed=1)
  rho = 0.3
  tx = (samjax.lsam if head_only else samjax.sam)(rho, axis_name='data', sync_perturbation=sync)

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=(P(), P()))
  def step(p, xb, yb):
    grad_fn = samjax.per_device_grad(mlp_loss, 'data')
    out, state = tx.update(grad_fn(p, xb, yb), tx.init(p), p,
                           grad_fn=lambda q: grad_fn(q, xb, yb))
    return out, state.grad_norm

  out, grad_norm = jax.jit(step)(params, x, y)
  expected, mean_grad = hand_parallel_sam(np_tree(params), np.asarray(x), np.asarray(y), rho,
                                          sync=sync, head_only=head_only)
  assert_trees_close(out, expected)
  # ||g|| of the global gradient over the perturbed leaves, not N times it.
  want = flat_norm(mean_grad['head'] if head_only else mean_grad)
  np.testing.assert_allclose(grad_norm, want, rtol=1e-5)


def test_per_device_grad_returns_each_devices_own_gradient():
  params, x, y = setup(seed=2)

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=P('data'))
  def per_device(p, xb, yb):
    g = samjax.per_device_grad(mlp_loss, 'data')(p, xb, yb)
    return jax.tree.map(lambda v: v[None], g)

  got = jax.jit(per_device)(params, x, y)
  xs, ys = x.reshape(N, -1, 5), y.reshape(N, -1)
  for i in range(N):
    want = jax.grad(mlp_loss)(params, xs[i], ys[i])
    assert_trees_close(jax.tree.map(lambda v: v[i], got), want)


def test_per_device_grad_argnums_and_has_aux():
  params, x, y = setup(seed=3)

  def loss_xy(xb, p, yb):  # params second
    return mlp_loss(p, xb, yb), jnp.sum(yb)

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=(P('data'), P('data')))
  def per_device(p, xb, yb):
    g, aux = samjax.per_device_grad(loss_xy, 'data', argnums=1, has_aux=True)(xb, p, yb)
    return jax.tree.map(lambda v: v[None], g), aux[None]

  got, aux = jax.jit(per_device)(params, x, y)
  xs, ys = x.reshape(N, -1, 5), y.reshape(N, -1)
  for i in range(N):
    assert_trees_close(jax.tree.map(lambda v: v[i], got), jax.grad(mlp_loss)(params, xs[i], ys[i]))
    assert int(aux[i]) == int(np.sum(ys[i]))


@pytest.mark.parametrize('sync', [True, False])
def test_per_device_grad_in_pmap_equals_hand_computed_sam(sync):
  params, x, y = setup(seed=4)
  rho = 0.2
  tx = samjax.sam(rho, axis_name='batch', sync_perturbation=sync)

  def step(p, xb, yb):
    grad_fn = samjax.per_device_grad(mlp_loss, 'batch')
    return tx.update(grad_fn(p, xb, yb), tx.init(p), p, grad_fn=lambda q: grad_fn(q, xb, yb))[0]

  out = jax.pmap(step, axis_name='batch', in_axes=(None, 0, 0))(
      params, x.reshape(N, -1, 5), y.reshape(N, -1))
  expected, _ = hand_parallel_sam(np_tree(params), np.asarray(x), np.asarray(y), rho, sync=sync)
  for d in range(N):
    assert_trees_close(jax.tree.map(lambda v: v[d], out), expected)


# ---- 3. has_aux -------------------------------------------------------------------------------

def test_has_aux_discards_the_phantom_aux_and_gives_the_same_update():
  params, x, y = setup(seed=5)
  grad_only = lambda q: jax.grad(mlp_loss)(q, x, y)
  with_aux = lambda q: (grad_only(q), {'phantom_loss': mlp_loss(q, x, y)})
  out_plain, _ = samjax.sam(0.2).update(grad_only(params), samjax.sam(0.2).init(params), params,
                                        grad_fn=grad_only)
  tx = samjax.sam(0.2, has_aux=True)
  out_aux, state = tx.update(grad_only(params), tx.init(params), params, grad_fn=with_aux)
  assert_trees_close(out_aux, out_plain, rtol=0, atol=0)
  assert isinstance(state, samjax.SamState)


def test_a_pair_without_has_aux_is_a_clear_error():
  params, x, y = setup()
  grad_fn = lambda q: (jax.grad(mlp_loss)(q, x, y), 0.0)
  tx = samjax.sam(0.1)
  with pytest.raises(ValueError, match='pass has_aux=True'):
    tx.update(grad_fn(params)[0], tx.init(params), params, grad_fn=grad_fn)


# ---- 4. optax.inject_hyperparams --------------------------------------------------------------

@pytest.mark.parametrize('factory', [samjax.sam, samjax.lsam])
def test_inject_hyperparams_rho_change_takes_effect_next_step(factory):
  params, x, y = setup(seed=6)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  tx = optax.inject_hyperparams(factory)(rho=0.05)
  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn))
  out, state = step(state)
  head_only = factory is samjax.lsam
  g = np_tree(grad_fn(params))
  assert_trees_close(out, np_tree(grad_fn(hand_phantom(np_tree(params), g, 0.05, head_only))))
  state.hyperparams['rho'] = jnp.asarray(0.4)
  out, state = step(state)
  assert_trees_close(out, np_tree(grad_fn(hand_phantom(np_tree(params), g, 0.4, head_only))))
  assert int(state.inner_state.count) == 2


# ---- 5. accumulation in a user's own step -----------------------------------------------------

def test_accumulated_grad_equals_the_whole_batch_gradient():
  params, x, y = setup(seed=7, n=48)
  loss = lambda p, b: mlp_loss(p, b['x'], b['y'])
  batch = {'x': x, 'y': y}
  for k in (1, 3, 4):
    assert_trees_close(samjax.accumulated_grad(loss, k)(params, batch),
                       jax.grad(loss)(params, batch))


def test_accumulated_grad_has_aux_stacks_per_microbatch():
  params, x, y = setup(seed=8, n=12)
  loss = lambda p, b: (mlp_loss(p, b['x'], b['y']), jnp.sum(b['y']))
  grads, aux = samjax.accumulated_grad(loss, 3, has_aux=True)(params, {'x': x, 'y': y})
  # Strided micro-batches: rows i, i+3, i+6, ...
  np.testing.assert_array_equal(aux, [int(np.sum(np.asarray(y)[i::3])) for i in range(3)])
  assert_trees_close(grads, jax.grad(lambda p: mlp_loss(p, x, y))(params))


def test_sam_around_accumulated_grad_equals_unaccumulated_sam():
  params, x, y = setup(seed=9, n=32)
  batch = {'x': x, 'y': y}
  loss = lambda p, b: mlp_loss(p, b['x'], b['y'])
  tx = optax.chain(samjax.sam(0.1), optax.sgd(0.5, momentum=0.9))
  grad = samjax.accumulated_grad(loss, 4)

  @jax.jit
  def accumulated_step(p, s):
    u, s = tx.update(grad(p, batch), s, p, grad_fn=lambda q: grad(q, batch))
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  ref = np_tree(params)
  trace = jax.tree.map(np.zeros_like, ref)
  for _ in range(3):
    p, s = accumulated_step(p, s)
    g = np_tree(jax.grad(loss)(jax.tree.map(jnp.asarray, ref), batch))
    d = np_tree(jax.grad(loss)(jax.tree.map(jnp.asarray, hand_phantom(ref, g, 0.1)), batch))
    trace = jax.tree.map(lambda t, v: 0.9 * t + v, trace, d)
    ref = jax.tree.map(lambda w, t: w - 0.5 * t, ref, trace)
  assert_trees_close(p, ref, rtol=1e-4, atol=1e-5)


def test_multisteps_around_sam_is_refused_naming_accumulated_grad():
  """MultiSteps would take the phantom from the mean gradient and apply one micro-batch's."""
  params, x, y = setup(seed=10, n=32)
  multi = optax.MultiSteps(optax.chain(samjax.sam(0.5), optax.sgd(1.0)), every_k_schedule=2)
  gf = lambda q: jax.grad(mlp_loss)(q, x[:16], y[:16])
  with pytest.raises(ValueError, match=r'inside optax.MultiSteps.*samjax.accumulated_grad'):
    multi.update(gf(params), multi.init(params), params, grad_fn=gf)
  with pytest.raises(ValueError, match=r'inside optax.MultiSteps'):
    jax.jit(lambda s: multi.update(gf(params), s, params, grad_fn=gf))(multi.init(params))


def test_accumulated_grad_bad_input_is_a_clear_error():
  params, x, y = setup(n=10)
  with pytest.raises(ValueError, match='num_microbatches must be an int >= 1'):
    samjax.accumulated_grad(lambda p, b: 0.0, 0)
  with pytest.raises(ValueError, match='divisible by 3'):
    samjax.accumulated_grad(lambda p, b: mlp_loss(p, *b), 3)(params, (x, y))


def test_accumulated_grad_per_device_in_shard_map():
  params, x, y = setup(seed=11, n=64)
  loss = lambda p, b: mlp_loss(p, b[0], b[1])
  tx = samjax.sam(0.2, axis_name='data')

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=P())
  def step(p, xb, yb):
    grad = samjax.accumulated_grad(loss, 2, axis_name='data')
    return tx.update(grad(p, (xb, yb)), tx.init(p), p, grad_fn=lambda q: grad(q, (xb, yb)))[0]

  expected, _ = hand_parallel_sam(np_tree(params), np.asarray(x), np.asarray(y), 0.2, sync=True)
  assert_trees_close(jax.jit(step)(params, x, y), expected)


# ---- 6. where clipping goes -------------------------------------------------------------------

def test_a_clip_before_sam_has_no_effect_and_after_sam_clips_the_applied_gradient():
  params, x, y = setup(seed=12)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  g = grad_fn(params)
  c = 0.1 * flat_norm(g)  # a clip that bites
  run = lambda tx: tx.update(g, tx.init(params), params, grad_fn=grad_fn)[0]
  plain = run(optax.chain(samjax.sam(0.2), optax.sgd(1.0)))
  before = run(optax.chain(optax.clip_by_global_norm(c), samjax.sam(0.2), optax.sgd(1.0)))
  after = run(optax.chain(samjax.sam(0.2), optax.clip_by_global_norm(c), optax.sgd(1.0)))
  assert_trees_close(before, plain)  # SAM normalises the ascent direction: the clip is lost
  phantom_g = np_tree(grad_fn(hand_phantom(np_tree(params), np_tree(g), 0.2)))
  scale = min(1.0, c / flat_norm(phantom_g))
  assert_trees_close(after, jax.tree.map(lambda v: -scale * v, phantom_g))
  np.testing.assert_allclose(flat_norm(after), c, rtol=1e-5)


# ---- 7. validation ----------------------------------------------------------------------------

def test_unsynchronised_perturbation_needs_an_axis_and_the_advice_works():
  with pytest.raises(ValueError, match=r"jax.shard_map.*samjax.sam\(rho, axis_name='data', "
                     r"sync_perturbation=False\).*per_device_grad\(loss_fn, 'data'\)"):
    samjax.sam(0.1, sync_perturbation=False)
  # The advice, followed: a shard_map step with per-device phantoms is m-sharpness, exactly.
  params, x, y = setup(seed=14)
  tx = samjax.sam(0.1, axis_name='data', sync_perturbation=False)

  @functools.partial(jax.shard_map, mesh=mesh(), in_specs=(P(), P('data'), P('data')),
                     out_specs=P())
  def step(p, xb, yb):
    grad_fn = samjax.per_device_grad(mlp_loss, 'data')
    return tx.update(grad_fn(p, xb, yb), tx.init(p), p, grad_fn=lambda q: grad_fn(q, xb, yb))[0]

  want, _ = hand_parallel_sam(np_tree(params), np.asarray(x), np.asarray(y), 0.1, sync=False)
  assert_trees_close(jax.jit(step)(params, x, y), want)


def test_a_mask_that_selects_nothing_fails_at_init():
  params, _, _ = setup()
  tx = samjax.sam(0.1, mask={'body': False, 'head': False})
  with pytest.raises(ValueError, match='selects no parameter'):
    tx.init(params)
  tx = samjax.sam(0.1, mask=lambda p: jax.tree.map(lambda _: False, p))
  with pytest.raises(ValueError, match='selects no parameter'):
    tx.init(params)


def test_a_schedule_negative_at_step_zero_fails_at_init():
  params, _, _ = setup()
  tx = samjax.sam(optax.linear_schedule(-0.1, 0.1, 10))
  with pytest.raises(ValueError, match='gives -0.1 at step 0'):
    tx.init(params)


# ---- 8. no name shadowing ---------------------------------------------------------------------

def test_public_names_are_functions_and_no_module_shadows_them():
  assert importlib.util.find_spec('samjax.sam') is None
  assert callable(samjax.sam) and callable(samjax.lsam)
  transforms = importlib.import_module('samjax.transforms')
  assert samjax.sam is transforms.sam and samjax.SamState is transforms.SamState


# ---- 9. Flax NNX: nnx.Optimizer passes grad_fn through ------------------------------------------

def test_nnx_optimizer_with_lsam_equals_the_functional_update():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.body = nnx.Linear(5, 6, rngs=rngs)
      self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.body(x)))

  _, x, y = setup(seed=13)
  model = Net(nnx.Rngs(0))
  to_dict = lambda m: {'body': {'w': m.body.kernel[...]},
                       'head': {'w': m.head.kernel[...], 'b': m.head.bias[...]}}
  start = to_dict(model)
  assert not np.any(np.asarray(model.body.bias[...]))  # zero-initialised: mlp_loss has no body bias
  optimizer = nnx.Optimizer(model, optax.chain(samjax.lsam(0.3), optax.sgd(0.5)), wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grad_fn = jax.grad(lambda p: mlp_loss_nnx(nnx.merge(graphdef, p, rest), x, y))
  optimizer.update(model, grad_fn(params), grad_fn=grad_fn)
  g = np_tree(jax.grad(mlp_loss)(start, x, y))
  phantom_g = np_tree(jax.grad(mlp_loss)(jax.tree.map(jnp.asarray, hand_phantom(np_tree(start), g, 0.3, head_only=True)), x, y))
  want = jax.tree.map(lambda w, d: np.asarray(w) - 0.5 * d, start, phantom_g)
  assert_trees_close(to_dict(model), want)


def mlp_loss_nnx(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


# ---- 10. what a chain can get wrong, and the advice samjax gives ----------------------------------

def sgd_step(tx, params, x, y, jit=True):
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  update = lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn)
  return (jax.jit(update) if jit else update)(tx.init(params))


@pytest.mark.parametrize('optimizer,first_step', [
    (optax.sgd(0.1), 0.1), (optax.sgd(0.1, momentum=0.9), 0.1),
    (optax.sgd(0.1, momentum=0.9, nesterov=True), 0.19)])  # nesterov: g + 0.9 g at step one
@pytest.mark.parametrize('jit', [False, True])
def test_sam_after_an_optimizer_raises_and_sam_first_works(optimizer, first_step, jit):
  params, x, y = setup(seed=15)
  with pytest.raises(Exception, match=r'sam is placed after an optimizer.*Put sam first'):
    jax.block_until_ready(sgd_step(optax.chain(optimizer, samjax.sam(0.05)), params, x, y, jit))
  out, _ = sgd_step(optax.chain(samjax.sam(0.05), optimizer), params, x, y, jit)
  g = np_tree(jax.grad(mlp_loss)(params, x, y))
  phantom_g = np_tree(jax.grad(mlp_loss)(jax.tree.map(jnp.asarray, hand_phantom(
      np_tree(params), g, 0.05)), x, y))
  assert_trees_close(out, jax.tree.map(lambda v: -first_step * v, phantom_g))
  assert float(mlp_loss(optax.apply_updates(params, out), x, y)) < float(mlp_loss(params, x, y))


def test_decay_before_sam_is_dropped_and_after_sam_is_applied():
  """What sam's docstring says in its first paragraph: decay goes after sam."""
  params, x, y = setup(seed=16)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  run = lambda tx: tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]
  plain = run(optax.chain(samjax.sam(0.2), optax.sgd(1.0)))
  before = run(optax.chain(optax.add_decayed_weights(0.1), samjax.sam(0.2), optax.sgd(1.0)))
  after = run(optax.chain(samjax.sam(0.2), optax.add_decayed_weights(0.1), optax.sgd(1.0)))
  g = np_tree(grad_fn(params))
  phantom_g = np_tree(grad_fn(jax.tree.map(jnp.asarray, hand_phantom(np_tree(params), g, 0.2))))
  assert_trees_close(plain, jax.tree.map(lambda v: -v, phantom_g))
  assert_trees_close(after, jax.tree.map(lambda v, w: -(v + 0.1 * np.asarray(w)), phantom_g,
                                         params))
  # Before sam the decay only tilts the ascent direction and is then dropped.
  assert not np.allclose(np.asarray(before['body']['w']), np.asarray(after['body']['w']))
  for factory in (samjax.sam, samjax.lsam):
    first_paragraph = factory.__doc__.split('\n\n')[1]
    assert 'add_decayed_weights' in first_paragraph and 'first' in first_paragraph


@pytest.mark.parametrize('bad_rho', [-0.1, float('nan')])
def test_a_bad_rho_under_jit_raises_and_a_good_one_resumes(bad_rho):
  params, x, y = setup(seed=17)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  tx = optax.chain(optax.inject_hyperparams(samjax.sam)(rho=0.05), optax.sgd(0.5))
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  state = tx.init(params)
  _, state = step(params, state)
  state[0].hyperparams['rho'] = jnp.asarray(bad_rho)
  with pytest.raises(Exception, match=r'sam: rho = (-0.1|nan) at step 1 .*finite and >= 0'):
    jax.block_until_ready(step(params, state))
  state[0].hyperparams['rho'] = jnp.asarray(0.2)
  out, _ = step(params, state)
  g = np_tree(grad_fn(params))
  phantom_g = np_tree(grad_fn(jax.tree.map(jnp.asarray, hand_phantom(np_tree(params), g, 0.2))))
  assert_trees_close(out, jax.tree.map(lambda v: -0.5 * v, phantom_g))


def test_a_bad_rho_set_eagerly_is_refused_at_once():
  params, x, y = setup(seed=17)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  tx = optax.inject_hyperparams(samjax.sam)(rho=0.05)
  state = tx.init(params)
  state.hyperparams['rho'] = jnp.asarray(-1.0)
  with pytest.raises(ValueError, match='rho'):
    tx.update(grad_fn(params), state, params, grad_fn=grad_fn)


def group_labels(params):
  return {'body': jax.tree.map(lambda _: 'body', params['body']),
          'head': jax.tree.map(lambda _: 'head', params['head'])}


@pytest.mark.parametrize('wrapper', ['masked', 'multi_transform', 'partition'])
def test_sam_inside_a_partition_is_refused_and_mask_first_is_exact(wrapper):
  params, x, y = setup(seed=18)
  head_sam = optax.chain(samjax.sam(0.3), optax.sgd(0.5))
  if wrapper == 'masked':
    tx = optax.masked(head_sam, {'body': False, 'head': True})
  else:
    combine = getattr(optax, wrapper)
    tx = combine({'head': head_sam, 'body': optax.sgd(0.1)}, group_labels)
  with pytest.raises(ValueError, match=r'optax.masked, optax.multi_transform or optax.partition.*'
                     r'samjax.sam\(rho, mask=group_mask\)'):
    sgd_step(tx, params, x, y, jit=False)
  # The advice: perturb the head, then give each group its own optimizer.
  tx = optax.chain(samjax.sam(0.3, mask={'body': False, 'head': True}),
                   optax.partition({'head': optax.sgd(0.5), 'body': optax.sgd(0.1)},
                                   group_labels))
  out, _ = sgd_step(tx, params, x, y)
  g = np_tree(jax.grad(mlp_loss)(params, x, y))
  phantom_g = np_tree(jax.grad(mlp_loss)(jax.tree.map(jnp.asarray, hand_phantom(
      np_tree(params), g, 0.3, head_only=True)), x, y))
  assert_trees_close(out, {'body': jax.tree.map(lambda v: -0.1 * v, phantom_g['body']),
                           'head': jax.tree.map(lambda v: -0.5 * v, phantom_g['head'])})


def test_per_device_grad_outside_a_mapped_axis_advises_what_works():
  params, x, y = setup(seed=19)
  with pytest.raises(ValueError, match=r"axis 'data' is not bound.*use jax.grad\(fun\) "
                     r"\(or per_device_grad\(fun, None\)\)"):
    samjax.per_device_grad(mlp_loss, 'data')(params, x, y)
  want = jax.grad(mlp_loss)(params, x, y)
  assert_trees_close(samjax.per_device_grad(mlp_loss, None)(params, x, y), want, rtol=0, atol=0)


@pytest.mark.parametrize('has_aux', [False, True])
def test_value_and_grad_as_grad_fn_is_told_to_use_grad(has_aux):
  params, x, y = setup(seed=20)
  loss = (lambda p: (mlp_loss(p, x, y), {'n': 1})) if has_aux else (lambda p: mlp_loss(p, x, y))
  tx = samjax.sam(0.1, has_aux=has_aux)
  wrong = jax.value_and_grad(loss, has_aux=has_aux)
  with pytest.raises(ValueError, match=r'as jax.value_and_grad does.*jax.grad\(loss_fn'):
    tx.update(jax.grad(loss, has_aux=has_aux)(params)[0] if has_aux else jax.grad(loss)(params),
              tx.init(params), params, grad_fn=wrong)
  right = jax.grad(loss, has_aux=has_aux)  # the advice
  g = right(params)[0] if has_aux else right(params)
  out, _ = tx.update(g, tx.init(params), params, grad_fn=right)
  phantom_g = jax.grad(mlp_loss)(jax.tree.map(jnp.asarray, hand_phantom(
      np_tree(params), np_tree(g), 0.1)), x, y)
  assert_trees_close(out, phantom_g)


def test_callable_mask_under_inject_hyperparams_is_told_to_be_static():
  params, x, y = setup(seed=21)
  head = lambda p: samjax.head_mask(p)
  with pytest.raises(ValueError, match=r"static_args=\('mask',\)"):
    optax.inject_hyperparams(samjax.sam)(rho=0.1, mask=head).init(params)
  tx = optax.inject_hyperparams(samjax.sam, static_args=('mask',))(rho=0.1, mask=head)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)
  out, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  want = grad_fn(jax.tree.map(jnp.asarray, hand_phantom(np_tree(params), np_tree(
      grad_fn(params)), 0.1, head_only=True)))
  assert_trees_close(out, want)


def test_docstrings_carry_the_composition_rules():
  for text in (samjax.sam.__doc__, samjax.lsam.__doc__):
    for needle in ('first', 'MultiSteps', 'accumulated_grad'):
      assert needle in text, needle
  for needle in ('optax.contrib.sam', 'multi_transform', 'mask=', 'axis_name', 'eps',
                 'grad_fn(params, i)', 'inject_hyperparams', 'clip'):
    assert needle in samjax.sam.__doc__, needle
  assert 'sync_perturbation=False' in samjax.SamState.__doc__


def test_nnx_with_batchnorm_and_dropout_keeps_the_clean_pass_state():
  """The README's NNX recipe: SAM's update, the clean pass's statistics and one RNG draw."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.body, self.norm = nnx.Linear(5, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs)
      self.drop, self.head = nnx.Dropout(0.5, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(self.drop(jnp.tanh(self.norm(self.body(x)))))

  _, x, y = setup(seed=22)
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(samjax.sam(0.3, has_aux=True), optax.sgd(0.5)),
                            wrt=nnx.Param)
  graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
  loss_at = lambda p: mlp_loss_nnx(nnx.merge(graphdef, p, rest0, copy=True), x, y)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_and_state(params):
      at = nnx.merge(graphdef, params, rest, copy=True)
      return mlp_loss_nnx(at, x, y), nnx.state(at, nnx.Not(nnx.Param))

    grad_fn = jax.grad(loss_and_state, has_aux=True)
    grads, new_rest = grad_fn(params)
    optimizer.update(model, grads, grad_fn=grad_fn)
    nnx.update(model, new_rest)

  # By hand, before the step: theta - 0.5 grad L(theta~), the phantom's pass with the clean
  # pass's dropout mask (the same RNG state).
  start = np_tree(nnx.to_pure_dict(params0))
  count0 = int(rest0['drop']['rngs']['count'][...])
  g = jax.grad(loss_at)(params0)
  norm = flat_norm(nnx.to_pure_dict(g))
  phantom_state = jax.tree.map(lambda p, v: p + 0.3 * v / norm, params0, g)
  phantom_g = np_tree(nnx.to_pure_dict(jax.grad(loss_at)(phantom_state)))
  train_step(model, optimizer)
  want = jax.tree.map(lambda p, d: np.asarray(p) - 0.5 * d, start, phantom_g)
  assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), want, rtol=1e-4, atol=1e-6)
  # BatchNorm: the running mean moved by the clean pass's batch mean (momentum 0.99).
  h = np.asarray(x) @ np.asarray(start['body']['kernel']) + np.asarray(start['body']['bias'])
  np.testing.assert_allclose(model.norm.mean[...], 0.01 * h.mean(axis=0), rtol=1e-5, atol=1e-7)
  # Dropout: one draw per step (the clean pass), not two.
  assert int(model.drop.rngs.count[...]) == count0 + 1


def test_the_run_time_checks_hold_under_vmap():
  """A vmapped sweep (one check per step for the whole batch) still raises on a bad member."""
  params, x, y = setup(seed=23)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, x, y)

  def step(rho, sam_first=True):
    parts = [samjax.sam(rho), optax.sgd(0.1)]
    tx = optax.chain(*(parts if sam_first else parts[::-1]))
    return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]

  good = jax.jit(jax.vmap(step))(jnp.array([0.05, 0.2]))
  g = np_tree(grad_fn(params))
  for i, rho in enumerate((0.05, 0.2)):
    phantom_g = np_tree(grad_fn(jax.tree.map(jnp.asarray, hand_phantom(np_tree(params), g, rho))))
    assert_trees_close(jax.tree.map(lambda v, i=i: v[i], good),
                       jax.tree.map(lambda v: -0.1 * v, phantom_g))
  with pytest.raises(Exception, match=r'sam: rho = -0.2 at step 0'):
    jax.block_until_ready(jax.jit(jax.vmap(step))(jnp.array([0.05, -0.2])))
  with pytest.raises(Exception, match=r'sam is placed after an optimizer'):
    jax.block_until_ready(jax.jit(jax.vmap(lambda r: step(r, sam_first=False)))(
        jnp.array([0.05, 0.2])))


@pytest.mark.parametrize('optimizer', [optax.adam(1e-3), optax.adamw(1e-3, weight_decay=1e-2)])
def test_an_adaptive_optimizer_before_sam_raises(optimizer):
  """Adam's first step is about -lr sign(g): cosine -0.67 to -0.72 here, below -0.5."""
  params, x, y = setup(seed=24)
  with pytest.raises(Exception, match=r'sam is placed after an optimizer'):
    jax.block_until_ready(sgd_step(optax.chain(optimizer, samjax.sam(0.05)), params, x, y))

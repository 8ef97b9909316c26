"""The toy's update rules against their equations, and the vmapped sweep against single runs.

Every function under test is jitted once per static setup and shared across
tests: on CPU, compiling a whole function is much cheaper than compiling each
of its operations eagerly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samjax
from samjax.toy import data as toy_data
from samjax.toy import metrics as toy_metrics
from samjax.toy import model as toy_model
from samjax.toy import probe as toy_probe
from samjax.toy import train as toy_train

LR = 0.1
RHO = 0.7
RATIO = 3.0


def make_setup(method, **kwargs):
  return toy_train.TrainSetup(program=toy_train.PROGRAMS[method], hidden=8, batch_size=5,
                              num_train=10, num_probe=64, **kwargs)


def make_spec(seed=0, rho=RHO, ratio=RATIO, complexity=360.0, method='lsam', **kwargs):
  return toy_train.make_spec(seed=seed, rho=rho, fixed_ratio=ratio, complexity=complexity,
                             method=method, **{'learning_rate': LR, **kwargs})


params_and_data = jax.jit(toy_train.init_params_and_data, static_argnums=1,
                          compiler_options={'xla_backend_optimization_level': 0})
train_step = jax.jit(toy_train.train_step, static_argnums=3)
batch_at = jax.jit(toy_train.batch_at, static_argnums=2)


def loss(params, x, y, setup):
  return toy_train.batch_loss(params, x, y, setup)


grad_loss = jax.jit(jax.grad(loss), static_argnums=3)


def initial(method, spec=None, head=(1.3, 0.4), **setup_kwargs):
  """A fresh run with its head moved away from (1, 1), and its first batch."""
  setup = make_setup(method, **setup_kwargs)
  spec = make_spec(method=method) if spec is None else spec
  params, data = params_and_data(spec, make_setup('sgd'))  # the same for every method
  if head is not None:
    params = toy_model.with_head_weights(params, jnp.array(head))
  state = toy_train.init_state(params, spec, setup)
  x, y = batch_at(data, state.step, setup)
  return setup, spec, state, data, x, y


def assert_trees_close(a, b, **kwargs):
  kwargs = {'rtol': 1e-5, 'atol': 1e-6, **kwargs}
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, **kwargs), a, b)


def descent(params, grads):
  return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def test_model_head_is_v_and_f_is_v_dot_phi():
  setup, _, state, _, x, _ = initial('sgd')
  logits, features = setup.model.apply({'params': state.params}, x, return_features=True)
  v = toy_model.head_weights(state.params)
  np.testing.assert_allclose(logits, features @ v, rtol=1e-5, atol=1e-6)
  mask = samjax.head_mask(state.params)
  assert jax.tree.leaves(mask['head']) == [True]
  assert not any(jax.tree.leaves(mask['phi_easy'])) and not any(jax.tree.leaves(mask['phi_hard']))


def test_sgd_step_is_plain_gradient_descent():
  """SGD runs in LSAM's program at rho = 0: the phantom is v itself."""
  setup, spec, state, data, x, y = initial('sgd', spec=make_spec(rho=0.0, method='sgd'))
  assert setup.program == 'lsam'
  new_state, stats = train_step(state, data, spec, setup)
  assert_trees_close(new_state.params, descent(state.params, grad_loss(state.params, x, y, setup)))
  np.testing.assert_allclose(stats.phantom_ratio, stats.real_ratio)
  np.testing.assert_allclose([stats.lr_scale_easy, stats.lr_scale_hard], [1.0, 1.0])


def test_lsam_step_equals_the_phantom_equations():
  """v~ = v + rho g_v / ||g_v||; every parameter steps along grad L_B(theta, v~) (Eq. 5)."""
  setup, spec, state, data, x, y = initial('lsam')
  new_state, stats = train_step(state, data, spec, setup)
  params = state.params
  g_v = toy_model.head_weights(grad_loss(params, x, y, setup))
  v = toy_model.head_weights(params)
  v_phantom = v + RHO * g_v / jnp.linalg.norm(g_v)
  phantom_grads = grad_loss(toy_model.with_head_weights(params, v_phantom), x, y, setup)
  assert_trees_close(new_state.params, descent(params, phantom_grads))
  # the representation's gradient really is taken at v~, not at v
  plain = grad_loss(params, x, y, setup)
  assert not np.allclose(phantom_grads['phi_hard']['dense_0']['kernel'],
                         plain['phi_hard']['dense_0']['kernel'], rtol=1e-3)
  # the step's statistics describe this very phantom
  np.testing.assert_allclose(stats.phantom_ratio, v_phantom[1] / v_phantom[0], rtol=1e-5)
  np.testing.assert_allclose(stats.lr_scale_easy, v_phantom[0] / v[0], rtol=1e-5)
  np.testing.assert_allclose(stats.lr_scale_hard, v_phantom[1] / v[1], rtol=1e-5)
  np.testing.assert_allclose(stats.real_ratio, v[1] / v[0], rtol=1e-6)


@functools.partial(jax.jit, static_argnums=3)
def reference_lsam_update(params, x, y, setup, rho):
  """One step of optax.chain(samjax.lsam(rho), optax.sgd(LR)), the library's LSAM."""
  grad_fn = lambda p: jax.grad(loss)(p, x, y, setup)
  tx = optax.chain(samjax.lsam(rho), optax.sgd(LR))
  updates, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  return optax.apply_updates(params, updates)


def test_lsam_step_is_the_samjax_optax_chain_step():
  setup, spec, state, data, x, y = initial('lsam')
  new_state, _ = train_step(state, data, spec, setup)
  assert_trees_close(new_state.params, reference_lsam_update(state.params, x, y, setup, spec.rho),
                     rtol=1e-5, atol=1e-7)


def test_clip_at_zero():
  v = jnp.array([1.0, -2.0, 0.5, -0.1])
  phantom = jnp.array([-0.3, -1.0, 0.2, 0.4])
  np.testing.assert_array_equal(toy_train.clip_at_zero(v, phantom), np.float32([0, -1, 0.2, 0]))


def test_lsam_noflip_clips_the_phantom_and_descends_at_it():
  """A radius large enough to flip v~_easy: noflip steps along grad L(theta, clip(v~))."""
  rho = 4.0
  setup, spec, state, data, x, y = initial('lsam_noflip', spec=make_spec(rho=rho,
                                                                         method='lsam_noflip'))
  new_state, stats = train_step(state, data, spec, setup)
  params = state.params
  g_v = toy_model.head_weights(grad_loss(params, x, y, setup))
  v = toy_model.head_weights(params)
  v_phantom = np.asarray(v + rho * g_v / jnp.linalg.norm(g_v))
  assert (np.sign(v_phantom) != np.sign(v)).any(), 'the test needs a flip to clip'
  clipped = np.where(np.sign(v_phantom) == np.sign(v), v_phantom, 0.0)
  expected = descent(params, grad_loss(toy_model.with_head_weights(params, jnp.array(clipped)),
                                       x, y, setup))
  assert_trees_close(new_state.params, expected)
  np.testing.assert_allclose([stats.phantom_easy, stats.phantom_hard], clipped, rtol=1e-5,
                             atol=1e-7)
  # LSAM at the same radius flips instead, and so moves differently
  lsam_state, lsam_stats = train_step(state, data, make_spec(rho=rho, method='lsam'), setup)
  assert float(lsam_stats.phantom_easy) * float(v[0]) < 0 or \
      float(lsam_stats.phantom_hard) * float(v[1]) < 0
  assert not np.allclose(lsam_state.params['phi_easy']['dense_2']['kernel'],
                         new_state.params['phi_easy']['dense_2']['kernel'])


def test_lsam_noflip_equals_lsam_without_a_flip():
  setup, _, state, data, _, _ = initial('lsam')
  small = dict(rho=0.05)
  a, _ = train_step(state, data, make_spec(method='lsam', **small), setup)
  b, _ = train_step(state, data, make_spec(method='lsam_noflip', **small), setup)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_head_init_scale_and_random():
  """head_init scales v; head_random draws a signed v uniform in +-head_init/sqrt(2) (torch's
  nn.Linear bound 1/sqrt(fan_in), fan_in = 2) per seed; neither moves the MLPs."""
  setup = make_setup('sgd')
  base, _ = params_and_data(make_spec(seed=3), setup)
  scaled, data = params_and_data(make_spec(seed=3, head_init=2.5), setup)
  np.testing.assert_allclose(toy_model.head_weights(scaled), [2.5, 2.5])
  np.testing.assert_allclose(data.initial_head, [2.5, 2.5])
  heads = []
  for seed in (3, 4):
    random, data = params_and_data(make_spec(seed=seed, head_init=2.0, head_random=True), setup)
    v = np.asarray(toy_model.head_weights(random))
    np.testing.assert_allclose(v, data.initial_head)
    assert (np.abs(v) <= 2.0 / np.sqrt(2.0)).all() and not np.allclose(v[0], v[1])
    heads.append(v)
  assert not np.allclose(heads[0], heads[1])
  # Over many seeds the draw is uniform on [-b, b]: mean 0, variance b^2 / 3, both signs.
  many = np.stack([params_and_data(make_spec(seed=s, head_random=True), setup)[1].initial_head
                   for s in range(200)])
  bound = 1 / np.sqrt(2.0)
  assert np.abs(many).max() <= bound and (many < 0).any() and (many > 0).any()
  assert abs(many.mean()) < 0.06 and many.var() == pytest.approx(bound**2 / 3, rel=0.2)
  for tree in (scaled, random):
    assert_trees_close({k: tree[k] for k in ('phi_easy', 'phi_hard')},
                       {k: params_and_data(make_spec(seed=3 if tree is scaled else 4), setup)[0][k]
                        for k in ('phi_easy', 'phi_hard')}, rtol=0, atol=0)
  del base


def test_sam_step_perturbs_every_parameter():
  setup, spec, state, data, x, y = initial('sam', spec=make_spec(rho=0.2, method='sam'))
  new_state, _ = train_step(state, data, spec, setup)
  grads = grad_loss(state.params, x, y, setup)
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
  phantom = jax.tree.map(lambda p, g: p + 0.2 * g / norm, state.params, grads)
  expected = descent(state.params, grad_loss(phantom, x, y, setup))
  assert_trees_close(new_state.params, expected, rtol=1e-4, atol=1e-6)


def test_fixed_ratio_head_fixes_the_ratio_and_the_norm():
  v_hat = toy_train.fixed_ratio_head(jnp.float32(3.0), jnp.float32(4.0))
  np.testing.assert_allclose(v_hat[1] / v_hat[0], 4.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(v_hat), 3.0, rtol=1e-6)


def tracking_head(v, ratio):
  """v^ of intervention_norm='tracking': ||v^|| = ||v||."""
  return toy_train.fixed_ratio_head(jnp.linalg.norm(v), ratio)


@functools.partial(jax.jit, static_argnums=3)
def implemented_intervention_grads(params, x, y, setup, ratio):
  """``{method: toy_train.intervention_grads}`` for the three interventions (tracking v^)."""
  v_hat = tracking_head(toy_model.head_weights(params), ratio)
  return {m: toy_train.intervention_grads(params, x, y, v_hat, fix_importance=flags[0],
                                          fix_feature_lr=flags[1], setup=setup)
          for m, flags in toy_train.INTERVENTIONS.items()}


@functools.partial(jax.jit, static_argnums=3)
def equation_intervention_grads(params, x, y, setup, ratio):
  """Eqs. 8-10 written out with per-example Jacobians of phi; the head's gradient is
  the ordinary -y sigma(-y v.Phi) Phi (see samjax/toy/train.py)."""
  v = toy_model.head_weights(params)
  v_hat = jnp.linalg.norm(v) * jnp.array([1.0, ratio]) / jnp.sqrt(1 + ratio**2)

  def features(p, xi):
    return setup.model.apply({'params': p}, xi[None], return_features=True)[1][0]  # [2]

  def per_example(xi, yi, w_iw, w_lr):
    phi = features(params, xi)
    jac = jax.jacrev(features)(params, xi)  # leaves [2, ...]: grad phi_easy, grad phi_hard
    importance = jax.nn.sigmoid(-yi * jnp.dot(w_iw, phi))
    grads = jax.tree.map(lambda j: -yi * importance * (w_lr[0] * j[0] + w_lr[1] * j[1]), jac)
    grads['head'] = {'kernel': (-yi * jax.nn.sigmoid(-yi * jnp.dot(v, phi)) * phi)[:, None]}
    return grads

  heads = {'iw_only': (v_hat, v), 'lr_only': (v, v_hat), 'iw_lr': (v_hat, v_hat),
           'neither': (v, v)}
  batch = jax.vmap(per_example, in_axes=(0, 0, None, None))
  return {method: jax.tree.map(lambda g: jnp.mean(g, axis=0), batch(x, y, w_iw, w_lr))
          for method, (w_iw, w_lr) in heads.items()}


def test_intervention_gradients_match_their_equations():
  setup, _, state, _, x, y = initial('iw_lr')
  got = implemented_intervention_grads(state.params, x, y, setup, jnp.float32(RATIO))
  want = equation_intervention_grads(state.params, x, y, setup, jnp.float32(RATIO))
  plain = grad_loss(state.params, x, y, setup)
  # the equation with nothing fixed is the logistic-loss gradient (Eq. 6)
  assert_trees_close(want['neither'], plain, rtol=1e-4, atol=1e-6)
  for method in toy_train.INTERVENTIONS:
    assert_trees_close(got[method], want[method], rtol=1e-4, atol=1e-6)
    # ... and differs from the plain gradient, so the comparison can fail
    assert not np.allclose(got[method]['phi_hard']['dense_2']['kernel'],
                           plain['phi_hard']['dense_2']['kernel'], rtol=1e-3)


def test_intervention_at_the_real_ratio_is_sgd():
  setup, _, state, _, x, y = initial('iw_lr')
  v = toy_model.head_weights(state.params)
  got = implemented_intervention_grads(state.params, x, y, setup, v[1] / v[0])
  for method in toy_train.INTERVENTIONS:
    assert_trees_close(got[method], grad_loss(state.params, x, y, setup), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('norm', toy_train.INTERVENTION_NORMS)
def test_intervention_step_uses_its_gradient(norm):
  setup, spec, state, data, x, y = initial('lr_only', intervention_norm=norm)
  new_state, stats = train_step(state, data, spec, setup)
  v = toy_model.head_weights(state.params)
  # 'initial': Appendix C's fixed v^, at the length of the run's initial head (1, 1)
  length = jnp.linalg.norm(v) if norm == 'tracking' else jnp.sqrt(2.0)
  v_hat = toy_train.fixed_ratio_head(length, jnp.float32(RATIO))
  grads = toy_train.intervention_grads(state.params, x, y, v_hat, fix_importance=False,
                                       fix_feature_lr=True, setup=setup)
  assert_trees_close(new_state.params, descent(state.params, grads))
  np.testing.assert_allclose(stats.phantom_ratio, RATIO, rtol=1e-5)
  np.testing.assert_allclose(np.hypot(stats.phantom_easy, stats.phantom_hard), length, rtol=1e-5)


def test_fixed_intervention_head_stays_fixed_over_a_chunk():
  setup, spec, state, data, _, _ = initial('iw_lr', spec=make_spec(method='iw_lr'))
  chunk = jax.jit(toy_train.train_chunk, static_argnums=(3, 4))
  state, result = chunk(state, data, spec, setup, 6)
  stats = result.stats
  assert np.ptp(np.asarray(stats.real_easy)) > 0  # v moves ...
  expected = toy_train.fixed_ratio_head(jnp.linalg.norm(data.initial_head), jnp.float32(RATIO))
  np.testing.assert_allclose(stats.phantom_easy, np.full(6, expected[0]), rtol=1e-6)  # ... v^ not
  np.testing.assert_allclose(stats.phantom_hard, np.full(6, expected[1]), rtol=1e-6)


def test_batches_cover_each_epoch_once():
  setup, _, _, data, _, _ = initial('sgd')
  epoch = [np.asarray(batch_at(data, jnp.int32(s), setup)[0]) for s in range(2)]
  rows = {tuple(r) for r in np.concatenate(epoch)}
  assert rows == {tuple(r) for r in np.asarray(data.train_x)}
  np.testing.assert_array_equal(batch_at(data, jnp.int32(1), setup)[0], epoch[1])  # pure in step
  next_epoch = np.asarray(batch_at(data, jnp.int32(2), setup)[0])
  assert not np.array_equal(next_epoch, epoch[0])  # a fresh permutation per epoch


def test_chunk_with_precomputed_epoch_orders_equals_single_steps():
  setup, spec, state, data, _, _ = initial('lsam')
  chunk = jax.jit(toy_train.train_chunk, static_argnums=(3, 4))
  chunked, _ = chunk(state, data, spec, setup, 7)  # 7 steps of 2 per epoch: crosses 4 epochs
  stepped = state
  for _ in range(7):
    stepped, _ = train_step(stepped, data, spec, setup)
  jax.tree.map(np.testing.assert_array_equal, chunked.params, stepped.params)
  assert int(chunked.step) == 7


@pytest.mark.slow
def test_vmapped_sweep_equals_runs_one_at_a_time():
  """SGD, LSAM and LSAM-noflip, different radii, complexities, data constants, learning
  rates and head inits, as one vmapped program."""
  setup = make_setup('lsam')
  specs = [make_spec(seed=0, rho=0.3, complexity=180.0),
           make_spec(seed=1, rho=3.0, complexity=540.0, method='lsam_noflip', head_init=0.7,
                     data=toy_data.ToyDataConstants(easy_scale=2.0, hard_noise=0.1)),
           make_spec(seed=2, rho=0.0, complexity=720.0, method='sgd', head_random=True),
           make_spec(seed=2, rho=1.0, complexity=720.0, learning_rate=0.02)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *specs)
  num_steps = 4
  init, chunk = toy_train.compiled_sweep_fns(setup, num_steps)
  state, data = init(stacked)
  state, result = chunk(state, data, stacked)
  for i, spec in enumerate(specs):
    take = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)
    params, run_data = params_and_data(spec, make_setup('sgd'))
    assert_trees_close(run_data, take(data), rtol=1e-6, atol=1e-6)
    one = toy_train.init_state(params, spec, setup)
    stats = []
    for _ in range(num_steps):
      one, step_stats = train_step(one, run_data, spec, setup)
      stats.append(step_stats)
    assert_trees_close(one.params, take(state.params), rtol=1e-4, atol=1e-6)
    assert_trees_close(jax.tree.map(lambda *a: jnp.stack(a), *stats), take(result.stats),
                       rtol=1e-4, atol=1e-6)


probe_error = jax.jit(toy_probe.probe_error)


def test_threshold_probe():
  key = jax.random.PRNGKey(0)
  labels = jnp.where(jax.random.bernoulli(key, 0.5, (200,)), 1.0, -1.0)
  separable = labels * (1.0 + jax.random.uniform(key, (200,)))
  assert probe_error(separable, labels, separable, labels) == 0.0
  # the direction is learned: the negated feature is as good
  assert probe_error(-separable, labels, -separable, labels) == 0.0
  # a threshold away from zero
  assert probe_error(separable + 5.0, labels, separable + 5.0, labels) == 0.0
  # fitted on one sample, scored on another
  noise = jax.random.normal(jax.random.PRNGKey(1), (200,))
  test_noise = jax.random.normal(jax.random.PRNGKey(2), (200,))
  assert probe_error(noise, labels, test_noise, labels) > 0.3
  half = jnp.where(jnp.arange(200) < 100, labels, -labels)  # half the test labels flipped
  assert probe_error(separable, labels, separable, half) == pytest.approx(0.5)


def test_equal_count_binned_medians_and_spearman():
  values = np.arange(100.0)
  centres, medians = toy_metrics.equal_count_binned_medians(values, 2 * values, num_bins=4)
  np.testing.assert_allclose(centres, [12, 37, 62, 87])
  np.testing.assert_allclose(medians, 2 * centres)
  assert toy_metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert toy_metrics.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)


def test_relative_radius_is_rho_times_the_initial_head_length():
  """rho_relative: the phantom moves v by rho ||v_0|| (checked against the written-out LSAM
  phantom at the absolute radius)."""
  setup, _, state, data, x, y = initial('lsam')
  norm = float(jnp.linalg.norm(data.initial_head))
  relative, _ = train_step(state, data, make_spec(method='lsam', rho=0.3, rho_relative=True),
                           setup)
  absolute, _ = train_step(state, data, make_spec(method='lsam', rho=0.3 * norm), setup)
  assert_trees_close(relative.params, absolute.params, rtol=1e-6, atol=1e-7)
  assert norm == pytest.approx(np.sqrt(2.0))  # the constant head (1, 1)


def test_intervention_head_keeps_the_sign_of_each_coordinate():
  setup = make_setup('iw_lr')
  _, data = params_and_data(make_spec(method='iw_lr'), setup)
  spec = make_spec(method='iw_lr', ratio=3.0)
  v_hat = toy_train.intervention_head(jnp.array([-0.4, 0.2]), spec, data, setup)
  length = float(jnp.linalg.norm(data.initial_head))
  np.testing.assert_allclose(v_hat, [-length / np.sqrt(10), 3 * length / np.sqrt(10)], rtol=1e-6)

"""Importance weights, Lorenz/Gini, per-example gradients and phantom diagnostics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samjax
from samjax import diagnostics


# ----------------------------------------------------------------------------
# Lorenz curve and Gini coefficient.
# ----------------------------------------------------------------------------


def test_uniform_weights_give_diagonal_and_zero_gini():
  w = np.full(6, 0.3, np.float32)
  x, y = diagnostics.lorenz_curve(w)
  np.testing.assert_allclose(x, np.arange(7) / 6, atol=1e-7)
  np.testing.assert_allclose(y, x, atol=1e-6)
  np.testing.assert_allclose(diagnostics.gini(w), 0.0, atol=1e-6)


@pytest.mark.parametrize('n', [1, 2, 5, 40])
def test_single_nonzero_weight_has_gini_n_minus_one_over_n(n):
  w = np.zeros(n, np.float32)
  w[n // 2] = 2.5
  x, y = diagnostics.lorenz_curve(w)
  np.testing.assert_allclose(y, np.r_[0.0, np.ones(n)], atol=1e-7)
  assert x[0] == 0 and x[-1] == 1
  np.testing.assert_allclose(diagnostics.gini(w), (n - 1) / n, atol=1e-6)


def test_hand_computed_lorenz_and_gini():
  # Sorted descending: 4, 3, 1, 0 of total 8.
  x, y = diagnostics.lorenz_curve(np.array([1.0, 3.0, 0.0, 4.0]))
  np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(y, [0, 0.5, 0.875, 1.0, 1.0])
  # sum_{i,j} |w_i - w_j| = 2 * (2 + 1 + 3 + 3 + 1 + 4) = 28; G = 28 / (2 * 4 * 8).
  np.testing.assert_allclose(diagnostics.gini(np.array([1.0, 3.0, 0.0, 4.0])), 28 / 64, rtol=1e-6)


def test_gini_equals_mean_absolute_difference_and_jits():
  w = np.random.default_rng(0).exponential(size=50).astype(np.float32)
  expected = np.abs(w[:, None] - w[None, :]).sum() / (2 * w.size * w.sum())
  np.testing.assert_allclose(diagnostics.gini(w), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(diagnostics.gini)(w), expected, rtol=1e-5)
  _, y = jax.jit(diagnostics.lorenz_curve)(w)
  assert np.all(np.diff(np.asarray(y)) >= 0) and y[-1] == 1.0
  # Concave: the top-k form has decreasing increments.
  assert np.all(np.diff(np.asarray(y), 2) <= 1e-6)


def test_all_zero_weights_are_treated_as_uniform():
  x, y = diagnostics.lorenz_curve(np.zeros(4))
  np.testing.assert_allclose(y, x)
  assert float(diagnostics.gini(np.zeros(4))) == pytest.approx(0.0, abs=1e-7)


def test_lorenz_rejects_non_vector_weights():
  with pytest.raises(ValueError, match='weights'):
    diagnostics.lorenz_curve(np.ones((2, 3)))
  with pytest.raises(ValueError, match='weights'):
    diagnostics.gini(np.ones((0,)))


# ----------------------------------------------------------------------------
# Margins and importance weights.
# ----------------------------------------------------------------------------

BINARY_LOGITS = np.array([2.0, -1.0, 0.0, 0.5, -3.0], np.float32)
BINARY_01 = np.array([1, 1, 0, 0, 0])


@pytest.mark.parametrize(
    'labels', [BINARY_01, 2 * BINARY_01 - 1, (2 * BINARY_01 - 1).astype(np.float32)])
@pytest.mark.parametrize('shape', [(5,), (5, 1)])
def test_binary_importance_weights_match_sigmoid_of_negative_margin(labels, shape):
  y = np.where(BINARY_01 == 1, 1.0, -1.0)
  expected = 1.0 / (1.0 + np.exp(y * BINARY_LOGITS.astype(np.float64)))
  weights = diagnostics.importance_weights(BINARY_LOGITS.reshape(shape), labels)
  assert weights.shape == (5,)
  np.testing.assert_allclose(weights, expected, rtol=1e-6)
  # The logistic loss is softplus(-margin).
  np.testing.assert_allclose(
      jax.nn.softplus(-diagnostics.margins(BINARY_LOGITS.reshape(shape), labels)),
      optax.sigmoid_binary_cross_entropy(BINARY_LOGITS, BINARY_01.astype(np.float32)), rtol=1e-6)


def test_multiclass_importance_weights_match_one_minus_softmax():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=6)
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(
      diagnostics.importance_weights(logits, labels), 1 - p[np.arange(6), labels], rtol=1e-5)
  np.testing.assert_allclose(
      jax.nn.softplus(-diagnostics.margins(logits, labels)),
      optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-5)


def test_confident_multiclass_weights_keep_relative_precision():
  # 1 - p_y = 2e^-30 / (1 + 2e^-30): a naive float32 `1 - softmax` returns 0.
  weights = diagnostics.importance_weights(np.array([[30.0, 0.0, 0.0]], np.float32), np.array([0]))
  expected = 2 * np.exp(-30.0) / (1 + 2 * np.exp(-30.0))
  np.testing.assert_allclose(weights, [expected], rtol=1e-5)


def test_two_logit_softmax_weights_equal_binary_weights():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, 2)).astype(np.float32)
  labels = rng.integers(0, 2, size=8)
  softmax_weights = diagnostics.importance_weights(logits, labels)
  # sigma(-(z_y - z_other)) with the binary logit f = z_1 - z_0.
  binary_weights = diagnostics.importance_weights(logits[:, 1] - logits[:, 0], labels)
  np.testing.assert_allclose(softmax_weights, binary_weights, rtol=1e-5)


def test_importance_weights_jit_skips_value_checks():
  logits = np.array([[1.0, np.nan], [0.0, 1.0]], np.float32)
  out = jax.jit(diagnostics.importance_weights)(logits, np.array([0, 1]))
  assert out.shape == (2,)  # no host check under jit: NaN propagates instead of raising
  with pytest.raises(ValueError, match='logits'):
    diagnostics.importance_weights(logits, np.array([0, 1]))


@pytest.mark.parametrize('logits,labels,name', [
    (np.zeros((4, 3)), np.zeros(5, int), 'labels'),
    (np.zeros((4,)), np.zeros((4, 1), int), 'labels'),
    (np.zeros((4, 3, 2)), np.zeros(4, int), 'logits'),
    (np.array([0.0, np.nan]), np.array([0, 1]), 'logits'),
    (np.zeros((2, 3)), np.array([0, 3]), 'labels'),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), 'labels'),
    (np.zeros(3), np.array([0, 1, 2]), 'labels'),
    (np.zeros(3), np.array([-1, 0, 1]), 'labels'),
])
def test_importance_weights_reject_bad_input(logits, labels, name):
  with pytest.raises(ValueError, match=name):
    diagnostics.importance_weights(logits, labels)


# ----------------------------------------------------------------------------
# Per-example gradients on a small flax MLP.
# ----------------------------------------------------------------------------


class MLP(nn.Module):
  num_outputs: int

  @nn.compact
  def __call__(self, x, return_features=False):
    features = nn.relu(nn.Dense(8)(x))
    logits = nn.Dense(self.num_outputs, name='head')(features)
    return (logits, features) if return_features else logits


def make_problem(num_outputs=3, n=7, seed=0):
  model = MLP(num_outputs)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  num_classes = max(num_outputs, 2)
  y = rng.integers(0, num_classes, size=n).astype(np.int32)
  params = model.init(jax.random.key(seed), x[:1])['params']
  return model, params, x, y


def batch_loss(model):
  def loss_fn(params, batch):
    logits = model.apply({'params': params}, batch['x'])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']))
  return loss_fn


def loop_grads(model, params, x, y):
  """Reference: one example at a time, *without* a batch axis."""
  def single_loss(p, xi, yi):
    logits = model.apply({'params': p}, xi)  # [k]
    return -jax.nn.log_softmax(logits)[yi]
  grad_fn = jax.jit(jax.grad(single_loss))
  return [grad_fn(params, x[i], y[i]) for i in range(x.shape[0])]


def flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


def test_per_example_grads_match_loop_and_chunking():
  model, params, x, y = make_problem()
  batch = {'x': x, 'y': y}
  expected = loop_grads(model, params, x, y)
  # Jitted: one compilation is cheaper than eager dispatch's many on 2 CPU cores.
  grads_fn = jax.jit(diagnostics.per_example_grads, static_argnums=0, static_argnames='chunk_size')
  full = grads_fn(batch_loss(model), params, batch)
  chunked = grads_fn(batch_loss(model), params, batch, chunk_size=3)  # chunks of 3 + 3 + 1
  for i, g in enumerate(expected):
    np.testing.assert_allclose(flat(jax.tree.map(lambda v: v[i], full)), flat(g), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The mean of per-example gradients is the batch gradient.
  mean = jax.tree.map(lambda v: v.mean(0), full)
  np.testing.assert_allclose(flat(mean), flat(jax.jit(jax.grad(batch_loss(model)))(params, batch)),
                             rtol=1e-5, atol=1e-6)


def test_per_example_grad_norms_match_full_grads():
  model, params, x, y = make_problem()
  batch = {'x': x, 'y': y}
  expected = loop_grads(model, params, x, y)
  expected_norms = [np.linalg.norm(flat(g)) for g in expected]
  expected_head = [np.linalg.norm(flat(g['head'])) for g in expected]
  norms_fn = jax.jit(diagnostics.per_example_grad_norms, static_argnums=0,
                     static_argnames=('chunk_size', 'mask'))
  loss_fn = batch_loss(model)
  np.testing.assert_allclose(norms_fn(loss_fn, params, batch), expected_norms, rtol=1e-5)
  np.testing.assert_allclose(norms_fn(loss_fn, params, batch, chunk_size=2), expected_norms, rtol=1e-5)
  np.testing.assert_allclose(
      norms_fn(loss_fn, params, batch, chunk_size=4, mask=samjax.head_mask), expected_head, rtol=1e-5)


@pytest.mark.parametrize('chunk_size', [0, -2, 2.5, True])
def test_per_example_grads_reject_bad_chunk_size(chunk_size):
  model, params, x, y = make_problem()
  for fn in (diagnostics.per_example_grads, diagnostics.per_example_grad_norms):
    with pytest.raises(ValueError, match='chunk_size'):
      fn(batch_loss(model), params, {'x': x, 'y': y}, chunk_size=chunk_size)


def test_per_example_grads_reject_ragged_batch():
  model, params, x, y = make_problem()
  with pytest.raises(ValueError, match='batch'):
    diagnostics.per_example_grads(batch_loss(model), params, {'x': x, 'y': y[:-1]})


# ----------------------------------------------------------------------------
# Phantom diagnostics.
# ----------------------------------------------------------------------------


def np_softmax(z):
  z = np.asarray(z, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_phantom_weights_match_independent_sam_phantom():
  model, params, x, y = make_problem(num_outputs=3, n=9)
  logits_fn = lambda p, inputs: model.apply({'params': p}, inputs)
  rho = 0.5
  # Jitted with the static arguments closed over, as a train or eval step would.
  out = jax.jit(lambda p, xs, ys: diagnostics.phantom_diagnostics(
      logits_fn, p, xs, ys, rho, chunk_size=4))(params, x, y)

  @jax.jit
  def reference_phantom(p):
    grads = jax.grad(batch_loss(model))(p, {'x': x, 'y': y})
    return samjax.phantom_params(p, grads, rho)[0]

  real_w = 1 - np_softmax(logits_fn(params, x))[np.arange(9), y]
  phantom_w = 1 - np_softmax(logits_fn(reference_phantom(params), x))[np.arange(9), y]
  np.testing.assert_allclose(out.weights, real_w, rtol=1e-5)
  np.testing.assert_allclose(out.phantom_weights, phantom_w, rtol=1e-4)
  np.testing.assert_allclose(out.weight_ratio, phantom_w / real_w, rtol=1e-4)
  np.testing.assert_allclose(out.gini, diagnostics.gini(real_w), rtol=1e-5)
  np.testing.assert_allclose(out.phantom_gini, diagnostics.gini(phantom_w), rtol=1e-4)
  np.testing.assert_allclose(out.perturbation_norm, rho, rtol=1e-5)
  # A SAM ascent step raises the batch loss, i.e. the mean log importance weight.
  assert float(np.mean(out.log_weight_ratio)) > 0

  # Feature-gradient norms: ||grad_theta m_i||, m = log(p_y / (1 - p_y)), one example at a time.
  def margin(p, xi, yi):
    log_p = jax.nn.log_softmax(model.apply({'params': p}, xi))[yi]
    return log_p - jnp.log1p(-jnp.exp(log_p))
  margin_grad = jax.jit(jax.grad(margin))
  expected_norms = [np.linalg.norm(flat(margin_grad(params, x[i], y[i]))) for i in range(9)]
  np.testing.assert_allclose(out.feature_grad_norms, expected_norms, rtol=1e-4)


def test_lsam_phantom_and_feature_grad_norm_equal_representation_norm():
  model, params, x, y = make_problem(num_outputs=1, n=6, seed=3)
  logits_fn = lambda p, inputs: model.apply({'params': p}, inputs)
  rho = 0.2
  out = jax.jit(lambda p: diagnostics.phantom_diagnostics(
      logits_fn, p, x, y, rho, mask=samjax.head_mask))(params)

  @jax.jit
  def reference_phantom_logits(p):
    def logistic_loss(q):
      return jnp.mean(optax.sigmoid_binary_cross_entropy(logits_fn(q, x)[:, 0], y.astype(float)))
    phantom, _ = samjax.phantom_params(p, jax.grad(logistic_loss)(p), rho,
                                       mask=samjax.head_mask(p))
    return logits_fn(phantom, x)[:, 0]

  signs = np.where(y == 1, 1.0, -1.0)
  expected = 1 / (1 + np.exp(signs * np.asarray(reference_phantom_logits(params))))
  np.testing.assert_allclose(out.phantom_weights, expected, rtol=1e-5)
  # App. D Eq. 25: under LSAM the feature gradient is grad_(v, b) (y (v.phi + b)) = y (phi, 1).
  _, features = model.apply({'params': params}, x, return_features=True)
  np.testing.assert_allclose(out.feature_grad_norms,
                             np.sqrt(np.sum(np.square(features), 1) + 1), rtol=1e-5)


def test_first_order_prediction_of_log_weight_ratio():
  model, params, x, y = make_problem(num_outputs=3, n=8, seed=4)
  logits_fn = lambda p, inputs: model.apply({'params': p}, inputs)
  out = jax.jit(lambda p: diagnostics.phantom_diagnostics(
      logits_fn, p, x, y, 1e-2, compute_feature_grad_norms=False))(params)
  assert out.feature_grad_norms is None
  np.testing.assert_allclose(out.predicted_log_weight_ratio, out.log_weight_ratio,
                             rtol=5e-2, atol=2e-5)
  assert np.max(np.abs(out.log_weight_ratio)) > 1e-3  # the comparison is not vacuous


def test_phantom_diagnostics_reject_bad_input():
  model, params, x, y = make_problem()
  logits_fn = lambda p, inputs: model.apply({'params': p}, inputs)
  with pytest.raises(ValueError, match='labels'):
    diagnostics.phantom_diagnostics(logits_fn, params, x, y[:-1], 0.1)
  with pytest.raises(ValueError, match='chunk_size'):
    diagnostics.phantom_diagnostics(logits_fn, params, x, y, 0.1, chunk_size=0)
  nan_params = jax.tree.map(lambda v: v * np.nan, params)
  with pytest.raises(ValueError, match='logits'):
    diagnostics.phantom_diagnostics(logits_fn, nan_params, x, y, 0.1)


def test_batch_gini_stats_match_gini_of_weights():
  rng = np.random.default_rng(5)
  clean = rng.normal(size=(16, 3)).astype(np.float32) * 2
  phantom = clean * 0.5
  labels = rng.integers(0, 3, 16)
  stats = jax.jit(diagnostics.batch_gini_stats)(clean, phantom, labels)
  assert set(stats) == {'gini_real', 'gini_phantom'}
  for key, logits in (('gini_real', clean), ('gini_phantom', phantom)):
    weights = 1 - np_softmax(logits)[np.arange(16), labels]
    np.testing.assert_allclose(stats[key], diagnostics.gini(weights), rtol=1e-5)
  # Tempering the logits towards 0 makes the weights more uniform.
  assert stats['gini_phantom'] < stats['gini_real']


# ----------------------------------------------------------------------------
# Signed contributions and binned medians.
# ----------------------------------------------------------------------------


def test_signed_contributions_binary_and_multiclass():
  features = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]], np.float32)
  # Probe logits: -1.25, 1.25, 1.75; signs -, +... from labels 1, 0, 1.
  out = diagnostics.signed_contributions(features, np.array([1, 0, 1]), np.array([0.5, -1.0]), 0.25)
  np.testing.assert_allclose(out, [-1.25, -1.25, 1.75], rtol=1e-6)
  out_col = diagnostics.signed_contributions(features, np.array([1, -1, 1]),
                                             np.array([[0.5], [-1.0]]), np.array([0.25]))
  np.testing.assert_allclose(out_col, [-1.25, -1.25, 1.75], rtol=1e-6)
  w = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], np.float32)
  b = np.array([0.0, 0.1, -0.2], np.float32)
  labels = np.array([0, 1, 2])
  np.testing.assert_allclose(diagnostics.signed_contributions(features, labels, w, b),
                             diagnostics.margins(features @ w + b, labels), rtol=1e-6)
  with pytest.raises(ValueError, match='probe_w'):
    diagnostics.signed_contributions(features, labels, np.ones(3))
  with pytest.raises(ValueError, match='probe_b'):
    diagnostics.signed_contributions(features, labels, w, np.ones(2))


def test_binned_medians_hand_example():
  x = np.array([0.2, 0.4, 0.7, 1.5, 1.2, 1.8, 0.1, 1.9, 5.0])
  y = np.array([0.3, 0.6, 0.2, 0.4, 1.5, 1.1, 1.6, 0.2, 0.5])
  w = np.array([1.0, 5.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 100.0])  # the last point is out of range
  out = diagnostics.binned_medians_2d(x, y, w, 2, x_range=(0, 2), y_range=(0, 2))
  np.testing.assert_array_equal(out.counts, [[3, 1], [2, 2]])
  np.testing.assert_allclose(out.medians, [[3.0, 7.0], [5.0, 5.0]])
  counts, _, _ = np.histogram2d(x, y, bins=2, range=[(0, 2), (0, 2)])
  np.testing.assert_array_equal(out.counts, counts)
  np.testing.assert_allclose(out.x_edges, [0, 1, 2])


def test_binned_medians_match_numpy_and_mark_empty_bins():
  rng = np.random.default_rng(6)
  x = rng.normal(size=60).astype(np.float32)
  y = rng.exponential(size=60).astype(np.float32)
  w = rng.uniform(size=60).astype(np.float32)
  out = jax.jit(diagnostics.binned_medians_2d, static_argnums=3)(x, y, w, (4, 5))
  x_edges, y_edges = np.asarray(out.x_edges), np.asarray(out.y_edges)
  ix = np.clip(np.searchsorted(x_edges, x, side='right') - 1, 0, 3)
  iy = np.clip(np.searchsorted(y_edges, y, side='right') - 1, 0, 4)
  counts, _, _ = np.histogram2d(x, y, bins=[x_edges, y_edges])
  np.testing.assert_array_equal(out.counts, counts)
  assert (out.counts == 0).any()  # exponential y leaves empty cells
  for i in range(4):
    for j in range(5):
      cell = w[(ix == i) & (iy == j)]
      expected = np.median(cell) if cell.size else 0.0
      np.testing.assert_allclose(out.medians[i, j], expected, rtol=1e-6)
  assert np.all(np.isfinite(out.medians))


def test_binned_medians_reject_bad_input():
  x = np.arange(4.0)
  with pytest.raises(ValueError, match='num_bins'):
    diagnostics.binned_medians_2d(x, x, x, 0)
  with pytest.raises(ValueError, match='y'):
    diagnostics.binned_medians_2d(x, x[:3], x, 2)
  with pytest.raises(ValueError, match='weights'):
    diagnostics.binned_medians_2d(x, x, np.array([1.0, np.nan, 0.0, 1.0]), 2)

"""The toy distribution (samjax.toy.data): each feature alone predicts the label,
complexity rotates the spiral, corruptions do what Appendix H says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samjax.toy import data as toy_data

CONSTS = toy_data.ToyDataConstants()
N = 1000
# One compilation for every test (n is static; complexity and corruption are traced).
# LLVM optimisation only slows compiling this small program (see train.py).
sample = jax.jit(toy_data.sample_toy, static_argnums=1,
                 compiler_options={'xla_backend_optimization_level': 0})


def _corruption(label=0.0, gauss=0.0, drop=0.0, hard_only=False):
  f = jnp.float32
  return toy_data.Corruption(f(label), f(gauss), f(drop), f(hard_only))


CLEAN = _corruption()


def nearest_arm(x_hard, complexity, consts=CONSTS):
  """+1 / -1: which spiral arm (densely sampled, noise-free) lies closer to each point."""
  t = np.linspace(consts.hard_min_radius, 1.0, 2000)
  angle = np.deg2rad(complexity) * t
  arm = consts.hard_scale * t[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1)
  x = np.asarray(x_hard)
  d_plus = np.min(np.linalg.norm(x[:, None] - arm[None], axis=-1), axis=1)
  d_minus = np.min(np.linalg.norm(x[:, None] + arm[None], axis=-1), axis=1)
  return np.where(d_plus < d_minus, 1.0, -1.0)


@pytest.mark.parametrize('complexity', [0.0, 180.0, 720.0, 1080.0])
def test_each_feature_alone_predicts_the_label(complexity):
  x, y = sample(jax.random.PRNGKey(0), N, jnp.float32(complexity), CONSTS, CLEAN)
  y = np.asarray(y)
  assert set(np.unique(y)) == {-1.0, 1.0}
  assert 0.35 < np.mean(y > 0) < 0.65
  # easy: the branch of the line, with a gap of 2 * margin * scale around 0
  easy = np.asarray(x[:, :2])
  np.testing.assert_array_equal(np.sign(easy[:, 0]), y)
  assert np.min(np.abs(easy[:, 0])) >= CONSTS.easy_margin * CONSTS.easy_scale - 1e-6
  # hard: the arm of the spiral
  np.testing.assert_array_equal(nearest_arm(x[:, 2:], complexity), y)


def test_hard_feature_is_not_linearly_separable_at_high_complexity():
  x, y = sample(jax.random.PRNGKey(1), N, jnp.float32(720.0), CONSTS, CLEAN)
  hard, y = np.asarray(x[:, 2:]), np.asarray(y)
  # best linear classifier through the origin over a fine grid of directions
  angles = np.linspace(0, np.pi, 360)
  directions = np.stack([np.cos(angles), np.sin(angles)], -1)
  accuracy = np.mean(np.sign(hard @ directions.T) == y[:, None], axis=0)
  assert np.max(np.maximum(accuracy, 1 - accuracy)) < 0.75


def test_complexity_only_rotates_the_spiral():
  key = jax.random.PRNGKey(2)
  x1, y1 = sample(key, N, jnp.float32(90.0), CONSTS, CLEAN)
  x2, y2 = sample(key, N, jnp.float32(540.0), CONSTS, CLEAN)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(x1[:, :2], x2[:, :2])          # easy feature untouched
  assert np.mean(np.abs(np.asarray(x1[:, 2:] - x2[:, 2:]))) > 0.1  # spiral changed
  # a rotation of each point about the origin: radii agree up to the uniform noise
  radius_gap = np.abs(np.linalg.norm(x1[:, 2:], axis=1) - np.linalg.norm(x2[:, 2:], axis=1))
  assert np.max(radius_gap) <= 2 * np.sqrt(2) * CONSTS.hard_noise + 1e-6
  # zero rotation: both arms on the horizontal axis, up to the noise
  x0, _ = sample(key, N, jnp.float32(0.0), CONSTS, CLEAN)
  assert np.max(np.abs(np.asarray(x0[:, 3]))) <= CONSTS.hard_noise + 1e-6


def test_sampling_is_jittable_and_vmaps_over_seed_and_complexity():
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  complexities = jnp.array([0.0, 360.0, 720.0])
  batched = jax.jit(jax.vmap(lambda k, c: toy_data.sample_toy(k, N, c, CONSTS, CLEAN)),
                    compiler_options={'xla_backend_optimization_level': 0})
  xs, ys = batched(keys, complexities)
  for i in range(3):
    x, y = sample(keys[i], N, complexities[i], CONSTS, CLEAN)
    np.testing.assert_allclose(xs[i], x, atol=1e-5)
    np.testing.assert_array_equal(ys[i], y)


def test_zero_corruption_is_the_clean_draw():
  key = jax.random.PRNGKey(4)
  clean = sample(key, N, jnp.float32(360.0), CONSTS, None)
  zero = sample(key, N, jnp.float32(360.0), CONSTS, CLEAN)
  np.testing.assert_array_equal(clean[0], zero[0])


def test_feature_label_noise_flips_features_not_labels():
  key = jax.random.PRNGKey(5)
  x, y = sample(key, N, jnp.float32(360.0), CONSTS, _corruption(label=1.0, hard_only=True))
  _, y_clean = sample(key, N, jnp.float32(360.0), CONSTS, CLEAN)
  np.testing.assert_array_equal(y, y_clean)                        # labels kept
  np.testing.assert_array_equal(np.sign(x[:, 0]), y)                # easy untouched (hard only)
  np.testing.assert_array_equal(nearest_arm(x[:, 2:], 360.0), -np.asarray(y))  # hard flipped
  x, y = sample(key, N, jnp.float32(360.0), CONSTS, _corruption(label=0.1))
  flipped_easy = np.mean(np.sign(x[:, 0]) != y)
  assert 0.07 < flipped_easy < 0.13


def test_dropout_and_gaussian_noise():
  key = jax.random.PRNGKey(6)
  x, _ = sample(key, N, jnp.float32(360.0), CONSTS, _corruption(drop=0.3))
  for k in (0, 1):
    dropped = np.all(np.asarray(x[:, 2 * k:2 * k + 2]) == 0, axis=1)
    assert 0.26 < dropped.mean() < 0.34
  x, _ = sample(key, N, jnp.float32(360.0), CONSTS, _corruption(gauss=0.5, hard_only=True))
  clean, _ = sample(key, N, jnp.float32(360.0), CONSTS, CLEAN)
  np.testing.assert_array_equal(x[:, :2], clean[:, :2])
  assert abs(np.std(np.asarray(x[:, 2:] - clean[:, 2:])) - 0.5) < 0.04

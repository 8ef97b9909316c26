"""A grid trained as one vmapped program equals each of its points trained alone."""

import jax
import numpy as np
import pytest

from experiments import grid_train
from experiments.bench.grids import measure_grid_throughput


@pytest.mark.slow
@pytest.mark.parametrize('method', ['sam', 'lsam'])
def test_vmapped_grid_equals_points_alone(method):
  recipe = grid_train.Recipe(method=method, num_steps=6, batch_size=16, width=4)
  images, labels = grid_train.synthetic_task(64, shape=(16, 8, 1))
  lrs, rhos, seeds = [0.05, 0.2, 0.05], [0.05, 0.05, 0.5], [0, 0, 1]
  params, losses = grid_train.train_grid(recipe, images, labels, lrs, rhos, seeds)
  point = grid_train.compiled_point_trainer(recipe)
  alone = [grid_train.train_point(recipe, images, labels, lr, rho, seed, trainer=point)
           for lr, rho, seed in zip(lrs, rhos, seeds)]
  for g, (p, loss) in enumerate(alone):
    np.testing.assert_allclose(np.asarray(losses[g]), np.asarray(loss), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b, g=g: np.testing.assert_allclose(
        np.asarray(a[g]), np.asarray(b), rtol=1e-4, atol=1e-6), params, p)
  # The points differ (the comparison above could fail): lr, rho and seed all change the run.
  head = np.asarray(params['head']['kernel'])
  assert not np.allclose(head[0], head[1]) and not np.allclose(head[0], head[2])
  other = grid_train.train_point(recipe, images, labels, 0.05, 0.0, 0, trainer=point)[0]
  assert not np.allclose(np.asarray(other['head']['kernel']), head[0])  # rho matters


@pytest.mark.slow
def test_points_of_one_seed_share_init_and_order_across_methods():
  images, labels = grid_train.synthetic_task(64, shape=(16, 8, 1))
  runs = {}
  for method in ('sgd', 'sam'):
    recipe = grid_train.Recipe(method=method, num_steps=1, batch_size=16, width=4)
    runs[method] = grid_train.train_point(recipe, images, labels, 0.1, 0.0, 3)
  # rho = 0: SAM's phantom is theta itself, so one step of SAM is one step of SGD exactly
  # when both start from the same parameters on the same batch.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                                       atol=1e-7), runs['sgd'][0], runs['sam'][0])


@pytest.mark.slow
def test_measure_grid_throughput_reports_both_sides():
  recipe = grid_train.Recipe(method='sgd', num_steps=2, batch_size=8, width=4)
  numbers = measure_grid_throughput(num_points=2, recipe=recipe, num_examples=32)
  for key in ('vmapped_points_per_s_warm', 'sequential_points_per_s_warm',
              'vmapped_over_sequential_cold', 'vmapped_over_sequential_warm'):
    assert numbers[key] > 0


@pytest.mark.slow
def test_initial_params_are_what_every_point_of_the_seed_starts_from():
  images, _ = grid_train.synthetic_task(32, shape=(16, 8, 1))
  for method, lr, rho, seed in (('sgd', 0.1, 0.0, 0), ('sam', 0.05, 0.2, 3)):
    recipe = grid_train.Recipe(method=method, num_steps=2, batch_size=16, width=4)
    # The trainer's carry before its first step: (params, opt_state).
    untrained, _ = grid_train.compiled_point_trainer(recipe).init(
        images[:1], np.float32(lr), np.float32(rho), np.uint32(seed))
    expected = grid_train.initial_params(recipe, images[:1], seed)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 untrained, expected)
  other = grid_train.initial_params(recipe, images[:1], 1)
  assert not np.allclose(np.asarray(other['head']['kernel']),
                         np.asarray(expected['head']['kernel']))

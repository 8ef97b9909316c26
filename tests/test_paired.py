"""Selection on validation error and seed-paired Student-t intervals (experiments/paired.py)."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from experiments import paired


def independent_t_interval(values):
  """The 95 % interval from scipy's one-sample t test (a different code path than paired.py)."""
  interval = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
  return interval.low, interval.high


def test_t_interval_matches_the_closed_form_and_scipy():
  values = [0.03, -0.01, 0.05, 0.02, 0.00, 0.04, -0.02, 0.06]
  low, high = paired.t_interval(values)
  mean, sd = statistics.mean(values), statistics.stdev(values)
  half = 2.364624251592785 * sd / math.sqrt(len(values))  # t_{0.975, 7}
  assert low == pytest.approx(mean - half, abs=1e-12)
  assert high == pytest.approx(mean + half, abs=1e-12)
  assert (low, high) == pytest.approx(independent_t_interval(values), abs=1e-12)


def test_t_interval_needs_two_values():
  with pytest.raises(ValueError, match='at least 2'):
    paired.t_interval([0.1])


def point(method, lr, rho, seed, val_error, hard, val_loss=0.0):
  return {'method': method, 'learning_rate': lr, 'rho': rho, 'seed': seed,
          'val_error': val_error, 'val_loss': val_loss, 'test_error': val_error,
          'hard_probe_error': hard, 'easy_probe_error': 0.0}


def test_selection_uses_validation_only_and_breaks_ties_on_validation_loss():
  points = []
  for seed in range(3):
    # lr 0.1 has the better validation error; lr 0.01 the far better probe: must not matter.
    points.append(point('sam', 0.01, 0.05, seed, 0.20, hard=0.01))
    points.append(point('sam', 0.1, 0.05, seed, 0.10, hard=0.40))
    # Equal validation errors: the lower validation loss decides.
    points.append(point('sgd', 0.01, 0.0, seed, 0.0, hard=0.3, val_loss=0.2))
    points.append(point('sgd', 0.1, 0.0, seed, 0.0, hard=0.3, val_loss=0.1))
  assert paired.select(points, 'sam') == (0.1, 0.05)
  assert paired.select(points, 'sgd') == (0.1, 0.0)


def test_paired_differences_pair_by_seed():
  rng = np.random.default_rng(0)
  points = []
  for seed in range(5):
    base = rng.uniform(0.2, 0.4)
    points.append(point('sgd', 0.05, 0.0, seed, 0.0, hard=base))
    points.append(point('sam', 0.05, 0.1, seed, 0.0, hard=base - 0.01 * seed))
  (record,) = paired.paired_differences(points, 'toyset', ['sam'], ['hard_probe_error'])
  assert record['per_seed_differences'] == pytest.approx([-0.01 * s for s in range(5)])
  assert record['mean'] == pytest.approx(-0.02)
  assert record['ci95'] == pytest.approx(list(independent_t_interval(
      record['per_seed_differences'])))
  assert {k: record[k] for k in ('dataset', 'method', 'metric')} == {
      'dataset': 'toyset', 'method': 'sam', 'metric': 'hard_probe_error'}

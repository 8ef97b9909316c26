"""Selection that names what decided, rho averages and paired records (experiments/paired.py)."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from experiments import paired


def independent_t_interval(values):
  """The 95 % interval from scipy's one-sample t test (a different code path than samjax.stats)."""
  interval = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
  return [interval.low, interval.high]


def point(method, lr, rho, seed, val_error, hard, val_loss=0.0):
  return {'method': method, 'learning_rate': lr, 'rho': rho, 'seed': seed,
          'val_error': val_error, 'val_loss': val_loss, 'test_error': val_error,
          'hard_probe_error': hard, 'easy_probe_error': 0.0}


def test_selection_uses_validation_only_and_names_the_criterion_that_decided():
  points = []
  for seed in range(3):
    # lr 0.1 has the better validation error; lr 0.01 the far better probe: must not matter.
    points.append(point('sam', 0.01, 0.05, seed, 0.20, hard=0.01))
    points.append(point('sam', 0.1, 0.05, seed, 0.10, hard=0.40))
    # Equal validation errors (0, as when the easy digit is fit): the validation loss decides.
    points.append(point('sgd', 0.01, 0.0, seed, 0.0, hard=0.3, val_loss=0.2))
    points.append(point('sgd', 0.1, 0.0, seed, 0.0, hard=0.3, val_loss=0.1))
  sam = paired.select(points, 'sam')
  assert sam['setting'] == (0.1, 0.05) and sam['decided_by'] == 'val_error'
  sgd = paired.select(points, 'sgd')
  assert sgd['setting'] == (0.1, 0.0) and sgd['decided_by'] == 'val_loss'
  assert sgd['tied'] == {'val_error': 2, 'val_loss': 1}
  # At one learning rate a single setting is left: nothing was selected.
  assert paired.select(points, 'sgd', learning_rate=0.01)['decided_by'] == 'only setting'


def test_selection_tied_on_every_criterion_takes_the_smaller_setting_and_says_so():
  points = [point('sam', 0.05, rho, seed, 0.0, hard=0.3) for rho in (0.1, 0.02) for seed in (0, 1)]
  chosen = paired.select(points, 'sam')
  assert chosen['setting'] == (0.05, 0.02) and chosen['decided_by'] == 'order'
  assert chosen['tied'] == {'val_error': 2, 'val_loss': 2}


def test_rho_average_is_per_seed_and_needs_every_rho():
  points = [point('sam', 0.05, rho, seed, 0.0, hard=rho + seed) for rho in (0.02, 0.1)
            for seed in (0, 1)]
  points.append(point('sam', 0.05, 0.02, 2, 0.0, hard=9.0))  # seed 2 lacks rho 0.1
  points.append(point('sam', 0.1, 0.02, 0, 0.0, hard=9.0))  # another learning rate
  averaged = paired.rho_averaged(points, 'sam', 0.05, 'hard_probe_error', (0.02, 0.1))
  assert averaged == pytest.approx({0: 0.06, 1: 1.06})


def test_paired_record_recomputes_from_its_per_seed_differences():
  rng = np.random.default_rng(0)
  base = {s: rng.uniform(0.2, 0.4) for s in range(6)}
  method = {s: base[s] - 0.01 * s + 0.002 * (-1) ** s for s in range(6)}
  method[7] = 0.0  # a seed without a baseline is left out
  record = paired.paired_record(method, base, paper_effect=0.0135, method='sam', lr=0.05,
                                sgd_lr=0.05)
  assert record['seeds'] == list(range(6))
  d = [method[s] - base[s] for s in range(6)]
  assert record['per_seed_differences'] == pytest.approx(d)
  assert record['mean'] == pytest.approx(statistics.mean(d))
  assert record['sd'] == pytest.approx(statistics.stdev(d))
  assert record['ci95'] == pytest.approx(independent_t_interval(d), abs=1e-12)
  # MDE: the effect at which scipy's noncentral t gives the two-sided test 80 % power.
  n, crit = 6, stats.t.ppf(0.975, 5)
  nc = record['mde'] * math.sqrt(n) / record['sd']
  assert stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8)
  assert record['verdict'] == 'improves' and record['ci95'][1] < 0
  assert {k: record[k] for k in ('method', 'lr', 'sgd_lr')} == {
      'method': 'sam', 'lr': 0.05, 'sgd_lr': 0.05}


@pytest.mark.parametrize('interval,expected', [
    ((-0.03, -0.001), 'improves'),
    ((-0.005, 0.02), 'no gain larger than 0.0050'),
    ((0.001, 0.02), 'no gain larger than 0.0000 (worse: interval above 0)'),  # SGD better
    ((0.0, 0.02), 'no gain larger than 0.0000'),
    ((-0.02, 0.01), 'cannot tell'),  # a gain of 0.02 > the paper's 0.0135 is not excluded
])
def test_study_verdict(interval, expected):
  assert paired.study_verdict(interval, 0.0135) == expected

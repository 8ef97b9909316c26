"""samjax.stats against scipy and closed forms computed here."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from samjax import stats


def test_t_interval_equals_scipy_one_sample_interval():
  values = np.random.default_rng(0).normal(0.3, 1.7, size=11)
  expected = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
  np.testing.assert_allclose(stats.t_interval(values), [expected.low, expected.high], rtol=1e-12)
  expected_90 = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.9)
  np.testing.assert_allclose(stats.t_interval(values, 0.9), [expected_90.low, expected_90.high],
                             rtol=1e-12)


def test_t_interval_closed_form_for_two_values():
  # n = 2: mean 1, s = sqrt(2), t_{0.975, 1} = tan(pi * 0.475) (Cauchy quantile).
  half = math.tan(math.pi * 0.475) * math.sqrt(2) / math.sqrt(2)
  np.testing.assert_allclose(stats.t_interval([0.0, 2.0]), [1 - half, 1 + half], rtol=1e-12)


@pytest.mark.parametrize('bad', [[1.0], [0.0, float('nan')], [0.0, float('inf')]])
def test_t_interval_refuses_too_few_or_non_finite_values(bad):
  with pytest.raises(ValueError):
    stats.t_interval(bad)


@pytest.mark.parametrize('interval, direction, expected', [
    ([-0.3, -0.1], 'less', 'held'),
    ([-0.3, 0.0], 'less', 'cannot tell'),
    ([-0.3, 0.2], 'less', 'cannot tell'),
    ([0.0, 0.2], 'less', 'did not hold'),
    ([0.1, 0.2], 'less', 'did not hold'),
    ([0.1, 0.2], 'greater', 'held'),
    ([-0.1, 0.2], 'greater', 'cannot tell'),
    ([-0.2, 0.0], 'greater', 'did not hold'),
    (None, 'less', 'cannot tell'),
])
def test_verdict_needs_the_interval_on_the_claimed_side(interval, direction, expected):
  assert stats.verdict(interval, direction) == expected


def test_verdict_refuses_unknown_direction():
  with pytest.raises(ValueError, match='direction'):
    stats.verdict([0, 1], 'lower')


def test_paired_record_recomputes_from_per_seed():
  differences = [-0.05, -0.02, -0.04, -0.01, -0.03, -0.06, -0.02, -0.04, -0.03, -0.05]
  record = stats.paired(differences, 'less')
  assert record['n_seeds'] == 10
  assert record['estimate'] == pytest.approx(np.mean(differences), abs=1e-15)
  expected = scipy_stats.ttest_1samp(record['per_seed'], 0.0).confidence_interval(0.95)
  np.testing.assert_allclose(record['ci95'], [expected.low, expected.high], rtol=1e-12)
  assert record['verdict'] == 'held'
  assert stats.paired([-0.05, 0.04, -0.01], 'less')['verdict'] == 'cannot tell'


def test_power_matches_simulated_t_tests():
  rng = np.random.default_rng(1)
  n, sd, effect = 8, 0.05, 0.04
  samples = rng.normal(effect, sd, size=(40_000, n))
  t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(n))
  simulated = np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, n - 1))
  assert stats.t_test_power(effect, sd, n) == pytest.approx(simulated, abs=0.01)
  assert stats.t_test_power(0.0, sd, n) == pytest.approx(0.05, abs=1e-12)


@pytest.mark.parametrize('n', [2, 3, 4])
def test_power_and_mde_at_few_seeds_match_simulation(n):
  sd = 0.05
  mde = stats.minimum_detectable_effect(sd, n)
  assert np.isfinite(mde) and mde > 0
  rng = np.random.default_rng(n)
  samples = rng.normal(mde, sd, size=(40_000, n))
  t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(n))
  simulated = np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, n - 1))
  assert simulated == pytest.approx(0.8, abs=0.01)
  assert stats.t_test_power(-mde, sd, n) == pytest.approx(0.8, abs=1e-9)


def test_minimum_detectable_effect():
  sd, n = 0.051, 8
  mde = stats.minimum_detectable_effect(sd, n)
  assert stats.t_test_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
  # Between the normal approximation (too small at n = 8) and t quantiles at both ends (larger).
  normal = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * sd / math.sqrt(n)
  t_both = (scipy_stats.t.ppf(0.975, n - 1) + scipy_stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
  assert normal < mde < t_both * 1.01
  # Large n: the normal approximation.
  big = stats.minimum_detectable_effect(1.0, 20_000)
  assert big == pytest.approx(2.8016 / math.sqrt(20_000), rel=2e-3)


def test_seeds_for_half_width_is_the_smallest():
  sd, target = 0.05, 0.02
  n = stats.seeds_for_half_width(sd, target)
  def half(k):
    return scipy_stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)
  assert half(n) <= target < half(n - 1)


def _contrast_t(numerator, denominator, ratio):
  contrast = np.asarray(numerator) - ratio * np.asarray(denominator)
  return scipy_stats.ttest_1samp(contrast, 0.0).statistic


def test_fieller_bounds_are_where_the_contrast_test_is_critical():
  rng = np.random.default_rng(2)
  denominator = rng.normal(1.0, 0.2, size=12)
  numerator = 0.4 * denominator + rng.normal(0.0, 0.1, size=12)
  lo, hi = stats.fieller_interval(numerator, denominator)
  critical = scipy_stats.t.ppf(0.975, 11)
  assert abs(_contrast_t(numerator, denominator, lo)) == pytest.approx(critical, rel=1e-9)
  assert abs(_contrast_t(numerator, denominator, hi)) == pytest.approx(critical, rel=1e-9)
  ratio = np.mean(numerator) / np.mean(denominator)
  assert lo < ratio < hi
  assert abs(_contrast_t(numerator, denominator, ratio)) < 1e-9


def test_fieller_is_unbounded_when_the_denominator_is_not_significant():
  denominator = [0.1, -0.2, 0.15, -0.05, 0.02]
  numerator = [0.05, 0.0, 0.1, -0.02, 0.01]
  assert stats.fieller_interval(numerator, denominator) is None


def test_bootstrap_ratio_interval_agrees_with_fieller_at_large_n():
  rng = np.random.default_rng(3)
  denominator = rng.normal(1.0, 0.1, size=400)
  numerator = 0.5 * denominator + rng.normal(0.0, 0.05, size=400)
  boot = stats.bootstrap_ratio_interval(numerator, denominator, resamples=4000)
  fieller = stats.fieller_interval(numerator, denominator)
  np.testing.assert_allclose(boot, fieller, atol=0.004)


def test_bootstrap_ratio_is_unbounded_when_resampled_denominators_change_sign():
  assert stats.bootstrap_ratio_interval([0.1, 0.2, 0.0], [0.5, -0.4, 0.1]) is None


def test_ols_equals_scipy_linregress():
  rng = np.random.default_rng(4)
  x = rng.normal(size=30)
  y = 1.5 - 0.7 * x + rng.normal(scale=0.3, size=30)
  beta, errors, r2 = stats.ols(np.stack([np.ones_like(x), x], 1), y)
  fit = scipy_stats.linregress(x, y)
  np.testing.assert_allclose(beta, [fit.intercept, fit.slope], rtol=1e-10)
  np.testing.assert_allclose(errors, [fit.intercept_stderr, fit.stderr], rtol=1e-10)
  assert r2 == pytest.approx(fit.rvalue**2, rel=1e-10)


def test_ols_refuses_rank_deficient_design():
  x = np.ones((5, 2))
  with pytest.raises(ValueError, match='rank'):
    stats.ols(x, np.arange(5.0))

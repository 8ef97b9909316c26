"""Statistics of seed-paired studies: intervals, verdicts, power.

One implementation, used by the toy study's report (:mod:`samjax.toy.report`) and by the
real-data study (:mod:`experiments.paired`). Everything works on per-seed values, so every
number a report states recomputes from the ``per_seed`` list stored beside it.

* :func:`t_interval`: the Student-t interval of a mean, ``m +- t_{1-a/2, n-1} s / sqrt(n)``.
* :func:`paired`: a paired comparison (per-seed differences) as a record with its estimate,
  interval and verdict.
* :func:`verdict`: "held" when the interval excludes 0 in the claimed direction, "did not hold"
  when it lies wholly on the other side of 0 (0 included), otherwise "cannot tell". An interval
  through 0 is never "held".
* :func:`minimum_detectable_effect`: the smallest true mean difference a two-sided one-sample
  t-test of level ``alpha`` detects with probability ``power`` (noncentral t, exact).
* :func:`seeds_for_half_width`: the smallest number of seeds whose interval half-width is at most
  a target, at a given spread.
* :func:`fieller_interval` and :func:`bootstrap_ratio_interval`: intervals of a ratio of two
  paired means (a share of a gain), which may be unbounded.
* :func:`ols`: least squares with classical standard errors.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import optimize, stats

DIRECTIONS = ('less', 'greater')
VERDICTS = ('held', 'did not hold', 'cannot tell')


def _values(values: Sequence[float], minimum: int = 2) -> np.ndarray:
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size < minimum:
    raise ValueError(f'needs at least {minimum} values, got {values.size}')
  if not np.all(np.isfinite(values)):
    raise ValueError(f'values must be finite, got {values.tolist()}')
  return values


def t_quantile(n: int, confidence: float = 0.95) -> float:
  """``t_{(1 + confidence)/2, n - 1}``: the two-sided critical value for ``n`` values."""
  return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float]:
  """Student-t interval ``[lo, hi]`` of the mean of ``values`` (at least two)."""
  values = _values(values)
  half = t_quantile(values.size, confidence) * values.std(ddof=1) / math.sqrt(values.size)
  return [float(values.mean() - half), float(values.mean() + half)]


def verdict(interval: Optional[Sequence[float]], direction: str) -> str:
  """The verdict on the claim "the mean is ``direction`` than 0" from its interval.

  ``direction='less'`` claims a negative mean (e.g. an error difference method - SGD).
  "held": the interval lies strictly on the claimed side of 0; "did not hold": it lies on the
  other side, 0 included (the claimed direction is excluded); otherwise "cannot tell".
  """
  if direction not in DIRECTIONS:
    raise ValueError(f'direction must be one of {DIRECTIONS}, got {direction!r}')
  if interval is None:
    return 'cannot tell'
  lo, hi = (float(v) for v in interval)
  if direction == 'greater':
    lo, hi = -hi, -lo
  if hi < 0:
    return 'held'
  if lo >= 0:
    return 'did not hold'
  return 'cannot tell'


def paired(per_seed: Sequence[float], direction: str, confidence: float = 0.95) -> dict:
  """A paired comparison from its per-seed differences.

  Returns ``{n_seeds, estimate, ci95, sd, per_seed, verdict}``; ``estimate`` and ``ci95``
  recompute from ``per_seed``.
  """
  values = _values(per_seed)
  interval = t_interval(values, confidence)
  return {
      'n_seeds': int(values.size),
      'estimate': float(values.mean()),
      'ci95': interval,
      'sd': float(values.std(ddof=1)),
      'per_seed': [float(v) for v in values],
      'verdict': verdict(interval, direction),
  }


def t_test_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
  """Power of the two-sided one-sample t-test of level ``alpha`` at true mean ``effect``."""
  if sd <= 0:
    raise ValueError(f'sd must be > 0, got {sd}')
  critical = stats.t.ppf(1 - alpha / 2, n - 1)
  # The test is symmetric in the sign of the effect; with a non-negative noncentrality the lower
  # tail is the small term, which scipy's nct returns as NaN once it underflows (few seeds).
  noncentrality = abs(effect) * math.sqrt(n) / sd
  lower = stats.nct.cdf(-critical, n - 1, noncentrality)
  return float(stats.nct.sf(critical, n - 1, noncentrality)
               + (0.0 if math.isnan(lower) else lower))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05,
                              power: float = 0.8) -> float:
  """Smallest ``|mean|`` the two-sided t-test of level ``alpha`` detects with ``power``.

  Solved exactly on the noncentral t distribution (at large ``n`` it approaches
  ``(z_{1-alpha/2} + z_power) sd / sqrt(n)``).
  """
  if n < 2:
    raise ValueError(f'needs at least 2 seeds, got {n}')
  if sd <= 0:
    return 0.0
  # The sum of the two t quantiles slightly overestimates the effect: twice it brackets the root
  # while keeping the noncentral t (which turns NaN far in its tail) well-behaved.
  upper = 2 * (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)
  while t_test_power(upper, sd, n, alpha) < power:  # heavy tails at two or three seeds
    upper *= 2
  return float(optimize.brentq(lambda d: t_test_power(d, sd, n, alpha) - power, 0.0, upper,
                               xtol=1e-12 * max(sd, 1e-300)))


def seeds_for_half_width(sd: float, half_width: float, confidence: float = 0.95,
                         maximum: int = 10_000) -> int:
  """Smallest ``n >= 2`` with ``t_{n-1} sd / sqrt(n) <= half_width``."""
  if half_width <= 0:
    raise ValueError(f'half_width must be > 0, got {half_width}')
  for n in range(2, maximum + 1):
    if t_quantile(n, confidence) * sd / math.sqrt(n) <= half_width:
      return n
  raise ValueError(f'more than {maximum} seeds needed for half-width {half_width} at sd {sd}')


def fieller_interval(numerator: Sequence[float], denominator: Sequence[float],
                     confidence: float = 0.95) -> Optional[list[float]]:
  """Fieller's interval of ``mean(numerator) / mean(denominator)`` for paired samples.

  The set of ratios ``R`` whose contrast ``mean(num) - R mean(den)`` a t-test does not reject:
  ``(a - R b)^2 <= t^2 (v_aa - 2 R v_ab + R^2 v_bb)`` with ``v`` the (co)variances of the
  means. Bounded only when the denominator's mean is itself significantly non-zero; returns
  None when the set is unbounded (the ratio is then not estimable at this sample size).
  """
  a_values, b_values = _values(numerator), _values(denominator)
  if a_values.size != b_values.size:
    raise ValueError(f'paired samples of unequal size: {a_values.size} and {b_values.size}')
  n = a_values.size
  a, b = a_values.mean(), b_values.mean()
  covariance = np.cov(a_values, b_values, ddof=1) / n
  v_aa, v_ab, v_bb = covariance[0, 0], covariance[0, 1], covariance[1, 1]
  t2 = t_quantile(n, confidence)**2
  quadratic = b * b - t2 * v_bb
  linear = a * b - t2 * v_ab
  constant = a * a - t2 * v_aa
  if quadratic <= 0:
    return None
  discriminant = linear * linear - quadratic * constant
  root = math.sqrt(max(discriminant, 0.0))
  return [float((linear - root) / quadratic), float((linear + root) / quadratic)]


def bootstrap_ratio_interval(numerator: Sequence[float], denominator: Sequence[float],
                             confidence: float = 0.95, resamples: int = 10_000,
                             seed: int = 0) -> Optional[list[float]]:
  """Percentile bootstrap interval of ``mean(numerator) / mean(denominator)``, seeds resampled
  in pairs. None when a resample's denominator mean is 0 or changes sign (the ratio is then
  unbounded)."""
  a_values, b_values = _values(numerator), _values(denominator)
  if a_values.size != b_values.size:
    raise ValueError(f'paired samples of unequal size: {a_values.size} and {b_values.size}')
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, a_values.size, size=(resamples, a_values.size))
  a, b = a_values[picks].mean(1), b_values[picks].mean(1)
  if np.any(b == 0) or np.any(np.sign(b) != np.sign(b_values.mean())):
    return None
  tail = 50 * (1 - confidence)
  return [float(v) for v in np.percentile(a / b, [tail, 100 - tail])]


def ols(design: np.ndarray, response: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float]:
  """Least squares ``response ~ design @ beta``: ``(beta, standard errors, R^2)``.

  ``design`` holds the regressors as columns (add a column of ones for an intercept); the
  standard errors are the classical ones, ``sqrt(diag(sigma^2 (X'X)^-1))``; R^2 is centred.
  """
  x = np.asarray(design, np.float64)
  y = np.asarray(response, np.float64).reshape(-1)
  if x.ndim != 2 or x.shape[0] != y.size:
    raise ValueError(f'design {x.shape} does not match {y.size} responses')
  if x.shape[0] <= x.shape[1]:
    raise ValueError(f'{x.shape[0]} observations for {x.shape[1]} coefficients')
  beta, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
  if rank < x.shape[1]:
    raise ValueError('the design is rank-deficient')
  residual = y - x @ beta
  sigma2 = residual @ residual / (x.shape[0] - x.shape[1])
  errors = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
  total = np.sum((y - y.mean())**2)
  r2 = float(1 - residual @ residual / total) if total > 0 else 1.0
  return beta, errors, r2

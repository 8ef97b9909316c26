"""Host-side summaries for the toy's figures and report (Section 6.2; Fig. 5).

Plain numpy: they run once per run on arrays already fetched from the device.
Gini coefficients and Lorenz curves come from :mod:`samjax.diagnostics`.
"""

from __future__ import annotations

import numpy as np


def equal_count_binned_medians(values, weights, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
  """Median of ``weights`` in ``num_bins`` equal-count bins of ``values``.

  Returns ``(bin centres (median value in the bin), median weight per bin)``;
  equal-count bins keep every bin's median meaningful whatever the spread of
  the signed contributions.
  """
  values = np.asarray(values, np.float64).ravel()
  weights = np.asarray(weights, np.float64).ravel()
  order = np.argsort(values, kind='stable')
  bins = np.array_split(order, num_bins)
  centres = np.array([np.median(values[b]) for b in bins if b.size])
  medians = np.array([np.median(weights[b]) for b in bins if b.size])
  return centres, medians


def spearman(a, b) -> float:
  """Spearman rank correlation (average ranks for ties); 0 when either input is constant."""

  def ranks(x):
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind='stable')
    r = np.empty(x.size)
    r[order] = np.arange(x.size)
    # average the ranks of ties
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]

  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denominator = np.sqrt(np.sum(ra**2) * np.sum(rb**2))
  return float(np.sum(ra * rb) / denominator) if denominator > 0 else 0.0


def flip_fraction(real, phantom) -> float:
  """Fraction of steps at which ``sign(phantom) != sign(real)`` (a phantom that
  crosses zero, or ends exactly at zero: LSAM-noflip's clip, counts as no flip)."""
  real, phantom = np.asarray(real, np.float64), np.asarray(phantom, np.float64)
  return float(np.mean(np.sign(phantom) * np.sign(real) < 0))


def normalised_lr_scales(real_easy, real_hard, phantom_easy, phantom_hard):
  """Per step ``(v~_k / ||v~||) / (v_k / ||v||)`` for ``k = easy, hard``: the
  learning-rate scale of each feature with the head's length divided out, so it
  measures how LSAM redistributes the weight between the features, not how much
  shorter its phantom head is."""
  real_norm = np.hypot(real_easy, real_hard)
  phantom_norm = np.hypot(phantom_easy, phantom_hard)
  with np.errstate(divide='ignore', invalid='ignore'):
    return tuple((np.asarray(p) / phantom_norm) / (np.asarray(r) / real_norm)
                 for r, p in ((real_easy, phantom_easy), (real_hard, phantom_hard)))


def learning_window_end(curve, eval_steps, chance: float = 0.5,
                        fraction: float = 0.9) -> int:
  """First evaluation step by which the hard-probe error has made ``fraction`` of
  its drop from ``chance`` to its final value: ``error <= final + (1 - fraction)
  (chance - final)``. The steps before it are the phase in which the run learns
  its features; after it the error has (nearly) settled. A run that never drops
  below chance gets the whole run."""
  curve = np.asarray(curve, np.float64)
  final = curve[-1]
  threshold = final + (1.0 - fraction) * max(chance - final, 0.0)
  reached = np.flatnonzero(curve <= threshold + 1e-12)
  return int(eval_steps[reached[0]] if reached.size else eval_steps[-1])


def linear_regression(features, target) -> tuple[np.ndarray, np.ndarray]:
  """Ordinary least squares ``target ~ 1 + features``: ``(coefficients, standard errors)``,
  the intercept first; the errors are the textbook ones, ``sigma^2 (X'X)^-1``."""
  x = np.column_stack([np.ones(len(target))] + [np.asarray(f, np.float64).ravel()
                                                 for f in features])
  y = np.asarray(target, np.float64).ravel()
  coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
  residual = y - x @ coefficients
  dof = max(len(y) - x.shape[1], 1)
  covariance = (residual @ residual / dof) * np.linalg.pinv(x.T @ x)
  return coefficients, np.sqrt(np.diag(covariance))


def log_weight_ratio(margin_real, margin_phantom) -> np.ndarray:
  """``log(lambda~ / lambda) = log sigma(-m~) - log sigma(-m) = softplus(m) - softplus(m~)``,
  exact where the weights themselves underflow."""
  softplus = lambda m: np.logaddexp(0.0, np.asarray(m, np.float64))
  return softplus(margin_real) - softplus(margin_phantom)

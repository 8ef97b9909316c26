"""Host-side summaries for the toy's figures and report (Section 6.2; Fig. 5).

Plain numpy: they run once per run on arrays already fetched from the device.
Gini coefficients and Lorenz curves come from :mod:`samjax.diagnostics`.
"""

from __future__ import annotations

import numpy as np


def binned_medians(values, weights, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
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

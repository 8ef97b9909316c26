"""Selection on validation error, and seed-paired differences with Student-t intervals.

A *point* is one trained grid point: a dict with ``method``, ``learning_rate``, ``rho``, ``seed``
and its metrics (``val_error``, ``test_error``, ``easy_probe_error``, ``hard_probe_error``).

* :func:`select` picks, per method, the setting ``(learning_rate, rho)`` with the lowest mean
  validation error over seeds (ties: lower mean validation loss, then the smaller setting). The
  probes never enter.
* :func:`paired_differences` pairs a method's selected points with SGD's by seed (same initial
  parameters and example order) and returns ``method - SGD`` per seed, its mean and the
  Student-t 95 % interval of the mean: ``mean +- t_{0.975, n-1} s / sqrt(n)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

PAIRED_METRICS = ('hard_probe_error', 'easy_probe_error', 'test_error')


def select(points: Sequence[dict], method: str,
           criteria: Sequence[str] = ('val_error', 'val_loss')) -> tuple:
  """``(learning_rate, rho)`` of ``method`` with the lowest mean validation error over seeds.

  Ties (validation error is often 0 when the easy feature decides the label) are broken by the
  next criterion present, the mean validation loss, then by the smaller setting.
  """
  mine = [p for p in points if p['method'] == method]
  if not mine:
    raise ValueError(f'no grid points of method {method!r}')
  settings = sorted({(p['learning_rate'], p['rho']) for p in mine})
  criteria = [c for c in criteria if all(c in p for p in mine)]
  mean = {s: tuple(np.mean([p[c] for p in mine if (p['learning_rate'], p['rho']) == s])
                   for c in criteria) for s in settings}
  return min(settings, key=lambda s: (mean[s], s))


def points_at(points: Sequence[dict], method: str, setting: tuple) -> dict[int, dict]:
  """``{seed: point}`` of ``method`` at ``setting``."""
  return {p['seed']: p for p in points
          if p['method'] == method and (p['learning_rate'], p['rho']) == tuple(setting)}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float]:
  """Student-t interval of the mean of ``values`` (needs at least two)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    raise ValueError(f'a t interval needs at least 2 values, got {values.size}')
  mean = values.mean()
  half = stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(
      values.size)
  return [float(mean - half), float(mean + half)]


def paired_differences(points: Sequence[dict], dataset: str, methods: Sequence[str],
                       metrics: Sequence[str] = PAIRED_METRICS, baseline: str = 'sgd'
                       ) -> list[dict]:
  """One record per (method, metric): ``method - baseline`` over the seeds both have."""
  base_setting = select(points, baseline)
  base = points_at(points, baseline, base_setting)
  records = []
  for method in methods:
    setting = select(points, method)
    mine = points_at(points, method, setting)
    seeds = sorted(set(base) & set(mine))
    for metric in metrics:
      differences = [float(mine[s][metric] - base[s][metric]) for s in seeds]
      records.append({
          'dataset': dataset, 'method': method, 'metric': metric,
          'learning_rate': setting[0], 'rho': setting[1],
          'baseline_learning_rate': base_setting[0],
          'seeds': seeds, 'per_seed_differences': differences,
          'mean': float(np.mean(differences)), 'ci95': t_interval(differences),
      })
  return records

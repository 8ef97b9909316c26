"""Seed-paired comparisons at equal learning rate, and selection that names what decided.

A *point* is one trained grid point: a dict with ``method``, ``learning_rate``, ``rho``, ``seed``
and its metrics (``val_error``, ``val_loss``, ``test_error``, ``easy_probe_error``,
``hard_probe_error``).

* :func:`select` picks, per method (optionally at one learning rate), the setting
  ``(learning_rate, rho)`` with the lowest mean validation error over seeds; ties go to the lower
  mean validation loss, then to the smaller setting. It returns which criterion decided and how
  many settings were tied, so that a table never says "selected on validation error" when the
  validation error was 0 everywhere.
* :func:`paired_record` turns per-seed differences ``method - baseline`` (same seed: same initial
  parameters and example order; same learning rate) into a record whose estimate, interval,
  spread and minimum detectable effect all recompute from ``per_seed_differences``
  (:func:`samjax.stats.paired`, the statistics the toy study uses).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from samjax import stats

PAIRED_METRICS = ('hard_probe_error', 'easy_probe_error', 'test_error')
SELECTION_CRITERIA = ('val_error', 'val_loss')


def settings_of(points: Sequence[dict], method: str, learning_rate=None) -> list[tuple]:
  """Sorted ``(learning_rate, rho)`` settings of ``method`` (at ``learning_rate`` if given)."""
  return sorted({(p['learning_rate'], p['rho']) for p in points if p['method'] == method
                 and (learning_rate is None or p['learning_rate'] == learning_rate)})


def select(points: Sequence[dict], method: str, learning_rate=None,
           criteria: Sequence[str] = SELECTION_CRITERIA) -> dict:
  """The setting of ``method`` with the lowest mean of ``criteria`` (lexicographic), explained.

  Returns ``{'setting': (lr, rho), 'decided_by': criterion | 'order' | 'only setting',
  'tied': {criterion: number of settings tied at the best value so far}, 'means': ...}``.
  ``decided_by`` is the first criterion that leaves one setting; ``'order'`` means every criterion
  tied and the smallest setting was taken.
  """
  settings = settings_of(points, method, learning_rate)
  if not settings:
    raise ValueError(f'no grid points of method {method!r}'
                     + (f' at learning rate {learning_rate}' if learning_rate is not None else ''))
  criteria = [c for c in criteria if all(c in p for p in points if p['method'] == method)]
  means = {s: {c: float(np.mean([p[c] for p in points if p['method'] == method
                                 and (p['learning_rate'], p['rho']) == s])) for c in criteria}
           for s in settings}
  remaining, tied, decided_by = list(settings), {}, 'only setting' if len(settings) == 1 else None
  for c in criteria:
    if len(remaining) == 1:
      break
    best = min(means[s][c] for s in remaining)
    remaining = [s for s in remaining if means[s][c] == best]
    tied[c] = len(remaining)
    if len(remaining) == 1 and decided_by is None:
      decided_by = c
  return {'setting': remaining[0], 'decided_by': decided_by or 'order', 'tied': tied,
          'means': {f'{s[0]:g}/{s[1]:g}': m for s, m in means.items()}}


def points_at(points: Sequence[dict], method: str, setting: tuple) -> dict[int, dict]:
  """``{seed: point}`` of ``method`` at ``setting``."""
  return {p['seed']: p for p in points
          if p['method'] == method and (p['learning_rate'], p['rho']) == tuple(setting)}


def rho_averaged(points: Sequence[dict], method: str, learning_rate: float, metric: str,
                 rhos: Union[Sequence[float], None] = None) -> dict[int, float]:
  """``{seed: mean of metric over the rho grid}`` of ``method`` at ``learning_rate``.

  Only seeds that have every rho enter (a missing point would change what the mean is over).
  """
  rhos = sorted(rhos if rhos is not None else
                {s[1] for s in settings_of(points, method, learning_rate)})
  by_seed: dict[int, dict] = {}
  for p in points:
    if p['method'] == method and p['learning_rate'] == learning_rate and p['rho'] in rhos:
      by_seed.setdefault(p['seed'], {})[p['rho']] = p[metric]
  return {seed: float(np.mean([v[r] for r in rhos])) for seed, v in sorted(by_seed.items())
          if len(v) == len(rhos)}


def study_verdict(interval: Sequence[float], paper_effect: float) -> str:
  """"improves" (interval below 0), "no gain larger than X" (X = -lower bound, below
  ``paper_effect``; X = 0 and "worse" when the interval lies above 0), else "cannot tell"."""
  low, high = interval
  if high < 0:
    return 'improves'
  largest_gain = max(0.0, -float(low))
  if largest_gain < paper_effect:
    # An interval wholly above 0 excludes any gain: the method is worse than the baseline.
    return f'no gain larger than {largest_gain:.4f}' + (' (worse: interval above 0)' if low > 0
                                                        else '')
  return 'cannot tell'


def paired_record(method_values: dict[int, float], baseline_values: dict[int, float],
                  direction: str = 'less', paper_effect: float = float('inf'), **fields) -> dict:
  """``method - baseline`` over the seeds both have, as a record that recomputes from its list.

  ``fields`` (method, metric, lr, sgd_lr, rho, endpoint, selection, budget, ...) are copied in.
  """
  seeds = sorted(set(method_values) & set(baseline_values))
  differences = [float(method_values[s] - baseline_values[s]) for s in seeds]
  result = stats.paired(differences, direction)
  return {
      **fields, 'seeds': seeds, 'per_seed_differences': differences,
      'n_seeds': result['n_seeds'], 'mean': result['estimate'], 'ci95': result['ci95'],
      'sd': result['sd'], 'mde': stats.minimum_detectable_effect(result['sd'], len(seeds)),
      'verdict': study_verdict(result['ci95'], paper_effect)
      if direction == 'less' else result['verdict'],
  }

"""The 1-D feature probe of the disentangled toy model (Section 5.1).

The probe of feature ``k`` classifies the feature's label from the scalar
``phi_k(x)`` alone. A linear classifier on a scalar is a threshold with a
direction, so the probe is fitted exactly, by minimising the 0-1 error over
every threshold between consecutive sorted training values and both
directions, on a fresh *probe-train* sample; its error is then measured on a
second fresh *probe-test* sample. Everything is jittable (one sort, one cumsum).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ThresholdProbe(NamedTuple):
  """Predicts ``direction * sign(feature - threshold)``."""

  threshold: jax.Array
  direction: jax.Array


def fit_threshold_probe(feature: jax.Array, label: jax.Array) -> ThresholdProbe:
  """The threshold probe of least 0-1 error on ``(feature [n], label [n] in {-1, +1})``.

  Predicting ``+1`` for the points above sorted position ``k`` errs on the
  positives below ``k`` and the negatives from ``k`` on; the reverse direction
  errs on the complement. The threshold is the midpoint between the sorted
  neighbours (ties between equal values can only make the fitted error
  optimistic on the probe-train sample; the reported error is on fresh data).
  """
  n = feature.shape[0]
  order = jnp.argsort(feature)
  sorted_feature = feature[order]
  positive = (label[order] > 0).astype(jnp.float32)
  positives_below = jnp.concatenate([jnp.zeros(1), jnp.cumsum(positive)])  # [n + 1]
  negatives_below = jnp.arange(n + 1, dtype=jnp.float32) - positives_below
  negatives_from = negatives_below[-1] - negatives_below
  errors_up = positives_below + negatives_from  # predict +1 above the threshold
  errors_down = n - errors_up                   # predict -1 above the threshold
  best_up, best_down = jnp.argmin(errors_up), jnp.argmin(errors_down)
  use_up = errors_up[best_up] <= errors_down[best_down]
  position = jnp.where(use_up, best_up, best_down)
  # Thresholds sit between sorted values; positions 0 and n lie outside the data.
  padded = jnp.concatenate([sorted_feature[:1] - 1.0, sorted_feature, sorted_feature[-1:] + 1.0])
  threshold = 0.5 * (padded[position] + padded[position + 1])
  return ThresholdProbe(threshold, jnp.where(use_up, 1.0, -1.0))


def probe_predict(probe: ThresholdProbe, feature: jax.Array) -> jax.Array:
  return probe.direction * jnp.where(feature > probe.threshold, 1.0, -1.0)


def probe_error(train_feature: jax.Array, train_label: jax.Array, test_feature: jax.Array,
                test_label: jax.Array) -> jax.Array:
  """Test 0-1 error of the threshold probe fitted on the training sample."""
  probe = fit_threshold_probe(train_feature, train_label)
  return jnp.mean(probe_predict(probe, test_feature) != test_label)

"""Linear probes on frozen features (Springer et al., 2024, Sec. 3 and 4).

The *feature-probing error* of a representation ``phi`` for a feature ``k`` is
the test error of a linear classifier trained on ``phi(x)`` to predict feature
``k``'s value, where both the probe's training set and its held-out test set
are *group-balanced*: every combination of (label, attribute) values is
equally frequent, so only the probed feature predicts the probe's target.
:func:`balanced_subset` / :func:`balanced_split` build such sets;
:func:`probe_error` fits and evaluates the probe.

The probe is L2-regularised logistic regression (scikit-learn's
``LogisticRegression``, multinomial for ``k > 2`` classes) on features
standardised with statistics of the probe's training set. It minimises::

    mean_i CE(W^T z_i + b, t_i) + (l2 / 2) ||W||^2,    z = (phi - mu) / sigma,

(sklearn's ``C = 1 / (l2 * n_train)``; the bias is not penalised). The paper
leaves the probe's regularisation unspecified; ``l2 = 1e-3`` on standardised
features is our default. :func:`fit_probe` maps the fitted probe back to the
original feature space, ``logits = phi W' + b'``, so that
:func:`samjax.diagnostics.signed_contributions` can use it directly.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

SeedOrRng = Union[int, np.random.Generator]


class LinearProbe(NamedTuple):
  """A fitted linear probe in the original (unstandardised) feature space.

  Attributes:
    weights: ``[d, c]`` float64. Binary (``k = 2``): ``c = 1`` and the single
      column is the logit of ``classes[1]`` against ``classes[0]``. Otherwise
      ``c = k`` class logits.
    bias: ``[c]`` float64.
    classes: ``[k]`` sorted class values seen in training; predictions are
      drawn from these.
  """

  weights: np.ndarray
  bias: np.ndarray
  classes: np.ndarray


def _as_features(name: str, features: Any) -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f'{name} must be a non-empty [n, d] array, got shape {x.shape}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} contains NaN or inf values.')
  return x


def _as_targets(name: str, targets: Any, n: int, features_name: str) -> np.ndarray:
  t = np.asarray(targets)
  if t.ndim != 1 or t.shape[0] != n:
    raise ValueError(
        f'{name} must be a 1-D array with one entry per row of {features_name} '
        f'({n}), got shape {t.shape}.')
  return t


def fit_probe(
    train_features: Any,
    train_targets: Any,
    *,
    l2: float = 1e-3,
    max_iter: int = 1000,
) -> LinearProbe:
  """Fits the standardised L2 logistic-regression probe; returns it in feature space.

  With the scaler ``z = (phi - mu) / sigma`` (fit on ``train_features``;
  constant features get ``sigma = 1``) and sklearn's coefficients ``(A, a)``
  on ``z``, the probe in the original space is ``W = A^T / sigma[:, None]``,
  ``b = a - (mu / sigma) @ A^T``, so ``phi W + b == z A^T + a``.

  Args:
    train_features: ``[n, d]`` frozen representations of the probe's
      (group-balanced) training set.
    train_targets: ``[n]`` values of the probed feature (any sortable labels).
    l2: L2 strength on the mean loss (see the module docstring); ``0``
      means unregularised (which need not converge on separable data).
    max_iter: L-BFGS iterations. sklearn warns (``ConvergenceWarning``) when
      they run out.

  Returns:
    A :class:`LinearProbe`.

  Raises:
    ValueError: naming ``train_features``/``train_targets`` for bad shapes,
      non-finite features or fewer than two classes; ``l2``/``max_iter`` for
      bad values.
  """
  x = _as_features('train_features', train_features)
  t = _as_targets('train_targets', train_targets, x.shape[0], 'train_features')
  classes = np.unique(t)
  if classes.size < 2:
    raise ValueError(
        f'train_targets must contain at least 2 classes to fit a probe, got {classes.tolist()}.')
  if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or not np.isfinite(l2) or l2 < 0:
    raise ValueError(f'l2 must be a finite number >= 0, got {l2!r}.')
  if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter <= 0:
    raise ValueError(f'max_iter must be a positive int, got {max_iter!r}.')

  scaler = StandardScaler().fit(x)
  regularisation = np.inf if l2 == 0 else 1.0 / (l2 * x.shape[0])
  model = LogisticRegression(C=regularisation, max_iter=int(max_iter))
  model.fit(scaler.transform(x), t)

  scaled_weights = model.coef_.T  # [d, c] acting on standardised features
  weights = scaled_weights / scaler.scale_[:, None]
  bias = model.intercept_ - (scaler.mean_ / scaler.scale_) @ scaled_weights
  return LinearProbe(weights=weights, bias=np.asarray(bias, np.float64), classes=model.classes_)


def probe_logits(probe: LinearProbe, features: Any) -> np.ndarray:
  """``[n, c]`` logits ``phi W + b`` of a fitted probe (``c = 1`` for binary)."""
  x = _as_features('features', features)
  if x.shape[1] != probe.weights.shape[0]:
    raise ValueError(
        f'features has {x.shape[1]} dimensions but the probe was fit on '
        f'{probe.weights.shape[0]}.')
  return x @ probe.weights + probe.bias


def probe_predict(probe: LinearProbe, features: Any) -> np.ndarray:
  """``[n]`` predicted class values (sklearn's rule: logit > 0 or argmax)."""
  logits = probe_logits(probe, features)
  if logits.shape[1] == 1:
    return probe.classes[(logits[:, 0] > 0).astype(int)]
  return probe.classes[np.argmax(logits, axis=1)]


def probe_error(
    train_features: Any,
    train_targets: Any,
    test_features: Any,
    test_targets: Any,
    *,
    l2: float = 1e-3,
    max_iter: int = 1000,
) -> float:
  """Feature-probing error: 0-1 error of a probe fit on train, measured on test.

  Both sets should be group-balanced (:func:`balanced_split`) and disjoint,
  as in the paper's Section 3.

  Args:
    train_features: ``[n, d]`` probe training representations.
    train_targets: ``[n]`` probed feature values.
    test_features: ``[m, d]`` held-out representations.
    test_targets: ``[m]``.
    l2: see :func:`fit_probe`.
    max_iter: see :func:`fit_probe`.

  Returns:
    The fraction of ``test_targets`` the probe gets wrong, a Python float.

  Raises:
    ValueError: as :func:`fit_probe`, and naming ``test_features`` /
      ``test_targets`` for mismatched shapes or dimensions.
  """
  probe = fit_probe(train_features, train_targets, l2=l2, max_iter=max_iter)
  x = _as_features('test_features', test_features)
  t = _as_targets('test_targets', test_targets, x.shape[0], 'test_features')
  if x.shape[1] != probe.weights.shape[0]:
    raise ValueError(
        f'test_features has {x.shape[1]} dimensions but train_features has '
        f'{probe.weights.shape[0]}.')
  return float(np.mean(probe_predict(probe, x) != t))


def _scalar(value: Any) -> Any:
  return value.item() if isinstance(value, np.generic) else value


def group_errors(pred: Any, labels: Any, groups: Any) -> dict[Any, float]:
  """0-1 error within each group: ``{g: mean(pred[groups == g] != labels[groups == g])}``.

  Per-class errors are ``group_errors(pred, labels, labels)``; per (label,
  attribute) group with the project's convention
  ``groups = label * num_attributes + attribute``.

  Args:
    pred: ``[n]`` predictions.
    labels: ``[n]`` true labels.
    groups: ``[n]`` group ids.

  Returns:
    A dict from each group id present (as a Python scalar, in sorted order)
    to its error rate.

  Raises:
    ValueError: naming ``labels``/``groups`` when lengths differ from ``pred``,
      or ``pred`` when it is empty or not 1-D.
  """
  pred, labels, groups = np.asarray(pred), np.asarray(labels), np.asarray(groups)
  if pred.ndim != 1 or pred.shape[0] == 0:
    raise ValueError(f'pred must be a non-empty 1-D array, got shape {pred.shape}.')
  for name, v in (('labels', labels), ('groups', groups)):
    if v.shape != pred.shape:
      raise ValueError(f'{name} must have the shape of pred {pred.shape}, got {v.shape}.')
  wrong = pred != labels
  return {_scalar(g): float(np.mean(wrong[groups == g])) for g in np.unique(groups)}


def _group_indices(labels: Any, attributes: Any) -> dict[tuple[Any, Any], np.ndarray]:
  """Indices of every (label, attribute) combination; all of them must occur."""
  labels, attributes = np.asarray(labels), np.asarray(attributes)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f'labels must be a non-empty 1-D array, got shape {labels.shape}.')
  if attributes.shape != labels.shape:
    raise ValueError(
        f'attributes must have the shape of labels {labels.shape}, got {attributes.shape}.')
  groups = {}
  for label, attribute in itertools.product(np.unique(labels), np.unique(attributes)):
    index = np.flatnonzero((labels == label) & (attributes == attribute))
    if index.size == 0:
      # A perfectly correlated set (e.g. CIFAR-MNIST's training split) cannot be
      # balanced: the probe set must come from data where the features vary independently.
      raise ValueError(
          f'labels/attributes: the combination (label={_scalar(label)}, '
          f'attribute={_scalar(attribute)}) has no examples, so no balanced subset exists.')
    groups[(_scalar(label), _scalar(attribute))] = index
  return groups


def _per_group(per_group: Optional[int], available: int) -> int:
  if per_group is None:
    return available
  if (isinstance(per_group, bool) or not isinstance(per_group, numbers.Integral)
      or not 1 <= per_group <= available):
    raise ValueError(
        f'per_group must be an int in [1, {available}] (the smallest group), got {per_group!r}.')
  return int(per_group)


def balanced_subset(
    labels: Any,
    attributes: Any,
    seed: SeedOrRng = 0,
    *,
    per_group: Optional[int] = None,
) -> np.ndarray:
  """Indices of a subset in which every (label, attribute) combination is equally frequent.

  Each of the ``|labels| x |attributes|`` groups contributes ``per_group``
  examples (default: the size of the smallest group), drawn uniformly
  without replacement. In the result the label and the attribute are
  independent and each uniform, which is the paper's balanced distribution.

  Args:
    labels: ``[n]`` values of one feature.
    attributes: ``[n]`` values of the other.
    seed: an int seed or a ``numpy.random.Generator``.
    per_group: examples per group (``<=`` the smallest group's size).

  Returns:
    Sorted int64 indices into ``labels``.

  Raises:
    ValueError: naming ``labels``/``attributes`` for bad shapes or a missing
      combination, ``per_group`` when it exceeds the smallest group.
  """
  groups = _group_indices(labels, attributes)
  count = _per_group(per_group, min(index.size for index in groups.values()))
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(index, size=count, replace=False) for index in groups.values()]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def balanced_split(
    labels: Any,
    attributes: Any,
    seed: SeedOrRng = 0,
    *,
    test_fraction: float = 0.5,
    per_group: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint, individually balanced probe-train and probe-test index sets.

  Draws ``per_group`` examples of every (label, attribute) combination (as
  :func:`balanced_subset`) and splits each group's draw in the same
  proportion, so both parts are balanced.

  Args:
    labels: ``[n]`` values of one feature.
    attributes: ``[n]`` values of the other.
    seed: an int seed or a ``numpy.random.Generator``.
    test_fraction: share of each group going to the test part, in ``(0, 1)``.
    per_group: examples per group before splitting.

  Returns:
    ``(train_indices, test_indices)``, sorted int64 and disjoint.

  Raises:
    ValueError: as :func:`balanced_subset`, and naming ``test_fraction`` when
      either part would be empty.
  """
  groups = _group_indices(labels, attributes)
  count = _per_group(per_group, min(index.size for index in groups.values()))
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
    raise ValueError(f'test_fraction must be a number in (0, 1), got {test_fraction!r}.')
  num_test = int(round(count * float(test_fraction)))
  if not 0 < num_test < count:
    raise ValueError(
        f'test_fraction={test_fraction!r} leaves an empty train or test part with '
        f'{count} examples per group.')
  rng = np.random.default_rng(seed)
  train, test = [], []
  for index in groups.values():
    drawn = rng.choice(index, size=count, replace=False)
    test.append(drawn[:num_test])
    train.append(drawn[num_test:])
  return (np.sort(np.concatenate(train)).astype(np.int64),
          np.sort(np.concatenate(test)).astype(np.int64))

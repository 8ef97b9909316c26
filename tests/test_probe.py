"""Linear probes on frozen features and group-balanced probe sets."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from samjax import diagnostics, probe


def blobs(rng, n, num_classes, dim=6, separation=6.0):
  """Classes on well separated centres in the first two dims, plus noise dims."""
  targets = np.arange(n) % num_classes
  angles = 2 * np.pi * targets / num_classes
  x = rng.normal(size=(n, dim))
  x[:, 0] += separation * np.cos(angles)
  x[:, 1] += separation * np.sin(angles)
  x[:, 2] = 100.0 * x[:, 2] + 50.0  # badly scaled: the scaler has to matter
  return x, targets


@pytest.mark.parametrize('num_classes', [2, 3])
def test_separable_features_give_zero_probe_error(num_classes):
  rng = np.random.default_rng(0)
  train_x, train_t = blobs(rng, 300, num_classes, separation=20.0)
  test_x, test_t = blobs(rng, 300, num_classes, separation=20.0)
  assert probe.probe_error(train_x, train_t, test_x, test_t) == 0.0


def test_features_independent_of_target_give_chance_error():
  rng = np.random.default_rng(1)
  train_x, test_x = rng.normal(size=(400, 10)), rng.normal(size=(2000, 10))
  train_t, test_t = np.arange(400) % 2, np.arange(2000) % 2
  error = probe.probe_error(train_x, train_t, test_x, test_t)
  # With balanced test targets independent of the predictions, the error has
  # mean exactly 1/2 and sd <= 0.5 / sqrt(2000) = 0.011: 0.06 is > 5 sd.
  assert abs(error - 0.5) < 0.06


@pytest.mark.parametrize('num_classes', [2, 4])
def test_fit_probe_in_feature_space_matches_sklearn_on_scaled_features(num_classes):
  rng = np.random.default_rng(2)
  x, t = blobs(rng, 200, num_classes, separation=2.0)
  fitted = probe.fit_probe(x, t, l2=1e-2)
  scaler = StandardScaler().fit(x)
  reference = LogisticRegression(C=1 / (1e-2 * 200), max_iter=1000).fit(scaler.transform(x), t)
  decision = reference.decision_function(scaler.transform(x))
  logits = probe.probe_logits(fitted, x)
  np.testing.assert_allclose(logits.reshape(decision.shape), decision, rtol=1e-6, atol=1e-8)
  np.testing.assert_array_equal(probe.probe_predict(fitted, x), reference.predict(scaler.transform(x)))
  assert fitted.weights.shape == (6, 1 if num_classes == 2 else num_classes)
  np.testing.assert_array_equal(fitted.classes, np.arange(num_classes))


def test_probe_signed_contributions_are_positive_exactly_where_the_probe_is_right():
  rng = np.random.default_rng(3)
  x, t = blobs(rng, 200, 2, separation=2.0)
  fitted = probe.fit_probe(x, t)
  contributions = np.asarray(
      diagnostics.signed_contributions(x, t, fitted.weights, fitted.bias))
  correct = probe.probe_predict(fitted, x) == t
  assert 0 < correct.mean() < 1
  np.testing.assert_array_equal(contributions > 0, correct)


def test_group_errors_hand_example():
  pred = np.array([1, 0, 1, 1, 0, 0])
  labels = np.array([1, 1, 1, 0, 0, 0])
  groups = np.array([0, 0, 1, 1, 2, 2])
  assert probe.group_errors(pred, labels, groups) == {0: 0.5, 1: 0.5, 2: 0.0}
  assert probe.group_errors(pred, labels, labels) == {0: 1 / 3, 1: 1 / 3}
  with pytest.raises(ValueError, match='groups'):
    probe.group_errors(pred, labels, groups[:-1])


def correlated_labels(rng, n=1000, agreement=0.7):
  labels = rng.integers(0, 2, n)
  attributes = np.where(rng.uniform(size=n) < agreement, labels, rng.integers(0, 3, n))
  return labels, attributes


def test_balanced_subset_has_equal_group_counts():
  rng = np.random.default_rng(4)
  labels, attributes = correlated_labels(rng)
  index = probe.balanced_subset(labels, attributes, seed=0)
  pairs, counts = np.unique(np.stack([labels[index], attributes[index]]), axis=1, return_counts=True)
  assert pairs.shape[1] == 6 and np.all(counts == counts[0])
  smallest = min(np.sum((labels == a) & (attributes == b)) for a in (0, 1) for b in (0, 1, 2))
  assert counts[0] == smallest
  assert np.unique(index).size == index.size
  np.testing.assert_array_equal(index, probe.balanced_subset(labels, attributes, seed=0))
  assert not np.array_equal(index, probe.balanced_subset(labels, attributes, seed=1))
  assert probe.balanced_subset(labels, attributes, np.random.default_rng(0), per_group=5).size == 30


def test_balanced_split_is_disjoint_and_balanced():
  rng = np.random.default_rng(5)
  labels, attributes = correlated_labels(rng)
  train, test = probe.balanced_split(labels, attributes, seed=0, test_fraction=0.25, per_group=8)
  assert np.intersect1d(train, test).size == 0
  for part, size in ((train, 6), (test, 2)):
    _, counts = np.unique(np.stack([labels[part], attributes[part]]), axis=1, return_counts=True)
    assert counts.size == 6 and np.all(counts == size)


def test_balanced_subset_bad_input():
  labels = np.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match='combination'):
    probe.balanced_subset(labels, np.array([0, 0, 1, 1]))  # perfectly correlated
  with pytest.raises(ValueError, match='attributes'):
    probe.balanced_subset(labels, np.array([0, 1, 0]))
  with pytest.raises(ValueError, match='per_group'):
    probe.balanced_subset(labels, np.array([0, 1, 0, 1]), per_group=2)
  with pytest.raises(ValueError, match='test_fraction'):
    probe.balanced_split(labels, np.array([0, 1, 0, 1]), test_fraction=0.5)


def test_probe_bad_input():
  x = np.random.default_rng(6).normal(size=(10, 3))
  t = np.arange(10) % 2
  with pytest.raises(ValueError, match='train_targets'):
    probe.probe_error(x, t[:-1], x, t)
  with pytest.raises(ValueError, match='train_targets'):
    probe.probe_error(x, np.zeros(10), x, t)
  with pytest.raises(ValueError, match='test_features'):
    probe.probe_error(x, t, x[:, :2], t)
  with pytest.raises(ValueError, match='test_targets'):
    probe.probe_error(x, t, x, t[:3])
  with pytest.raises(ValueError, match='train_features'):
    probe.probe_error(np.where(x > 1, np.nan, x), t, x, t)
  with pytest.raises(ValueError, match='l2'):
    probe.fit_probe(x, t, l2=-1.0)

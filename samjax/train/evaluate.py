"""Evaluation of a trained model: test and group errors, and group-balanced linear probes.

The probes measure how well the frozen representation encodes each feature (Springer et al.,
2024, Section 3): a linear classifier per feature, trained on features of a group-balanced split.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from samjax import probe
from samjax.arrays import to_host  # also samjax.train.evaluate.to_host, as the loop reads it
from samjax.data import input as input_lib
from samjax.train.step import DATA_AXIS


@functools.lru_cache(maxsize=8)
def _eval_apply(model, mesh):
  """One jitted eval-mode forward per (model, mesh), shared by every split evaluated."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True),
                 out_shardings=NamedSharding(mesh, P()))


def compute_features(model, variables, split, dataset, batch_size: int,
                     mesh) -> tuple[np.ndarray, np.ndarray]:
  """Frozen features and logits of a split (eval mode), as host numpy arrays."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  apply = _eval_apply(model, mesh)
  feats, logits = [], []
  count, index = jax.process_count(), jax.process_index()
  for batch, num_valid in input_lib.eval_batches(split, dataset, batch_size):
    rows = batch['image'].shape[0] // count
    local = batch['image'][index * rows:(index + 1) * rows]
    out_logits, out_feats = apply(variables, jax.make_array_from_process_local_data(sharding, local))
    logits.append(to_host(out_logits)[:num_valid])
    feats.append(to_host(out_feats)[:num_valid])
  return np.concatenate(feats), np.concatenate(logits)


def evaluate(model, variables, dataset, *, batch_size: int, group_weighted_test_error: bool,
             probe_l2: float, mesh) -> dict:
  """Test error, worst-group error and group-balanced linear-probe errors of each feature."""
  train_groups = dataset.train.groups
  frequency = {int(g): float(np.mean(train_groups == g)) for g in np.unique(train_groups)}

  def task_errors(split):
    _, logits = compute_features(model, variables, split, dataset, batch_size, mesh)
    predictions = np.argmax(logits, -1)
    per_group = {int(g): e for g, e in
                 probe.group_errors(predictions, split.labels, split.groups).items()}
    average = float(np.mean(predictions != split.labels))
    weighted = sum(frequency.get(g, 0.0) * e for g, e in per_group.items())
    weighted /= max(sum(frequency.get(g, 0.0) for g in per_group), 1e-12)
    reported = weighted if group_weighted_test_error else average
    return reported, average, weighted, per_group

  val_error, _, _, _ = task_errors(dataset.val)
  test_error, average_error, weighted, groups_test = task_errors(dataset.test)
  result = {
      'val_error': val_error,  # model selection uses this, never the test or probe numbers
      'test_error': test_error,
      'test_error_average': average_error,
      'test_error_group_weighted': weighted,
      'worst_group_error': max(groups_test.values()),
      'group_test_errors': {str(g): e for g, e in groups_test.items()},
      'train_group_frequencies': {str(g): f for g, f in frequency.items()},
      'label_feature': dataset.label_feature,
      'attribute_feature': dataset.attribute_feature,
      'easy_feature': dataset.easy_feature,
  }
  probe_train_x, _ = compute_features(model, variables, dataset.probe_train, dataset, batch_size,
                                      mesh)
  probe_test_x, _ = compute_features(model, variables, dataset.probe_test, dataset, batch_size,
                                     mesh)
  for feature in ('label', 'attribute'):
    targets_train = getattr(dataset.probe_train, f'{feature}s')
    targets_test = getattr(dataset.probe_test, f'{feature}s')
    if len(np.unique(targets_train)) < 2:  # e.g. DomainBed's probe sets hold a single domain
      continue
    result[f'{feature}_probe_error'] = probe.probe_error(
        probe_train_x, targets_train, probe_test_x, targets_test, l2=probe_l2)
  hard = dataset.hard_feature
  if f'{dataset.easy_feature}_probe_error' in result:
    result['easy_probe_error'] = result[f'{dataset.easy_feature}_probe_error']
  if f'{hard}_probe_error' in result:
    result['hard_probe_error'] = result[f'{hard}_probe_error']
  if 'label_probe_error' in result:
    result['probe_accuracy'] = 1.0 - result['label_probe_error']
  return result

"""Real-data training: ``train_and_evaluate(config, workdir)``.

One run trains a model with SGD or a member of the SAM family on a data set with two labelled
features (``label``, the training target, and ``attribute``, the other feature), then measures
how well the frozen representation encodes each feature with group-balanced linear probes
(Springer et al., 2024, Section 3).

Workdir layout::

  config.json       the resolved config (a resumed run must match it)
  metrics.jsonl     one JSON object per logged step: step, loss, accuracy, grad_norm, ...
  tensorboard/      TensorBoard event files
  checkpoints/      orbax CheckpointManager (periodic, keep N, automatic resume)
  probe.json        test_error, worst_group_error, easy/hard probe errors, per-group numbers

Data order, augmentation and schedules are functions of the step, so a run interrupted and
resumed from a checkpoint follows the same trajectory as one that ran straight through.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from samjax import data as data_lib
from samjax import models, probe
from samjax import step as step_lib
from samjax.config_validation import validate_train_config
from samjax.io_utils import atomic_write_json

# The data split (validation hold-out, probe subsets) is the same for every training seed, so the
# spread over seeds measures training randomness alone.
DATA_SEED = 0

# Fields a resumed run may change: its length (num_train_steps, num_epochs; the schedule follows
# the new length), logging, checkpointing cadence and input threads.
RESUMABLE_FIELDS = ('num_train_steps', 'num_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
                    'log_every_steps', 'progress_bar', 'input_workers')


class TrainingFault(RuntimeError):
  """A numerical fault (NaN/Inf) stopped the run."""


def _config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') else dict(config)


def _check_same_config(workdir: str, config) -> None:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = _config_to_dict(config)
  differing = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
  if differing:
    raise ValueError(
        f'workdir {workdir} holds a run with another config (fields {", ".join(differing)} '
        'differ); use a new --workdir or the same config.')


def _global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


class _PreemptionFlag:
  """Set by SIGTERM so the loop can checkpoint the current step and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get('keep_checkpoints', 2), create=True,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def _restore_latest(manager: ocp.CheckpointManager, abstract_state) -> tuple[Optional[Any], int]:
  """Restores the newest readable checkpoint, falling back to older ones with a warning.

  An unreadable checkpoint is moved aside to ``checkpoints_unreadable/`` (never deleted) so that
  the run can save that step again.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  unreadable = []
  restored, restored_step = None, 0
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      restored_step = step
      break
    except Exception as e:  # a truncated or corrupt checkpoint: try the previous one
      logging.warning('checkpoint at step %d is unreadable (corrupt, or saved for another '
                      'device layout: %s: %s); trying an older one',
                      step, type(e).__name__, str(e).splitlines()[0] if str(e) else '')
      unreadable.append(step)
  if unreadable:
    if jax.process_index() == 0:
      quarantine = os.path.join(os.path.dirname(str(manager.directory)), 'checkpoints_unreadable')
      os.makedirs(quarantine, exist_ok=True)
      for step in unreadable:
        target = os.path.join(quarantine, f'{step}.{int(time.time())}')
        shutil.move(os.path.join(str(manager.directory), str(step)), target)
        logging.warning('moved the unreadable checkpoint of step %d to %s', step, target)
    multihost_utils.sync_global_devices('samjax_checkpoints_quarantined')
    manager.reload()
  if restored is None and steps:
    raise ValueError(f'no readable checkpoint in {manager.directory}: all of steps {steps} are '
                     'corrupt (moved to checkpoints_unreadable/). Rerun to start afresh.')
  if unreadable and restored is not None:
    logging.warning('resumed from step %d, not the newest checkpoint', restored_step)
  return restored, restored_step


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops metric lines logged after the restored step, so a resumed log equals a straight one."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)['step'] <= last_step:
          lines.append(line if line.endswith('\n') else line + '\n')
      except (json.JSONDecodeError, KeyError):  # a line torn by a kill: it is re-logged
        continue
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, path)


def to_host(x) -> np.ndarray:
  """A replicated global array as numpy, also when other processes hold some of its devices."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def _to_python(metrics: dict) -> dict:
  return {k: float(to_host(v)) for k, v in metrics.items()}


def _check_finite(step: int, metrics: dict) -> None:
  for name in ('loss', 'grad_norm', 'sam_cosine'):
    if name in metrics and not np.isfinite(metrics[name]):
      raise TrainingFault(f'non-finite {name} ({metrics[name]}) at step {step}; the last good '
                          'checkpoint is kept. Lower optimizer.learning_rate or optimizer.rho.')


@functools.lru_cache(maxsize=8)
def _eval_apply(model, mesh):
  """One jitted eval-mode forward per (model, mesh), shared by every split evaluated."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True),
                 out_shardings=NamedSharding(mesh, P()))


def compute_features(model, variables, split, dataset, batch_size: int, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Frozen features and logits of a split (eval mode), as host numpy arrays."""
  sharding = NamedSharding(mesh, P(step_lib.DATA_AXIS))
  apply = _eval_apply(model, mesh)
  feats, logits = [], []
  count, index = jax.process_count(), jax.process_index()
  for batch, num_valid in data_lib.eval_batches(split, dataset, batch_size):
    rows = batch['image'].shape[0] // count
    local = batch['image'][index * rows:(index + 1) * rows]
    out_logits, out_feats = apply(variables, jax.make_array_from_process_local_data(sharding, local))
    logits.append(to_host(out_logits)[:num_valid])
    feats.append(to_host(out_feats)[:num_valid])
  return np.concatenate(feats), np.concatenate(logits)


def _group_errors(predictions, split, num_attributes) -> dict[int, float]:
  groups = split.labels * num_attributes + split.attributes
  wrong = predictions != split.labels
  return {int(g): float(np.mean(wrong[groups == g])) for g in np.unique(groups)}


def evaluate(model, variables, dataset, config, mesh) -> dict:
  """Test error, worst-group error and group-balanced linear-probe errors of each feature."""
  batch_size = config.get('eval_batch_size', config.batch_size)
  train_groups = dataset.train.labels * dataset.num_attributes + dataset.train.attributes
  frequency = {int(g): float(np.mean(train_groups == g)) for g in np.unique(train_groups)}

  def task_errors(split):
    _, logits = compute_features(model, variables, split, dataset, batch_size, mesh)
    predictions = np.argmax(logits, -1)
    per_group = _group_errors(predictions, split, dataset.num_attributes)
    average = float(np.mean(predictions != split.labels))
    weighted = sum(frequency.get(g, 0.0) * e for g, e in per_group.items())
    weighted /= max(sum(frequency.get(g, 0.0) for g in per_group), 1e-12)
    reported = weighted if config.get('group_weighted_test_error', False) else average
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
  probe_train_x, _ = compute_features(model, variables, dataset.probe_train, dataset, batch_size, mesh)
  probe_test_x, _ = compute_features(model, variables, dataset.probe_test, dataset, batch_size, mesh)
  for feature in ('label', 'attribute'):
    targets_train = getattr(dataset.probe_train, f'{feature}s')
    targets_test = getattr(dataset.probe_test, f'{feature}s')
    if len(np.unique(targets_train)) < 2:  # e.g. DomainBed's probe sets hold a single domain
      continue
    result[f'{feature}_probe_error'] = probe.probe_error(
        probe_train_x, targets_train, probe_test_x, targets_test,
        l2=config.get('probe_l2', 1e-3))
  hard = 'attribute' if dataset.easy_feature == 'label' else 'label'
  if f'{dataset.easy_feature}_probe_error' in result:
    result['easy_probe_error'] = result[f'{dataset.easy_feature}_probe_error']
  if f'{hard}_probe_error' in result:
    result['hard_probe_error'] = result[f'{hard}_probe_error']
  if 'label_probe_error' in result:
    result['probe_accuracy'] = 1.0 - result['label_probe_error']
  return result


def _model_config(config) -> dict:
  """config.model plus the compute dtype (parameters and optimizer state stay float32)."""
  return {**config.model.to_dict(), 'dtype': config.get('compute_dtype', 'float32')}


def _load_dataset(config):
  """Loads the data set; in a multi-process run process 0 builds it first, alone."""
  if jax.process_count() == 1:
    return data_lib.load_dataset(config.data, seed=DATA_SEED)
  dataset = data_lib.load_dataset(config.data, seed=DATA_SEED) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('samjax_dataset_prepared')
  if dataset is None:
    dataset = data_lib.load_dataset(config.data, seed=DATA_SEED)
  return dataset


def _num_train_steps(config, steps_per_epoch: int) -> int:
  if config.get('num_train_steps', None):
    return int(config.num_train_steps)
  return int(config.num_epochs) * steps_per_epoch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per ``config``, writes the workdir outputs, returns the final metrics (probe.json)."""
  validate_train_config(config, num_devices=jax.device_count())
  if os.path.exists(workdir):
    _check_same_config(workdir, config)
  dataset = _load_dataset(config)
  model = models.create_model(_model_config(config), dataset.num_classes)
  mesh = step_lib.make_mesh()
  is_lead = jax.process_index() == 0
  batches = data_lib.TrainBatches(
      dataset.train, dataset, config.batch_size, seed=config.seed,
      augment=config.data.get('augment', False), process_index=jax.process_index(),
      process_count=jax.process_count(), normalize=False)
  num_steps = _num_train_steps(config, batches.steps_per_epoch)
  tx, train_step = step_lib.make_train_step(
      model, config.optimizer, num_steps, mesh,
      perturbation=config.get('perturbation', 'sync'),
      log_diagnostics=config.get('log_diagnostics', True),
      microbatches=config.get('microbatches', 1),
      microbatch_mode=config.get('microbatch_mode', 'full_batch'),
      image_normalization=(dataset.mean, dataset.std))
  sample = dataset.normalize(batches.batch_at(0)['image'][:1])
  init_state = jax.jit(
      lambda rng: step_lib.create_train_state(model, tx, rng, sample),
      out_shardings=NamedSharding(mesh, P()))
  state = init_state(jax.random.key(config.seed))
  init_checkpoint = config.model.get('init_checkpoint', None)

  os.makedirs(workdir, exist_ok=True)
  if is_lead:
    atomic_write_json(os.path.join(workdir, 'config.json'), _config_to_dict(config))
  manager = _checkpoint_manager(workdir, config)
  restored, start_step = _restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('resumed from step %d', start_step)
  elif init_checkpoint:
    variables = models.load_pretrained(init_checkpoint, {'params': state.params,
                                                         'batch_stats': state.batch_stats})
    state = jax.device_put(state.replace(params=variables['params'],
                                         batch_stats=variables['batch_stats'],
                                         opt_state=tx.init(variables['params'])),
                           NamedSharding(mesh, P()))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if is_lead:
    _truncate_metrics(metrics_path, start_step)

  batch_sharding = NamedSharding(mesh, P(step_lib.DATA_AXIS))
  log_every = config.get('log_every_steps', 10)
  checkpoint_every = config.get('checkpoint_every_steps', 0) or num_steps
  writer = _SummaryWriter(os.path.join(workdir, 'tensorboard')) if is_lead else None
  progress = _progress_bar(is_lead and config.get('progress_bar', True), start_step, num_steps)
  pending: list[tuple[int, dict]] = []
  last_time, last_step = time.time(), start_step

  def flush(current_step: int) -> None:
    """Fetches pending metrics (one host sync), checks them, logs them."""
    nonlocal last_time, last_step
    for s, m in pending:
      m = _to_python(m)
      _check_finite(s, m)
      if is_lead and (s % log_every == 0 or s == num_steps):
        m = {'step': s, **m}
        with open(metrics_path, 'a') as f:
          f.write(json.dumps(m) + '\n')
        writer.write(s, m)
    pending.clear()
    now = time.time()
    if progress is not None and current_step > last_step:
      rate = (current_step - last_step) * config.batch_size / max(now - last_time, 1e-9)
      progress.set_postfix(images_per_s=f'{rate:.0f}')
    last_time, last_step = now, current_step

  local_batches = batches.iterate(start_step, num_workers=config.get('input_workers', 0))
  with _PreemptionFlag() as preemption, contextlib.closing(local_batches):
    for step in range(start_step + 1, num_steps + 1):
      batch = _global_batch(next(local_batches), batch_sharding)
      state, metrics = train_step(state, batch)
      pending.append((step, metrics))
      if progress is not None:
        progress.update(1)
      stop = preemption.requested or manager.reached_preemption(step)
      if step % log_every == 0 or step % checkpoint_every == 0 or step == num_steps or stop:
        flush(step)  # never checkpoint a state whose metrics were not checked
      if step % checkpoint_every == 0 or step == num_steps or stop:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
      if stop:
        logging.warning('preempted: checkpointed step %d; rerun the same command to resume', step)
        if progress is not None:
          progress.close()
        manager.close()
        multihost_utils.sync_global_devices('samjax_preempted')
        return {'preempted_at_step': step}
  if progress is not None:
    progress.close()
  manager.close()

  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  result = evaluate(model, variables, dataset, config, mesh)
  result['num_train_steps'] = num_steps
  if is_lead:
    atomic_write_json(os.path.join(workdir, 'probe.json'), result)
    writer.write(num_steps, {k: v for k, v in result.items() if isinstance(v, float)})
    writer.close()
  return result


def load_run(workdir: str, step: Optional[int] = None):
  """A finished (or checkpointed) run: ``(config, dataset, model, variables, step)``.

  Reads ``config.json`` and the newest checkpoint (or ``step``) of ``workdir`` so that
  diagnostics and figures can evaluate the trained model on its own data.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{workdir} holds no run: {path} is missing.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  dataset = data_lib.load_dataset(config.data, seed=DATA_SEED)
  model = models.create_model(_model_config(config), dataset.num_classes)
  tx = step_lib.make_optimizer(config.optimizer, max(int(config.get('num_train_steps', 0)), 1))
  batches = data_lib.TrainBatches(dataset.train, dataset, config.batch_size, seed=config.seed,
                                  augment=False)
  sample = batches.batch_at(0)['image'][:1]
  abstract = jax.eval_shape(lambda: step_lib.create_train_state(model, tx, jax.random.key(0), sample))
  # Restore replicated onto this process's devices, whatever layout the run was saved from.
  replicated = NamedSharding(step_lib.make_mesh(), P())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'{workdir} holds no checkpoint yet.')
  manager = _checkpoint_manager(workdir, config)
  if step is None:
    state, step = _restore_latest(manager, abstract)
  else:
    if step not in manager.all_steps():
      raise ValueError(f'{workdir}: no checkpoint at step {step}; saved steps: '
                       f'{sorted(manager.all_steps())}.')
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  if state is None:
    raise ValueError(f'{workdir} holds no checkpoint yet.')
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return config, dataset, model, variables, step


class _SummaryWriter:
  """TensorBoard scalars (tensorboardX: event files without a TensorFlow summary stack)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir)

  def write(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      if k != 'step':
        self._writer.add_scalar(k, v, global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _progress_bar(enabled: bool, start: int, total: int):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, smoothing=0.1)

"""Real-data training: ``train_and_evaluate(config, workdir)``.

One run trains a model with SGD or a member of the SAM family on a data set with two labelled
features (``label``, the training target, and ``attribute``, the other feature), then measures
how well the frozen representation encodes each feature with group-balanced linear probes
(:mod:`samjax.train.evaluate`). The workdir's files and rerun rules: :mod:`samjax.train.workdir`.

Data order, augmentation and schedules are functions of the step, so a run interrupted and
resumed from a checkpoint follows the same trajectory as one that ran straight through. Training
batches are made on the devices from the resident uint8 split or on the host
(``config.data.placement``; :func:`samjax.data.input.choose_placement`); every placement gives
the same batches, bit for bit.

Everything that can be refused (the config, the workdir, the rerun rules, the data set, the
initial checkpoint) is checked before the workdir is created or written.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from samjax import data as data_lib
from samjax.data import input as input_lib
from samjax import models
from samjax.config import validate_train_config
from samjax.io_utils import atomic_write_json
from samjax.train import checkpoint as checkpoint_lib
from samjax.train import evaluate as evaluate_lib
from samjax.train import step as step_lib
from samjax.train import workdir as workdir_lib
from samjax.train.optim import make_optimizer

# The data split (validation hold-out, probe subsets) is the same for every training seed, so the
# spread over seeds measures training randomness alone.
DATA_SEED = 0


class TrainingFault(RuntimeError):
  """A numerical fault (NaN/Inf) stopped the run.

  Attributes:
    workdir: the run's workdir.
    last_checkpoint: the newest sane checkpoint step of this session, or None: its parameters
      are finite and the loss at its step was no higher than at the session's first step
      (before the divergence began).
  """

  def __init__(self, message: str, workdir: str = '', last_checkpoint: Optional[int] = None):
    super().__init__(message)
    self.workdir = workdir
    self.last_checkpoint = last_checkpoint


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


def _to_python(metrics: dict) -> dict:
  return {k: float(evaluate_lib.to_host(v)) for k, v in metrics.items()}


def _check_finite(step: int, metrics: dict) -> None:
  for name in ('loss', 'grad_norm', 'sam_cosine'):
    if name in metrics and not np.isfinite(metrics[name]):
      raise TrainingFault(f'non-finite {name} ({metrics[name]}) at step {step}; the last good '
                          'checkpoint is kept.')


def _model_config(config) -> dict:
  """config.model plus the compute dtype (parameters and optimizer state stay float32)."""
  return {**config.model.to_dict(), 'dtype': config.compute_dtype}


def _load_dataset(config):
  """Loads the data set; processes sharing a data_dir prepare it once (the others wait)."""
  return data_lib.load_dataset(config.data, seed=DATA_SEED)


def _num_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps:
    return int(config.num_train_steps)
  return int(config.num_epochs) * steps_per_epoch


def _initial_variables(init_checkpoint: str, state) -> dict:
  """``{'params', 'batch_stats'}`` from ``model.init_checkpoint``; ValueError if unusable.

  ``init_checkpoint`` is a torchvision ResNet-18 state dict (.pth / .npz) or a samjax checkpoint
  folder (``<workdir>/checkpoints/<step>``, e.g. to continue after a NaN stop).
  """
  path = epath.Path(init_checkpoint)
  if checkpoint_lib.is_checkpoint(path):
    try:
      return checkpoint_lib.restore_variables(path, state)
    except Exception as e:  # pylint: disable=broad-except  # another model, or corrupt
      raise ValueError(f'config.model.init_checkpoint: {init_checkpoint} is not a checkpoint of '
                       f'this model ({type(e).__name__}).') from None
  try:
    return models.load_pretrained(init_checkpoint, {'params': state.params,
                                                    'batch_stats': state.batch_stats})
  except ValueError as e:
    raise ValueError(f'config.model.init_checkpoint: {init_checkpoint}: '
                     f'{str(e).splitlines()[0]}') from None
  except Exception as e:  # pylint: disable=broad-except  # garbage: pickle, zip, OS errors
    raise ValueError(f'config.model.init_checkpoint: {init_checkpoint} is not a readable '
                     f'ResNet-18 state dict (.pth or .npz): {type(e).__name__}') from None


def _check_paths(config) -> None:
  """The cheap checks of input paths, made before the data set is prepared or read."""
  init_checkpoint = config.model.init_checkpoint
  if init_checkpoint and not epath.Path(init_checkpoint).exists():
    raise ValueError(f'config.model.init_checkpoint: {init_checkpoint} does not exist.')


def _progress_bar(enabled: bool, start: int, total: int):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, smoothing=0.1)


def _writers(workdir: epath.Path, is_lead: bool):
  """(step metrics: metrics.jsonl + TensorBoard, TensorBoard alone), clu metric writers."""
  if not is_lead:
    return metric_writers.MultiWriter([]), metric_writers.MultiWriter([])
  tensorboard = metric_writers.SummaryWriter(str(workdir / workdir_lib.TENSORBOARD))
  jsonl = workdir_lib.JsonlWriter(workdir / workdir_lib.METRICS_FILE)
  return metric_writers.MultiWriter([jsonl, tensorboard]), tensorboard


def _on_lead(check) -> None:
  """Runs ``check`` (which may raise ValueError) on process 0; every process raises if it did."""
  if jax.process_count() == 1:
    check()
    return
  error = None
  if jax.process_index() == 0:
    try:
      check()
    except ValueError as e:
      error = e
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if int(failed):
    raise ValueError('process 0 refused the run (its message names the cause).')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per ``config``, writes the workdir outputs, returns the final metrics (probe.json)."""
  held = []
  try:
    return _train_and_evaluate(config, workdir, held)
  finally:
    for lock in held:
      lock.release()


def _train_and_evaluate(config, workdir: str, held: list) -> dict:
  validate_train_config(config, num_devices=jax.device_count())
  workdir_path = workdir_lib.check_usable(workdir)
  lock = workdir_lib.WorkdirLock(workdir_path)
  _on_lead(lock.check)  # before anything is read or written: a second run leaves no trace
  workdir_lib.check_rerun(workdir_path, config)
  _check_paths(config)
  dataset = _load_dataset(config)
  # Decided before the workdir is touched: 'device' on a split too large is a config error.
  layout, why = input_lib.choose_placement(
      config.data.placement, len(dataset.train), input_lib.example_nbytes(dataset.train),
      config.data.device_memory_budget_mb, jax.device_count())
  logging.info('training batches are made on the %s: %s',
               'host' if layout == 'host' else f'device (split {layout})', why)
  model = models.create_model(_model_config(config), dataset.num_classes)
  mesh = step_lib.make_mesh()
  is_lead = jax.process_index() == 0
  batches = data_lib.TrainBatches(
      dataset.train, dataset, config.batch_size, seed=config.seed,
      augment=config.data.augment, process_index=jax.process_index(),
      process_count=jax.process_count(), normalize=False)
  num_steps = _num_train_steps(config, batches.steps_per_epoch)
  workdir_lib.check_length(workdir_path, num_steps)
  tx, train_step = step_lib.make_train_step(
      model, config.optimizer, num_steps, mesh,
      perturbation=config.perturbation,
      log_diagnostics=config.log_diagnostics,
      microbatches=config.microbatches,
      microbatch_mode=config.microbatch_mode,
      image_normalization=(dataset.mean, dataset.std),
      device_data=None if layout == 'host' else layout)
  sample = dataset.normalize(batches.batch_at(0)['image'][:1])
  init_state = jax.jit(
      lambda rng: step_lib.create_train_state(model, tx, rng, sample),
      out_shardings=NamedSharding(mesh, P()))
  state = init_state(jax.random.key(config.seed))
  init_state_abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  initial = None
  if config.model.init_checkpoint:  # read before the workdir is touched: a bad file is exit 2
    initial = _initial_variables(config.model.init_checkpoint, state)

  workdir_path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    held.append(lock)
  _on_lead(lock.acquire)
  if is_lead:
    workdir_lib.write_config(workdir_path, config)
  manager = checkpoint_lib.manager(workdir_path, config.keep_checkpoints)
  restored, start_step = checkpoint_lib.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('resumed from step %d', start_step)
  elif initial is not None:
    state = jax.device_put(state.replace(params=initial['params'],
                                         batch_stats=initial['batch_stats'],
                                         opt_state=tx.init(initial['params'])),
                           NamedSharding(mesh, P()))
  if is_lead:
    workdir_lib.truncate_metrics(workdir_path / workdir_lib.METRICS_FILE, start_step)

  batch_sharding = NamedSharding(mesh, P(step_lib.DATA_AXIS))
  log_every = config.log_every_steps
  checkpoint_every = config.checkpoint_every_steps or num_steps
  writer, tensorboard = _writers(workdir_path, is_lead)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=tensorboard, every_steps=log_every, every_secs=None)
  progress = _progress_bar(is_lead and config.progress_bar, start_step, num_steps)
  pending: list[tuple[int, dict]] = []
  last_time, last_step = time.monotonic(), start_step
  losses: dict[int, float] = {}  # loss at every step of this session, for the NaN advice

  def flush(current_step: int) -> None:
    """Fetches pending metrics (one host sync), checks them, logs them."""
    nonlocal last_time, last_step
    last_logged = None
    for s, m in pending:
      m = _to_python(m)
      losses[s] = m['loss']
      try:
        _check_finite(s, m)
      except TrainingFault as e:
        first_loss = losses[min(losses)]
        sane = [step for step in manager.all_steps()
                if step in losses and losses[step] <= first_loss]
        finite = checkpoint_lib.newest_finite_step(manager, init_state_abstract, sane)
        manager.close()
        raise TrainingFault(str(e), str(workdir), finite) from None
      if s % log_every == 0 or s == num_steps:
        writer.write_scalars(s, m)
        last_logged = m
    pending.clear()
    writer.flush()
    now = time.monotonic()
    if progress is not None and current_step > last_step:
      rate = (current_step - last_step) / max(now - last_time, 1e-9)
      postfix = {'steps_per_s': f'{rate:.1f}'}
      if last_logged is not None:
        postfix = {'loss': f'{last_logged["loss"]:.4f}', **postfix}
      progress.set_postfix(postfix)
    last_time, last_step = now, current_step

  if layout != 'host':
    # Per step the host only draws indices and crop/flip parameters: no threads needed.
    resident = (input_lib.resident_split(dataset.train, mesh, layout),)
    local_batches = (batches.device_inputs(s) for s in itertools.count(start_step))
  else:
    resident = ()
    local_batches = batches.iterate(start_step, num_workers=config.input_workers)
  with _PreemptionFlag() as preemption, contextlib.closing(local_batches):
    for step in range(start_step + 1, num_steps + 1):
      batch = _global_batch(next(local_batches), batch_sharding)
      state, metrics = train_step(state, batch, *resident)
      pending.append((step, metrics))
      report_progress(step)
      if progress is not None:
        progress.update(1)
      stop = preemption.requested or manager.reached_preemption(step)
      if step % log_every == 0 or step % checkpoint_every == 0 or step == num_steps or stop:
        flush(step)  # never checkpoint a state whose metrics were not checked
      if step % checkpoint_every == 0 or step == num_steps or stop:
        checkpoint_lib.save(manager, step, state)
      if stop:
        logging.warning('preempted: checkpointed step %d; rerun the same command to resume', step)
        if progress is not None:
          progress.close()
        manager.close()
        writer.close()
        tensorboard.close()
        multihost_utils.sync_global_devices('samjax_preempted')
        return {'preempted_at_step': step}
  if progress is not None:
    progress.close()
  manager.close()

  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  result = evaluate_lib.evaluate(
      model, variables, dataset, batch_size=config.eval_batch_size,
      group_weighted_test_error=config.group_weighted_test_error, probe_l2=config.probe_l2,
      mesh=mesh)
  result['num_train_steps'] = num_steps
  if is_lead:
    atomic_write_json(workdir_path / workdir_lib.PROBE_FILE, result)
    tensorboard.write_scalars(num_steps, {k: v for k, v in result.items() if isinstance(v, float)})
  writer.close()
  tensorboard.close()
  return result


def load_run(workdir: str, step: Optional[int] = None):
  """A finished (or checkpointed) run: ``(config, dataset, model, variables, step)``.

  Reads ``config.json`` and the newest checkpoint (or ``step``) of ``workdir`` so that
  diagnostics and figures can evaluate the trained model on its own data.
  """
  workdir_path = epath.Path(workdir)
  saved = workdir_lib.saved_config(workdir_path)
  if saved is None:
    raise ValueError(f'{workdir} holds no run: {workdir_path / workdir_lib.CONFIG_FILE} is '
                     'missing.')
  config = ml_collections.ConfigDict(saved)
  dataset = data_lib.load_dataset(config.data, seed=DATA_SEED)
  model = models.create_model(_model_config(config), dataset.num_classes)
  tx = make_optimizer(config.optimizer, max(int(config.num_train_steps), 1))
  batches = data_lib.TrainBatches(dataset.train, dataset, config.batch_size, seed=config.seed,
                                  augment=False)
  sample = batches.batch_at(0)['image'][:1]
  abstract = jax.eval_shape(lambda: step_lib.create_train_state(model, tx, jax.random.key(0),
                                                                sample))
  # Restore replicated onto this process's devices, whatever layout the run was saved from.
  replicated = NamedSharding(step_lib.make_mesh(), P())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  if not workdir_lib.checkpoint_steps(workdir_path):
    raise ValueError(f'{workdir} holds no checkpoint yet.')
  manager = checkpoint_lib.manager(workdir_path, config.keep_checkpoints)
  if step is None:
    state, step = checkpoint_lib.restore_latest(manager, abstract)
  else:
    state = checkpoint_lib.restore_step(manager, abstract, step)
  manager.close()
  if state is None:
    raise ValueError(f'{workdir} holds no checkpoint yet.')
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return config, dataset, model, variables, step

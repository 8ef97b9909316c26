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
initial checkpoint) is checked before the workdir is created or written; paths first, before the
data set is prepared.

Shape: :func:`build_run` turns a config into a :class:`Run` (data, model, mesh, batches,
optimizer, jitted step), for training and for :func:`load_run` alike. The loop body is the step,
then hooks on their own cadence: the metrics (kept on the devices, fetched and checked finite
every ``log_every_steps``), clu's ``ReportProgress`` (steps/s to TensorBoard), the progress bar,
clu's ``Profile`` (``config.profile_steps``: a ``jax.profiler`` trace in ``tensorboard/``), and
the checkpoints on orbax's cadence (``CheckpointManager.should_save``: every
``checkpoint_every_steps``, the last step, orbax's preemption points) or at SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions, profiler
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from samjax import data as data_lib
from samjax.data import input as input_lib
from samjax import models
from samjax.cli import first_line
from samjax.config import validate_config
from samjax.io_utils import atomic_write_json
from samjax.train import checkpoint as checkpoint_lib
from samjax.train import evaluate as evaluate_lib
from samjax.train import step as step_lib
from samjax.train import workdir as workdir_lib

# The data split (validation hold-out, probe subsets) is the same for every training seed, so the
# spread over seeds measures training randomness alone.
DATA_SEED = 0
# A trace (config.profile_steps) starts this many steps into a session: compiled and warm.
PROFILE_AFTER_STEPS = 10


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
                     f'{first_line(e)}') from None
  except Exception as e:  # pylint: disable=broad-except  # garbage: pickle, zip, OS errors
    raise ValueError(f'config.model.init_checkpoint: {init_checkpoint} is not a readable '
                     f'ResNet-18 state dict (.pth or .npz): {type(e).__name__}') from None


def _check_paths(config) -> None:
  """The cheap checks of input paths, made before the data set is prepared or read."""
  init_checkpoint = config.model.init_checkpoint
  if init_checkpoint and not epath.Path(init_checkpoint).exists():
    raise ValueError(f'config.model.init_checkpoint: {init_checkpoint} does not exist.')


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


# ----------------------------------------------------------------------------------------------
# Setup: one function builds a run, for training and for evaluating a saved one.


@dataclasses.dataclass(frozen=True)
class Run:
  """What a config builds: the data, the model, the mesh, the batches, the optimizer and step.

  Attributes:
    config: the run's config.
    dataset: the data set in memory.
    model: the flax module.
    mesh: the 1-D ``'data'`` mesh over every device.
    batches: the training batches (a pure function of the step).
    num_steps: the run's length.
    layout: where training batches are made: ``'host'``, or on the devices from the resident
      split ``'replicated'`` or ``'sharded'``.
    tx: the optimizer.
    train_step: the jitted step (:func:`samjax.train.step.make_train_step`).
    sample: one normalised input, which fixes the parameters' shapes.
  """
  config: ml_collections.ConfigDict
  dataset: Any
  model: Any
  mesh: Mesh
  batches: Any
  num_steps: int
  layout: str
  tx: Any
  train_step: Callable
  sample: np.ndarray

  def _create_state(self, rng):
    return step_lib.create_train_state(self.model, self.tx, rng, self.sample)

  def init_state(self) -> step_lib.TrainState:
    """The initial state from ``config.seed``, replicated over the mesh."""
    # A plain function: the Run (arrays, a ConfigDict) is not hashable.
    init = jax.jit(lambda rng: self._create_state(rng),  # pylint: disable=unnecessary-lambda
                   out_shardings=NamedSharding(self.mesh, P()))
    return init(jax.random.key(self.config.seed))

  def abstract_state(self):
    """The state's shapes and dtypes, replicated over this process's devices (for restores)."""
    replicated = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(self._create_state, jax.random.key(0)))


def build_run(config: ml_collections.ConfigDict) -> Run:
  """Loads the data set and builds the model, batches, optimizer and step that ``config`` names.

  Writes nothing (the data set is prepared once if absent, :mod:`samjax.data.prepare`); raises
  ValueError for a placement the devices cannot hold.
  """
  dataset = _load_dataset(config)
  layout, why = input_lib.choose_placement(
      config.data.placement, len(dataset.train), input_lib.example_nbytes(dataset.train),
      config.data.device_memory_budget_mb, jax.device_count())
  logging.info('training batches are made on the %s: %s',
               'host' if layout == 'host' else f'device (split {layout})', why)
  model = models.create_model(_model_config(config), dataset.num_classes)
  mesh = step_lib.make_mesh()
  batches = data_lib.TrainBatches(
      dataset.train, dataset, config.batch_size, seed=config.seed,
      augment=config.data.augment, process_index=jax.process_index(),
      process_count=jax.process_count(), normalize=False)
  num_steps = _num_train_steps(config, batches.steps_per_epoch)
  spec = step_lib.StepSpec(
      config.optimizer, num_steps, perturbation=config.perturbation,
      log_diagnostics=config.log_diagnostics, microbatches=config.microbatches,
      microbatch_mode=config.microbatch_mode,
      image_normalization=(dataset.mean, dataset.std),
      device_data=None if layout == 'host' else layout)
  tx, train_step = step_lib.make_train_step(model, mesh, spec)
  sample = dataset.normalize(batches.batch_at(0)['image'][:1])
  return Run(config, dataset, model, mesh, batches, num_steps, layout, tx, train_step, sample)


# ----------------------------------------------------------------------------------------------
# Hooks: what happens around the step, each on its own cadence.


class _StepMetrics:
  """Metrics stay on the devices until a flush: one host sync fetches them, checks every step's
  finite (:class:`TrainingFault` otherwise) and writes every ``log_every``-th and the last."""

  def __init__(self, writer, log_every: int, num_steps: int, on_flush: Callable):
    self._writer, self._log_every, self._num_steps = writer, log_every, num_steps
    self._on_flush = on_flush
    self._pending: list[tuple[int, dict]] = []
    self.losses: dict[int, float] = {}  # every step's loss of this session, for the NaN advice

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self, step: int) -> None:
    last_logged = None
    for s, m in self._pending:
      m = _to_python(m)
      self.losses[s] = m['loss']
      _check_finite(s, m)
      if s % self._log_every == 0 or s == self._num_steps:
        self._writer.write_scalars(s, m)
        last_logged = m
    self._pending.clear()
    self._writer.flush()
    self._on_flush(step, last_logged)


class _Checkpoints:
  """Saves on orbax's own cadence (the manager's ``save_interval_steps`` and last step), or when
  forced (preemption); the metrics up to the step are checked first, so that no checkpoint
  holds a state whose metrics were not."""

  def __init__(self, manager, metrics: _StepMetrics):
    self._manager, self._metrics = manager, metrics

  def __call__(self, step: int, state, force: bool = False) -> None:
    if force or self._manager.should_save(step):
      self._metrics.flush(step)
      checkpoint_lib.save(self._manager, step, state)


class _ProgressBar:
  """A tqdm bar on process 0 (``config.progress_bar``): a tick per step; loss and rate at flushes."""

  def __init__(self, enabled: bool, start: int, total: int):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True,
                       smoothing=0.1)
    self._last_time, self._last_step = time.monotonic(), start

  def __call__(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def show(self, step: int, logged: Optional[dict]) -> None:
    now = time.monotonic()
    if self._bar is not None and step > self._last_step:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      postfix = {'steps_per_s': f'{rate:.1f}'}
      if logged is not None:
        postfix = {'loss': f'{logged["loss"]:.4f}', **postfix}
      self._bar.set_postfix(postfix)
    self._last_time, self._last_step = now, step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class _Profile(periodic_actions.Profile):
  """clu's ``Profile``: a ``jax.profiler`` trace of ``num_steps`` steps from the
  ``PROFILE_AFTER_STEPS``-th step of the session (compiled and warm), into TensorBoard's
  folder; a trace still open at the end is closed there."""

  def __init__(self, logdir: epath.Path, num_steps: int, start_step: int):
    super().__init__(logdir=logdir, num_profile_steps=num_steps, profile_duration_ms=None,
                     first_profile=start_step + PROFILE_AFTER_STEPS, every_secs=None)

  def close(self) -> None:
    if self._session_running:  # clu's own state: a run shorter than the trace ends it here
      self._end_session(profiler.stop())


# ----------------------------------------------------------------------------------------------
# train_and_evaluate.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per ``config``, writes the workdir outputs, returns the final metrics (probe.json)."""
  held = []
  try:
    return _train_and_evaluate(config, workdir, held)
  finally:
    for lock in held:
      lock.release()


def _train_and_evaluate(config, workdir: str, held: list) -> dict:
  validate_config(config, num_devices=jax.device_count())
  workdir_path = workdir_lib.check_usable(workdir)
  lock = workdir_lib.WorkdirLock(workdir_path)
  _on_lead(lock.check)  # before anything is read or written: a second run leaves no trace
  workdir_lib.check_rerun(workdir_path, config)
  _check_paths(config)
  run = build_run(config)
  workdir_lib.check_length(workdir_path, run.num_steps)
  state = run.init_state()
  initial = None
  if config.model.init_checkpoint:  # read before the workdir is touched: a bad file is exit 2
    initial = _initial_variables(config.model.init_checkpoint, state)

  workdir_path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    held.append(lock)
  _on_lead(lock.acquire)
  is_lead = jax.process_index() == 0
  if is_lead:
    workdir_lib.write_config(workdir_path, config)
  manager = checkpoint_lib.manager(workdir_path, config.keep_checkpoints,
                                   save_every=config.checkpoint_every_steps or run.num_steps,
                                   last_step=run.num_steps)
  restored, start_step = checkpoint_lib.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('resumed from step %d', start_step)
  elif initial is not None:
    state = jax.device_put(state.replace(params=initial['params'],
                                         batch_stats=initial['batch_stats'],
                                         opt_state=run.tx.init(initial['params'])),
                           NamedSharding(run.mesh, P()))
  if is_lead:
    workdir_lib.truncate_metrics(workdir_path / workdir_lib.METRICS_FILE, start_step)

  writer, tensorboard = _writers(workdir_path, is_lead)
  try:
    state, preempted_at = _train(run, state, start_step, manager, workdir_path, writer,
                                 tensorboard, is_lead)
  finally:
    manager.close()
  if preempted_at is not None:
    writer.close()
    tensorboard.close()
    multihost_utils.sync_global_devices('samjax_preempted')
    return {'preempted_at_step': preempted_at}

  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  result = evaluate_lib.evaluate(
      run.model, variables, run.dataset, batch_size=config.eval_batch_size,
      group_weighted_test_error=config.group_weighted_test_error, probe_l2=config.probe_l2,
      mesh=run.mesh)
  result['num_train_steps'] = run.num_steps
  if is_lead:
    atomic_write_json(workdir_path / workdir_lib.PROBE_FILE, result)
    tensorboard.write_scalars(run.num_steps,
                              {k: v for k, v in result.items() if isinstance(v, float)})
  writer.close()
  tensorboard.close()
  return result


def _train(run: Run, state, start_step: int, manager, workdir: epath.Path, writer, tensorboard,
           is_lead: bool):
  """The loop: the step, then the hooks. Returns ``(state, None)`` at the end, or
  ``(state, step)`` when preempted at ``step`` (checkpointed)."""
  config, num_steps = run.config, run.num_steps
  progress = _ProgressBar(is_lead and config.progress_bar, start_step, num_steps)
  metrics = _StepMetrics(writer, config.log_every_steps, num_steps, on_flush=progress.show)
  checkpoints = _Checkpoints(manager, metrics)
  hooks = [
      periodic_actions.PeriodicCallback(
          every_steps=config.log_every_steps, on_steps=[num_steps],
          callback_fn=lambda step, t: metrics.flush(step)),
      periodic_actions.ReportProgress(num_train_steps=num_steps, writer=tensorboard,
                                      every_steps=config.log_every_steps, every_secs=None),
      progress,
  ]
  profile = None
  if is_lead and config.profile_steps:
    profile = _Profile(workdir / workdir_lib.TENSORBOARD, config.profile_steps, start_step)
    hooks.append(profile)

  batch_sharding = NamedSharding(run.mesh, P(step_lib.DATA_AXIS))
  if run.layout != 'host':
    # Per step the host only draws indices and crop/flip parameters: no threads needed.
    resident = (input_lib.resident_split(run.dataset.train, run.mesh, run.layout),)
    local_batches = (run.batches.device_inputs(s) for s in itertools.count(start_step))
  else:
    resident = ()
    local_batches = run.batches.iterate(start_step, num_workers=config.input_workers)
  try:
    with _PreemptionFlag() as preemption, contextlib.closing(local_batches):
      for step in range(start_step + 1, num_steps + 1):
        batch = _global_batch(next(local_batches), batch_sharding)
        state, step_metrics = run.train_step(state, batch, *resident)
        metrics.add(step, step_metrics)
        for hook in hooks:
          hook(step)
        stop = preemption.requested or manager.reached_preemption(step)
        checkpoints(step, state, force=stop)
        if stop:
          logging.warning('preempted: checkpointed step %d; rerun the same command to resume',
                          step)
          return state, step
  except TrainingFault as fault:
    losses = metrics.losses
    sane = [s for s in manager.all_steps() if s in losses and losses[s] <= losses[min(losses)]]
    finite = checkpoint_lib.newest_finite_step(manager, run.abstract_state(), sane)
    raise TrainingFault(str(fault), str(workdir), finite) from None
  finally:
    progress.close()
    if profile is not None:
      profile.close()
  return state, None


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
  if not workdir_lib.checkpoint_steps(workdir_path):
    raise ValueError(f'{workdir} holds no checkpoint yet.')
  config = ml_collections.ConfigDict(saved)
  # Evaluation makes no training batches: the placement must not refuse this machine.
  evaluation = config.copy_and_resolve_references()
  evaluation.data.placement = 'host'
  run = build_run(evaluation)
  manager = checkpoint_lib.manager(workdir_path, config.keep_checkpoints)
  # Restored replicated onto this process's devices, whatever layout the run was saved from.
  if step is None:
    state, step = checkpoint_lib.restore_latest(manager, run.abstract_state())
  else:
    state = checkpoint_lib.restore_step(manager, run.abstract_state(), step)
  manager.close()
  if state is None:
    raise ValueError(f'{workdir} holds no checkpoint yet.')
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return config, run.dataset, run.model, variables, step

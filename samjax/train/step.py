"""The train state and the one jitted train step (the optimizer: :mod:`samjax.train.optim`).

The step is a pure function ``(state, batch) -> (state, metrics)`` over a global batch sharded on
the ``'data'`` axis of a :class:`jax.sharding.Mesh`:

* ``perturbation='sync'``: ``jax.jit`` with ``NamedSharding``s. The step is written for the global
  batch and XLA inserts the all-reduces, so one phantom is formed from the global gradient: the
  same mathematics as on one device.
* ``perturbation='per_device'``: ``jax.shard_map``; each device perturbs with its own gradient
  (Foret et al.'s m-sharpness, ``m`` = per-device batch) and the phantom gradients are averaged.

BatchNorm: running statistics are updated from the clean pass at ``theta`` only. The phantom pass
normalises with its own batch statistics (as every train-mode pass does) and its statistic
updates are discarded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from samjax import SamState
from samjax import diagnostics
from samjax.config import MICROBATCH_MODES, PERTURBATIONS
from samjax.data.dataset import scale_and_offset
from samjax.data.input import gather_batch, gather_batch_from_shards, resident_partition
from samjax.gradients import (accumulated_grad, device_varying, mean_over_microbatches,
                              merge_microbatches)
from samjax.train.optim import find_sam_state, learning_rate_schedule, optimizer_parts

PyTree = Any
DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def create_train_state(model, tx, rng: jax.Array, sample_input: np.ndarray) -> TrainState:
  variables = model.init(rng, jnp.asarray(sample_input), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_loss_fn(model) -> Callable:
  """``loss_fn(params, batch_stats, batch) -> (mean loss, (logits, new_batch_stats))``."""

  def loss_fn(params, batch_stats, batch):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
      logits, updates = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
      new_batch_stats = updates['batch_stats']
    else:
      logits = model.apply(variables, batch['image'], train=True)
      new_batch_stats = batch_stats
    return jnp.mean(cross_entropy(logits, batch['label'])), (logits, new_batch_stats)

  return loss_fn


def _per_microbatch_sam_update(state: TrainState, params, batch, *, grad_and_aux, parts,
                               sam_index: int, k: int, axis_name: Optional[str]):
  """m-sharpness over micro-batches: each is perturbed with its own gradient.

  ``update = post(mean_i grad L_i(theta + e_i))`` with ``e_i`` formed by the SAM transform from
  micro-batch ``i``'s (pre-processed) gradient; the SAM state's statistics are averaged.
  """
  opt_states = state.opt_state
  sam_tx = parts[sam_index]

  def one(micro_batch):
    (loss, (logits, new_stats)), g = grad_and_aux(params, state.batch_stats, micro_batch)
    for j in range(sam_index):  # transformations before SAM (none in make_optimizer's chain)
      g, _ = parts[j].update(g, opt_states[j], state.params)
    phantom_logits = []

    def grad_fn(phantom, *unused):
      if axis_name is not None:
        phantom = device_varying(phantom, axis_name)
      (_, (logits_at_phantom, _)), phantom_grads = grad_and_aux(phantom, state.batch_stats,
                                                                 micro_batch)
      phantom_logits.append(logits_at_phantom)
      return phantom_grads

    out, s = sam_tx.update(g, opt_states[sam_index], state.params, grad_fn=grad_fn)
    stats = (s.grad_norm, s.perturbation_norm, s.cosine)
    return (loss, out, stats), (logits, phantom_logits[0], new_stats)

  (loss, updates, stats), aux = mean_over_microbatches(one, batch, k)
  new_states = list(opt_states)
  new_states[sam_index] = SamState(optax.safe_increment(opt_states[sam_index].count), *stats)
  for j in range(sam_index + 1, len(parts)):
    updates, new_states[j] = parts[j].update(updates, opt_states[j], state.params)
  return updates, tuple(new_states), loss, aux


def _local_step(state: TrainState, batch, *, loss_fn, tx, parts, sam_index, schedule,
                uses_sam: bool, log_diagnostics: bool, axis_name: Optional[str],
                microbatches: int, microbatch_mode: str, image_normalization=None):
  """One step on the batch this function sees (global under jit, local under shard_map)."""
  if image_normalization is not None:
    scale, offset = image_normalization
    batch = {**batch, 'image': batch['image'].astype(jnp.float32) * scale - offset}
  params = state.params
  if axis_name is not None:
    # Per-device gradients: replicated params would otherwise give gradients summed over the axis.
    params = device_varying(params, axis_name)
  grad_and_aux = jax.value_and_grad(loss_fn, has_aux=True)

  def loss_and_aux(p, b):
    loss, aux = loss_fn(p, state.batch_stats, b)
    return loss, (loss, aux)

  accumulated = accumulated_grad(loss_and_aux, microbatches, has_aux=True)

  def grads_at(p, b):
    """Mean loss and gradient over the micro-batches of ``b`` (the batch itself when k = 1)."""
    g, (losses, aux) = accumulated(p, b)
    return jnp.mean(losses), g, aux

  if microbatches > 1 and microbatch_mode == 'per_microbatch' and uses_sam:
    updates, opt_state, loss, (logits, phantom, new_stats) = _per_microbatch_sam_update(
        state, params, batch, grad_and_aux=grad_and_aux, parts=parts, sam_index=sam_index,
        k=microbatches, axis_name=axis_name)
    phantom_logits = [phantom]
  else:
    loss, grads, (logits, new_stats) = grads_at(params, batch)
    phantom_logits = []

    def grad_fn(phantom, *unused):  # *unused: optax.contrib.sam passes an inner-step index
      if axis_name is not None:  # leaves outside an LSAM mask are still replicated
        phantom = device_varying(phantom, axis_name)
      _, phantom_grads, (logits_at_phantom, _) = grads_at(phantom, batch)
      phantom_logits.append(logits_at_phantom)  # same trace: reuses this forward pass
      return phantom_grads

    if axis_name is not None and not uses_sam:
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
  logits = merge_microbatches(logits)
  # BatchNorm: the clean pass's statistics; with micro-batches, the mean of their updates.
  new_batch_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), new_stats)
  new_params = optax.apply_updates(state.params, updates)
  correct = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  metrics = {'loss': loss, 'accuracy': correct}
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
    new_batch_stats = jax.lax.pmean(new_batch_stats, axis_name)
  metrics['learning_rate'] = schedule(state.step)
  sam_state = find_sam_state(opt_state)
  if sam_state is not None:
    metrics.update(grad_norm=sam_state.grad_norm, sam_cosine=sam_state.cosine,
                   perturbation_norm=sam_state.perturbation_norm)
  elif not uses_sam:
    metrics['grad_norm'] = optax.tree.norm(grads)
  if log_diagnostics and sam_state is not None:
    labels, clean, phantom = batch['label'], logits, merge_microbatches(phantom_logits[0])
    if axis_name is not None:
      gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
      labels, clean, phantom = gather(labels), gather(clean), gather(phantom)
    gini_stats = diagnostics.batch_gini_stats(clean, phantom, labels)
    if axis_name is not None:  # equal on every device already; pmax marks them replicated, exactly
      gini_stats = jax.lax.pmax(gini_stats, axis_name)
    metrics.update(gini_stats)
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the train step computes, apart from the model and the mesh.

  Attributes:
    optimizer: ``config.optimizer`` (see :func:`samjax.train.optim.make_optimizer`).
    num_train_steps: length of the learning-rate schedule.
    perturbation: ``'sync'`` (one phantom from the global gradient) or ``'per_device'``.
    log_diagnostics: add the Gini coefficients of the importance weights at ``theta`` and at
      the phantom to the metrics, from the logits both passes already compute.
    microbatches: split the (per-device) batch into this many micro-batches, processed one at a
      time with ``lax.scan`` so activation memory is that of one micro-batch.
    microbatch_mode: ``'full_batch'``: the ascent direction is the gradient of the whole batch
      (accumulated), then the phantom gradient is accumulated again; without BatchNorm this
      equals the un-accumulated step. ``'per_microbatch'``: each micro-batch is perturbed with
      its own gradient and the phantom gradients are averaged (m-sharpness, m = micro-batch
      size). With BatchNorm every micro-batch normalises with its own statistics (ghost batch
      norm) and the running statistics take the mean of the micro-batches' updates.
    image_normalization: ``(mean, std)`` per channel: the batch's images arrive as uint8 and are
      normalised inside the step, ``(x - mean) / std``, which spares the host 4x the work and
      the transfer.
    device_data: ``'replicated'`` or ``'sharded'``, the layout of the resident split: the step
      takes ``inputs`` (:meth:`samjax.data.input.TrainBatches.device_inputs`: indices and
      crop/flip parameters, sharded like a batch) and ``resident`` (the uint8 split,
      :func:`samjax.data.input.resident_split` in that layout) instead of a batch; the batch is
      gathered, cropped and flipped on the devices, bit-identical to the host's. ``resident``
      is an argument, not a constant captured by the step, so the split is not embedded in
      the compiled program.
    donate: donate the input state's buffers to the output state.
  """
  optimizer: Any
  num_train_steps: int
  perturbation: str = 'sync'
  log_diagnostics: bool = False
  microbatches: int = 1
  microbatch_mode: str = 'full_batch'
  image_normalization: Optional[tuple[np.ndarray, np.ndarray]] = None
  device_data: Optional[str] = None
  donate: bool = True

  def __post_init__(self):
    if self.perturbation not in PERTURBATIONS:
      raise ValueError(f'perturbation must be one of {PERTURBATIONS}, got {self.perturbation!r}.')
    if self.microbatches < 1:
      raise ValueError(f'microbatches must be >= 1, got {self.microbatches}.')
    if self.microbatch_mode not in MICROBATCH_MODES:
      raise ValueError(f'microbatch_mode must be one of {MICROBATCH_MODES}, got '
                       f'{self.microbatch_mode!r}.')


def make_train_step(model, mesh: Mesh, spec: StepSpec, *,
                    tx: Optional[optax.GradientTransformation] = None):
  """Builds ``(tx, step)`` where ``step(state, batch) -> (state, metrics)`` is jitted.

  With ``spec.device_data`` the step is ``step(state, inputs, resident) -> (state, metrics)``:
  it makes the batch itself from the resident split (:func:`device_data_batch`).

  Args:
    model: a flax module following samjax's model convention.
    mesh: a 1-D mesh with axis ``'data'``; the batch is sharded over it, the state replicated.
    spec: what the step computes (:class:`StepSpec`).
    tx: an optimizer to use instead of the one ``spec.optimizer`` describes (e.g. to compare
      with ``optax.contrib.sam``); it receives ``grad_fn`` like samjax's transforms do.
  Returns:
    The optimizer (for ``create_train_state``) and the jitted step.
  """
  opt_config, num_train_steps = spec.optimizer, spec.num_train_steps
  microbatches, microbatch_mode = spec.microbatches, spec.microbatch_mode
  per_device = spec.perturbation == 'per_device'
  axis_name = DATA_AXIS if per_device else None
  parts, sam_index = optimizer_parts(opt_config, num_train_steps, axis_name=axis_name,
                                     sync_perturbation=not per_device)
  if tx is None:
    tx = optax.chain(*parts)
  elif microbatch_mode == 'per_microbatch' and microbatches > 1:
    raise ValueError('per-micro-batch perturbation needs the optimizer that opt_config describes.')
  local = functools.partial(
      _local_step, loss_fn=make_loss_fn(model), tx=tx, parts=parts, sam_index=sam_index,
      schedule=learning_rate_schedule(opt_config, num_train_steps),
      uses_sam=opt_config.name != 'sgd', log_diagnostics=spec.log_diagnostics,
      axis_name=axis_name,
      microbatches=microbatches, microbatch_mode=microbatch_mode,
      image_normalization=(None if spec.image_normalization is None
                           else scale_and_offset(*spec.image_normalization)))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  if per_device:
    local = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
  donate = (0,) if spec.donate else ()
  if spec.device_data is None:
    step = jax.jit(local, in_shardings=(replicated, batch_sharding),
                   out_shardings=(replicated, replicated), donate_argnums=donate)
    return tx, step
  make_batch = device_data_batch(mesh, spec.device_data)

  def fed(state, inputs, resident):
    return local(state, make_batch(resident, inputs))

  resident_sharding = NamedSharding(mesh, resident_partition(spec.device_data, DATA_AXIS))
  # The resident split is not donated: it serves every step.
  step = jax.jit(fed, in_shardings=(replicated, batch_sharding, resident_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=donate)
  return tx, step


def device_data_batch(mesh: Mesh, layout: str = 'replicated') -> Callable:
  """``(resident, inputs) -> uint8 batch`` sharded on ``'data'``, as a traceable function.

  Every device makes its own rows of the batch in a ``shard_map``, so the batch enters the step
  exactly as a host batch sharded ``P('data')`` would, under ``'sync'`` and ``'per_device'``
  alike. ``layout='replicated'``: from its replica of the split, with no communication
  (:func:`samjax.data.input.gather_batch`); ``'sharded'``: from the devices' shards, with one
  reduce-scatter of the batch (:func:`samjax.data.input.gather_batch_from_shards`).
  ``resident``: :func:`samjax.data.input.resident_split` in that layout; ``inputs``:
  :meth:`samjax.data.input.TrainBatches.device_inputs` as global arrays.
  """
  resident_spec = resident_partition(layout, DATA_AXIS)
  gather = (gather_batch if layout == 'replicated'
            else functools.partial(gather_batch_from_shards, axis_name=DATA_AXIS))
  return jax.shard_map(gather, mesh=mesh, in_specs=(resident_spec, P(DATA_AXIS)),
                       out_specs=P(DATA_AXIS))

"""The train state, the optimizer built from a config, and the one jitted train step.

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

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from samjax import diagnostics
from samjax.sam import SamState, lsam, sam

PyTree = Any
OPTIMIZERS = ('sgd', 'sam', 'lsam', 'asam')
PERTURBATIONS = ('sync', 'per_device')
DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """``opt_config.schedule``: 'cosine' (decay to 0 over the run) or 'constant'."""
  name = opt_config.get('schedule', 'cosine')
  if name == 'cosine':
    return optax.cosine_decay_schedule(opt_config.learning_rate, max(int(num_train_steps), 1))
  if name == 'constant':
    return optax.constant_schedule(opt_config.learning_rate)
  raise ValueError(f"optimizer.schedule must be one of ('cosine', 'constant'), got {name!r}.")


def make_optimizer(opt_config, num_train_steps: int, *, axis_name: Optional[str] = None,
                   sync_perturbation: bool = True) -> optax.GradientTransformationExtraArgs:
  """``optax.chain([clip], [sam | lsam | asam], [weight decay], sgd(schedule, momentum))``.

  The SAM transform comes first so that it sees the raw gradient and every later transformation
  sees the phantom gradient; weight decay is added at ``theta``.
  """
  name = opt_config.name
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name must be one of {OPTIMIZERS}, got {name!r}.')
  parts = []
  clip = opt_config.get('grad_clip_norm', None)
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  sam_kwargs = dict(axis_name=axis_name, sync_perturbation=sync_perturbation)
  if name == 'sam':
    parts.append(sam(opt_config.rho, **sam_kwargs))
  elif name == 'asam':
    parts.append(sam(opt_config.rho, adaptive=True,
                     adaptive_eta=opt_config.get('adaptive_eta', 0.01), **sam_kwargs))
  elif name == 'lsam':
    parts.append(lsam(opt_config.rho, head=opt_config.get('head', 'head'), **sam_kwargs))
  if opt_config.get('weight_decay', 0.0):
    parts.append(optax.add_decayed_weights(opt_config.weight_decay))
  momentum = opt_config.get('momentum', 0.0) or None
  parts.append(optax.sgd(learning_rate_schedule(opt_config, num_train_steps), momentum=momentum,
                         nesterov=bool(opt_config.get('nesterov', False))))
  return optax.chain(*parts)


def find_sam_state(opt_state: PyTree) -> Optional[SamState]:
  """The :class:`SamState` inside a chain's state, or None for plain SGD."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SamState))
           if isinstance(s, SamState)]
  return found[0] if found else None


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


def _device_varying(tree: PyTree, axis_name: str) -> PyTree:
  def cast(x):
    aval = jax.typeof(x)
    mat = getattr(aval, 'mat', None)  # jax >= 0.10; older releases name it `vma`
    varying = mat.varying if mat is not None else getattr(aval, 'vma', frozenset())
    if axis_name in varying:
      return x
    return jax.lax.pcast(x, axis_name, to='varying')
  return jax.tree.map(cast, tree)


def _local_step(state: TrainState, batch, *, loss_fn, tx, schedule, uses_sam: bool,
                log_diagnostics: bool, axis_name: Optional[str]):
  """One step on the batch this function sees (global under jit, local under shard_map)."""
  params = state.params
  if axis_name is not None:
    # Per-device gradients: replicated params would otherwise give gradients summed over the axis.
    params = _device_varying(params, axis_name)
  grad_and_aux = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, new_batch_stats)), grads = grad_and_aux(params, state.batch_stats, batch)
  phantom_logits = []

  def grad_fn(phantom, *unused):  # *unused: optax.contrib.sam passes an inner-step index
    if axis_name is not None:  # leaves outside an LSAM mask are still replicated
      phantom = _device_varying(phantom, axis_name)
    (_, (logits_at_phantom, _)), phantom_grads = grad_and_aux(phantom, state.batch_stats, batch)
    phantom_logits.append(logits_at_phantom)  # same trace: the step reuses this forward pass
    return phantom_grads

  if axis_name is not None and not uses_sam:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
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
  else:
    metrics['grad_norm'] = optax.tree.norm(grads)
  if log_diagnostics and sam_state is not None:
    labels, clean, phantom = batch['label'], logits, phantom_logits[0]
    if axis_name is not None:
      gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
      labels, clean, phantom = gather(labels), gather(clean), gather(phantom)
    metrics.update(diagnostics.batch_gini_stats(clean, phantom, labels))
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def make_train_step(model, opt_config, num_train_steps: int, mesh: Mesh, *,
                    perturbation: str = 'sync', log_diagnostics: bool = False,
                    donate: bool = True, tx: Optional[optax.GradientTransformation] = None):
  """Builds ``(tx, step)`` where ``step(state, batch) -> (state, metrics)`` is jitted.

  Args:
    model: a flax module following samjax's model convention.
    opt_config: ``config.optimizer`` (see :func:`make_optimizer`).
    num_train_steps: length of the learning-rate schedule.
    mesh: a 1-D mesh with axis ``'data'``; the batch is sharded over it, the state replicated.
    perturbation: ``'sync'`` (one phantom from the global gradient) or ``'per_device'``.
    log_diagnostics: add the Gini coefficients of the importance weights at ``theta`` and at
      the phantom to the metrics, from the logits both passes already compute.
    tx: an optimizer to use instead of the one ``opt_config`` describes (e.g. to compare with
      ``optax.contrib.sam``); it receives ``grad_fn`` like samjax's transforms do.
  Returns:
    The optimizer (for ``create_train_state``) and the jitted step.
  """
  if perturbation not in PERTURBATIONS:
    raise ValueError(f'perturbation must be one of {PERTURBATIONS}, got {perturbation!r}.')
  per_device = perturbation == 'per_device'
  axis_name = DATA_AXIS if per_device else None
  if tx is None:
    tx = make_optimizer(opt_config, num_train_steps, axis_name=axis_name,
                        sync_perturbation=not per_device)
  local = functools.partial(
      _local_step, loss_fn=make_loss_fn(model), tx=tx,
      schedule=learning_rate_schedule(opt_config, num_train_steps),
      uses_sam=opt_config.name != 'sgd', log_diagnostics=log_diagnostics, axis_name=axis_name)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  if per_device:
    local = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
  step = jax.jit(local, in_shardings=(replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else ())
  return tx, step

"""The SAM family (SAM, LSAM, ASAM) as optax gradient transformations.

A SAM step replaces the gradient at ``theta`` with the gradient at the *phantom
parameter* (Springer et al., 2024)::

    g       = grad L_B(theta)
    e       = rho * g / (||g|| + eps)                       # SAM (Foret et al., 2021)
    e       = rho * T^2 g / (||T g|| + eps),  T = |theta| + eta   # ASAM (Kwon et al., 2021)
    theta~  = theta + e                                     # the phantom parameter
    output  = grad L_B(theta~)

With a ``mask`` only the selected leaves are perturbed and the norm is taken over
them alone; every leaf still receives the phantom gradient. LSAM (the paper's
last-layer SAM) is the mask that selects the classifier head.

The transformation takes the gradient at ``theta`` as its input ``updates`` and
needs ``grad_fn(params) -> grads`` as an extra argument to evaluate the phantom
gradient, so it composes with any optax chain::

    tx = optax.chain(samjax.sam(0.05), optax.sgd(0.1, momentum=0.9))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

Place it first in the chain: it replaces the update it receives with the phantom
gradient, so what precedes it only shapes the ascent direction and is then dropped;
what follows it sees the phantom gradient (clip, weight decay and learning-rate
schedules go there). The composition rules, each enforced where it can be, are in
:func:`sam`'s docstring.

References:
  Foret et al., Sharpness-Aware Minimization for Efficiently Improving
  Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
  Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks, ICML 2021. https://arxiv.org/abs/2102.11600
  Springer, Nagarajan, Raghunathan, Sharpness-Aware Minimization Enhances
  Feature Quality via Balanced Learning, ICLR 2024. https://arxiv.org/abs/2405.20439
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samjax.gradients import AxisName, axis_names, tracks_varying, varying_axes

PyTree = Any
ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]
MaskOrFn = Optional[Union[PyTree, Callable[[PyTree], PyTree]]]


class SamState(NamedTuple):
  """State of :func:`sam` (and :func:`lsam`): a step counter and the last step's statistics.

  The statistics are those of the ascent direction actually used: with ``axis_name`` and
  ``sync_perturbation=True`` the global (averaged) gradient; with ``sync_perturbation=False``
  (one perturbation per device) ``grad_norm`` and ``cosine`` are still taken on the averaged
  gradients, while ``perturbation_norm`` is the mean over devices of each device's
  ``||e_d||``. All fields are equal on every device.

  Attributes:
    count: number of updates applied so far (drives a ``rho`` schedule).
    grad_norm: ``||g||`` of the clean gradient at ``theta`` over the perturbed
      (masked) leaves; all leaves for SAM and ASAM, the head for LSAM.
    perturbation_norm: ``||theta~ - theta||``.
    cosine: cosine similarity between the clean and the phantom gradient over
      the perturbed leaves. At the first step a cosine below -0.5 is an error: it is the
      signature of sam placed after an optimizer (see :func:`sam`).
  """

  count: jax.Array
  grad_norm: jax.Array
  perturbation_norm: jax.Array
  cosine: jax.Array


def _global_norm(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  products = jax.tree.leaves(
      jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b))
  return sum(products) if products else jnp.zeros((), jnp.float32)


def cosine_similarity(a: PyTree, b: PyTree, eps: float = 1e-12) -> jax.Array:
  """Cosine between two pytrees seen as flat vectors; 0 when either is zero."""
  return _vdot(a, b) / (_global_norm(a) * _global_norm(b) + eps)


def resolve_mask(mask: MaskOrFn, params: PyTree) -> PyTree:
  """Expands ``mask`` (a bool pytree, a prefix of one, or a callable) to params' structure.

  Raises:
    ValueError: when the mask's structure does not match (is no prefix of) ``params``.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    mask = mask(params)
  try:
    return jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        'sam: the mask does not match the structure of params. Pass a pytree of '
        'bools with the same structure as params (or a prefix of it), or a '
        f'callable params -> such a pytree. Mask structure: '
        f'{jax.tree.structure(mask)}; params structure: {jax.tree.structure(params)}.'
    ) from e


def _is_static_bool(m) -> bool:
  return isinstance(m, (bool, np.bool_))


def _masked_leaves(tree: PyTree, mask: MaskOrFn, params: PyTree) -> list:
  """The leaves of ``tree`` that ``mask`` selects (traced mask leaves zero the rest)."""
  leaves = jax.tree.leaves(tree)
  if mask is None:
    return leaves
  selected = []
  for x, m in zip(leaves, jax.tree.leaves(resolve_mask(mask, params))):
    if not _is_static_bool(m):
      selected.append(jnp.where(m, x, jnp.zeros_like(x)))
    elif m:
      selected.append(x)
  return selected


def phantom_params(
    params: PyTree,
    grads: PyTree,
    rho: Union[float, jax.Array],
    *,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    mask: MaskOrFn = None,
) -> tuple[PyTree, PyTree]:
  """The SAM phantom parameter ``theta~ = theta + e`` and the perturbation ``e``.

  SAM: ``e = rho g / (||g|| + eps)``. ASAM: ``e = rho T^2 g / (||T g|| + eps)``
  with ``T = |theta| + adaptive_eta``. Norms run over the masked leaves only;
  unmasked leaves of ``theta~`` are the very arrays of ``params`` (not ``p + 0``),
  so XLA can drop work that depends on them alone.

  Returns:
    ``(phantom, perturbation)``; unmasked leaves of ``perturbation`` are zeros.
  """
  phantom, perturbation, _ = _phantom_and_perturbation_norm(
      params, grads, rho, adaptive=adaptive, adaptive_eta=adaptive_eta, eps=eps, mask=mask)
  return phantom, perturbation


def _phantom_and_perturbation_norm(params, grads, rho, *, adaptive, adaptive_eta, eps, mask):
  """:func:`phantom_params` and ``||e||``, without a pass over ``e`` where it is known."""
  mask_tree = resolve_mask(mask, params)
  leaf_mask = jax.tree.leaves(mask_tree)
  p_leaves, treedef = jax.tree.flatten(params)
  g_leaves = treedef.flatten_up_to(grads)

  def masked(x, m):
    if _is_static_bool(m):
      return x if m else None
    return jnp.where(m, x, jnp.zeros_like(x))

  if adaptive:
    scales = [jnp.abs(p) + adaptive_eta for p in p_leaves]
    scaled_g = [masked(t * g, m) for t, g, m in zip(scales, g_leaves, leaf_mask)]
    directions = [masked(t * t * g, m) for t, g, m in zip(scales, g_leaves, leaf_mask)]
  else:
    scaled_g = [masked(g, m) for g, m in zip(g_leaves, leaf_mask)]
    directions = scaled_g
  norm = _global_norm([x for x in scaled_g if x is not None])
  scale = rho / (norm + eps)

  phantom, perturbation = [], []
  for p, d, m in zip(p_leaves, directions, leaf_mask):
    if d is None:
      phantom.append(p)
      perturbation.append(jnp.zeros_like(p))
    else:
      e = (scale * d).astype(p.dtype)
      phantom.append(p + e if _is_static_bool(m) else jnp.where(m, p + e, p))
      perturbation.append(e)
  # SAM: ||e|| = rho ||g|| / (||g|| + eps). ASAM's direction T^2 g differs from T g: measure it.
  perturbation_norm = (_global_norm([e for e, d in zip(perturbation, directions) if d is not None])
                       if adaptive else scale * norm)
  return treedef.unflatten(phantom), treedef.unflatten(perturbation), perturbation_norm


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_number(name: str, value, *, positive: bool) -> None:
  """``value`` is a real scalar (or, under ``optax.inject_hyperparams``, a scalar array)."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
    raise ValueError(f'sam: {name} must be a number, got {value!r}.')
  if np.ndim(value) != 0:
    raise ValueError(f'sam: {name} must be a scalar, got shape {np.shape(value)}.')
  if _concrete(value):
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
      raise ValueError(f"sam: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {v}.")


def _check_rho(rho: ScalarOrSchedule) -> None:
  if callable(rho):
    return
  if isinstance(rho, bool) or not isinstance(rho, (numbers.Real, np.ndarray, jax.Array)):
    raise ValueError(f'sam: rho must be a non-negative float or an optax schedule, got {rho!r}.')
  _check_number('rho', rho, positive=False)


def _check_schedule_start(rho: ScalarOrSchedule) -> None:
  """A schedule's radius at step 0, where it can be evaluated (not under a trace)."""
  if not callable(rho):
    return
  value = rho(jnp.zeros((), jnp.int32))
  if _concrete(value):
    if np.ndim(value) != 0:
      raise ValueError(f'sam: the rho schedule must return a scalar, got shape {np.shape(value)}.')
    v = float(value)
    if not np.isfinite(v) or v < 0:
      raise ValueError(f'sam: the rho schedule gives {v:.6g} at step 0; a radius must be finite and >= 0.')


def _check_mask_selects_something(mask: MaskOrFn, params: PyTree) -> None:
  leaves = jax.tree.leaves(resolve_mask(mask, params))
  if not leaves:
    return  # no parameters at all: nothing to perturb, nothing to warn about
  if all(_is_static_bool(m) or _concrete(m) for m in leaves) and not any(
      bool(np.any(m)) for m in leaves):
    raise ValueError(
        'sam: the mask selects no parameter, so nothing would be perturbed and sam would be '
        'plain gradient descent. Select at least one leaf (True), or drop sam from the chain.')


def _axes_text(axis_name: AxisName) -> str:
  return repr(axis_name if isinstance(axis_name, (tuple, list)) else axis_name)


def _check_varying(tree: PyTree, axis_name: AxisName, what: str) -> None:
  """Under shard_map(check_vma=True): every leaf of ``tree`` must vary over every axis of
  ``axis_name`` (a leaf invariant over one of them was summed over it by jax.grad)."""
  shown = _axes_text(axis_name)
  if not tracks_varying(axis_name, caller=f'sam(axis_name={shown})',
                        unbound_advice=', or pass axis_name=None outside them'):
    return  # pmap / check_vma=False: JAX cannot tell (see sam's docstring)
  names = axis_names(axis_name)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    missing = [a for a in names if a not in varying_axes(leaf)]
    if missing:
      raise ValueError(
          f'sam(axis_name={shown}): {what} does not vary over {missing[0]!r} (leaf '
          f'{jax.tree_util.keystr(path) or "<root>"}): under shard_map with check_vma=True, '
          f'jax.grad with respect to replicated parameters is already summed over the axis, and '
          f'sam would average a sum. Take per-device gradients with '
          f'samjax.per_device_grad(loss_fn, {shown}), both for the gradient and inside '
          f'grad_fn.')


def _check_unmapped_variance(grads: PyTree, params: PyTree, axis_name: Optional[AxisName],
                             what: str) -> None:
  """A gradient leaf that varies over a mesh axis its parameter does not vary over is a
  per-device gradient: sam must average it over that axis, so the axis belongs in axis_name."""
  covered = set(axis_names(axis_name)) if axis_name is not None else set()
  p_leaves, treedef = jax.tree.flatten(params)
  try:
    g_leaves = treedef.flatten_up_to(grads)
  except (ValueError, TypeError):
    return  # a structure mismatch has its own message
  extra = set()
  for g, p in zip(g_leaves, p_leaves):
    extra |= varying_axes(g) - varying_axes(p) - covered
  if extra:
    axes = tuple(sorted(extra | covered, key=str))
    shown = repr(axes[0]) if len(axes) == 1 else repr(axes)
    raise ValueError(
        f'sam: {what} varies over the mesh axes {tuple(sorted(extra, key=str))} (per-device '
        f'gradients inside jax.shard_map) but sam averages only over '
        f'{"no axis" if axis_name is None else _axes_text(axis_name)}. Pass '
        f'axis_name={shown} (every axis the batch is sharded over) and take both gradients '
        f'with samjax.per_device_grad(loss_fn, {shown}).')


def _check_not_masked(params: PyTree) -> None:
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
    raise ValueError(
        'sam: it runs inside optax.masked, optax.multi_transform or optax.partition, which hide '
        "the other groups' parameters from it, but grad_fn needs all of them. Put sam first "
        'with a mask selecting the group to perturb, and partition after it: '
        'optax.chain(samjax.sam(rho, mask=group_mask), optax.multi_transform(...)).')


def _inside_optax_multisteps() -> bool:
  """Whether optax.MultiSteps is calling this update (a look at the Python call stack: at trace
  time under jit, so it costs nothing at run time)."""
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    code = frame.f_code
    if ('MultiSteps' in getattr(code, 'co_qualname', code.co_name)
        and str(frame.f_globals.get('__name__', '')).startswith('optax')):
      return True
    frame = frame.f_back
  return False


# At the first step, a cosine below this between the update sam receives and the gradient at
# its phantom means the update is a descent step: an optimizer placed before sam.
_REVERSED_COSINE = -0.5


def _misuse_message(count, cosine, radius) -> Optional[str]:
  """The error for one step's values (numpy; batched under vmap), or None."""
  count, cosine, radius = np.asarray(count), np.asarray(cosine), np.asarray(radius)
  bad_radius = ~(np.isfinite(radius) & (radius >= 0))
  if np.any(bad_radius):
    value = np.broadcast_to(radius, bad_radius.shape)[bad_radius].ravel()[0]
    return (f'sam: rho = {float(value):.6g} at step {int(np.max(count))} (set under jit, e.g. '
            'through optax.inject_hyperparams or a schedule); a radius must be finite and >= 0. '
            "Set a valid rho (e.g. state.hyperparams['rho'] = 0.05).")
  reversed_ = (count == 0) & (cosine < _REVERSED_COSINE)
  if np.any(reversed_):
    value = float(np.min(np.broadcast_to(cosine, reversed_.shape)[reversed_]))
    return (f'sam: the update it received points against the gradient at the phantom (cosine '
            f'{value:.2f} at the first step): sam is placed after an optimizer, which hands it a '
            'descent step instead of the gradient, and the chain would ascend the loss. Put sam '
            'first: optax.chain(samjax.sam(rho), ..., optax.sgd(learning_rate)). (If sam is '
            'already first, rho is so large that the gradient at the phantom reverses the '
            'gradient: lower rho.)')
  return None


def _raise_on_misuse(count, cosine, radius) -> None:
  message = _misuse_message(count, cosine, radius)
  if message is not None:
    raise ValueError(message)


@jax.custom_batching.custom_vmap
def _misuse_check(bad, count, cosine, radius):
  jax.lax.cond(bad, lambda: jax.debug.callback(_raise_on_misuse, count, cosine, radius),
               lambda: None)
  return jnp.zeros((), jnp.bool_)


@_misuse_check.def_vmap
def _misuse_check_vmap(axis_size, in_batched, bad, count, cosine, radius):
  """Under vmap, one check for the whole batch: a batched predicate would turn the cond into
  a callback at every step (50x the cost of a small vmapped step)."""
  del axis_size
  bad = jnp.any(bad) if in_batched[0] else bad
  return _misuse_check(bad, count, cosine, radius), False


def _check_at_run_time(count, cosine, radius, check_radius: bool) -> None:
  """Raises, eagerly or (under jit) from a host callback that runs only when a check fails."""
  values = (count, cosine, radius)
  if all(_concrete(v) for v in values):
    _raise_on_misuse(*values)
    return
  count, cosine, radius = (jax.lax.stop_gradient(jnp.asarray(v)) for v in values)
  bad = (count == 0) & (cosine < _REVERSED_COSINE)
  if check_radius:
    bad = bad | ~(jnp.isfinite(radius) & (radius >= 0))
  _misuse_check(bad, count, cosine, radius)


def _shapes(tree: PyTree):
  return jax.tree.structure(tree), [jnp.shape(x) for x in jax.tree.leaves(tree)]


def _call_grad_fn(grad_fn: Callable, phantom: PyTree, like: PyTree, has_aux: bool) -> PyTree:
  """``grad_fn(phantom)``'s gradient, checked against the structure of the clean gradient."""
  out = grad_fn(phantom)
  if (isinstance(out, (tuple, list)) and len(out) == 2 and _shapes(out[1]) == _shapes(like)
      and _shapes(out[0]) != _shapes(like)):
    raise ValueError(
        'sam: grad_fn returned (value, grads), as jax.value_and_grad does; it must return the '
        'gradient alone: grad_fn=jax.grad(loss_fn) (for a loss returning (loss, aux): '
        'jax.grad(loss_fn, has_aux=True) with samjax.sam(..., has_aux=True)).')
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(
          'sam(has_aux=True): grad_fn must return a pair (grads, aux), got '
          f'{type(out).__name__}.')
    out = out[0]
  if jax.tree.structure(out) != jax.tree.structure(like):
    hint = (' It returned a pair: if grad_fn returns (grads, aux), pass has_aux=True.'
            if not has_aux and isinstance(out, tuple) and len(out) == 2 else '')
    raise ValueError(
        'sam: grad_fn(params) must return gradients with the structure of the gradient passed '
        f'to update(); got {jax.tree.structure(out)}, expected {jax.tree.structure(like)}.{hint}')
  return out


_MULTISTEPS_MESSAGE = (
    'sam: it runs inside optax.MultiSteps, which would form the phantom from the mean gradient '
    "over the micro-batches but apply the last micro-batch's grad_fn at it alone: SAM on no "
    'batch. Accumulate inside your step instead: grad = samjax.accumulated_grad(loss_fn, k); '
    'tx.update(grad(params, batch), opt_state, params, grad_fn=lambda p: grad(p, batch)).')


def sam(
    rho: ScalarOrSchedule,
    *,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    mask: MaskOrFn = None,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization: replaces the gradient ``g`` with the gradient at the phantom.

  Put it **first** in the chain: ``optax.chain(samjax.sam(rho), [clip], [decay],
  optax.sgd(lr))``. It *replaces* the update it receives with ``grad_fn(theta + e)``, so
  whatever comes before it only shapes the ascent direction ``e`` and is then dropped:
  ``optax.add_decayed_weights`` or a clip before sam has no effect on the applied step (a clip
  not even on ``e``, which is normalised). Weight decay, clipping and the learning rate go
  after it. Placed after an optimizer (``chain(optax.sgd(lr), sam(rho))``, the PyTorch habit)
  it would receive a descent step and the chain would ascend the loss: the first step raises
  instead (cosine below -0.5 between the update it received and the phantom gradient).

  Composition rules:

  * ``optax.MultiSteps`` around sam is refused: it would form the phantom from the mean
    gradient over the micro-batches and apply the last micro-batch's ``grad_fn`` at it alone.
    :func:`samjax.accumulated_grad`, used for the gradient and inside ``grad_fn``, is the exact
    accumulated SAM step.
  * ``optax.masked`` / ``optax.multi_transform`` / ``optax.partition`` cannot hold sam (its
    ``grad_fn`` needs every parameter): use ``mask=`` here, first in the chain, and partition
    after it.
  * Inside ``jax.shard_map``/``jax.pmap`` pass ``axis_name`` (a tuple for a batch sharded over
    several mesh axes) and take both gradients with :func:`samjax.per_device_grad`; a
    per-device gradient without ``axis_name`` is an error.
  * ``rho`` set under jit (``optax.inject_hyperparams``, a schedule) that is negative or NaN
    raises at run time; that step is computed with ``rho = 0``, never with NaN.

  Compared with ``optax.contrib.sam``: the same update (``e = rho g / ||g||``, the descent
  gradient taken at ``theta + e``), but chained rather than wrapping an optimizer, with
  ``grad_fn(params)`` (not ``grad_fn(params, i)``) evaluated once per step inside ``update``;
  ``eps`` here is added to ``||g||`` so that a zero gradient gives a zero perturbation.

  Args:
    rho: perturbation radius, a float ``>= 0`` or an optax schedule of the step (its value at
      step 0 is checked at ``init``). Works under ``optax.inject_hyperparams(samjax.sam)``:
      a ``rho`` changed in ``state.hyperparams`` takes effect at the next step (pass a callable
      ``mask`` there as ``static_args=('mask',)``, or inject_hyperparams takes it for a schedule).
    adaptive: ASAM (Kwon et al., 2021): ``e = rho T^2 g / ||T g||``,
      ``T = |theta| + adaptive_eta``.
    adaptive_eta: ASAM's ``eta``.
    eps: added to the norm, so a zero gradient gives a zero perturbation.
    mask: which leaves to perturb: a pytree of bools matching params (or a
      prefix of it) or a callable ``params -> mask``. Norms run over these
      leaves only; every leaf receives the phantom gradient. A mask that
      selects no leaf is an error at ``init``.
    axis_name: the mapped axis (or tuple of mesh axes, e.g. ``('data', 'replica')``) when used
      inside ``pmap``/``shard_map``; the incoming gradient and ``grad_fn``'s result must be
      per-device and the output is averaged over the axes. Under ``shard_map`` with
      ``check_vma=True`` (JAX's default) ``jax.grad`` with respect to replicated parameters
      already sums over the axis: a gradient or ``grad_fn`` result that does not vary over every
      axis of ``axis_name`` is an error at trace time; compute both with
      :func:`samjax.per_device_grad` (same ``axis_name``). Under ``pmap`` or ``check_vma=False``
      JAX does not track which values vary, so this cannot be checked: there ``jax.grad`` gives
      per-device gradients, which is what ``sam`` needs.
    sync_perturbation: with ``axis_name``, ``True`` averages the gradient over
      the axis before forming the perturbation (one phantom for the global
      batch); ``False`` perturbs each device with its own gradient (Foret et
      al.'s m-sharpness, ``m`` = per-device batch; :class:`SamState` then holds the mean of
      the per-device perturbation norms). ``False`` needs ``axis_name``.
    has_aux: ``grad_fn`` returns ``(grads, aux)``. The phantom pass's ``aux`` is discarded:
      quantities such as BatchNorm statistics and metrics belong to the clean pass at
      ``theta``, which the caller computes itself.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, grad_fn)`` needs ``grad_fn(params) -> grads`` (per-device under
    ``axis_name``).
  """
  _check_rho(rho)
  _check_number('adaptive_eta', adaptive_eta, positive=False)
  _check_number('eps', eps, positive=True)
  if not sync_perturbation and axis_name is None:
    raise ValueError(
        'sam: sync_perturbation=False perturbs each device with its own gradient, which exists '
        'only inside a jax.shard_map (or jax.pmap) step: under plain jax.jit the step sees one '
        'global batch whatever its sharding. Write the step with jax.shard_map over the batch '
        "axis and pass it: samjax.sam(rho, axis_name='data', sync_perturbation=False), with "
        "both gradients from samjax.per_device_grad(loss_fn, 'data').")
  if mask is not None and not callable(mask):
    for leaf in jax.tree.leaves(mask):
      if not isinstance(leaf, (bool, np.bool_, np.ndarray, jax.Array)):
        raise ValueError(f'sam: mask leaves must be bools, got {type(leaf).__name__}.')

  def init_fn(params: PyTree) -> SamState:
    if mask is not None:
      _check_mask_selects_something(mask, params)  # fail at init, not at the first step
    _check_schedule_start(rho)
    zero = jnp.zeros((), jnp.float32)
    return SamState(count=jnp.zeros((), jnp.int32), grad_norm=zero,
                    perturbation_norm=zero, cosine=zero)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('sam: update() needs params (the point where the gradient was taken).')
    if grad_fn is None:
      raise ValueError(
          'sam: update() needs grad_fn, a function params -> grads, e.g. '
          'tx.update(grads, state, params, grad_fn=jax.grad(loss_fn)).')
    _check_not_masked(params)
    if _inside_optax_multisteps():
      raise ValueError(_MULTISTEPS_MESSAGE)
    grads = updates
    _check_unmapped_variance(grads, params, axis_name, 'the gradient passed to update()')
    synced = grads
    if axis_name is not None:
      _check_varying(grads, axis_name, 'the gradient passed to update()')
      synced = jax.lax.pmean(grads, axis_name)
    ascent = synced if (axis_name is None or sync_perturbation) else grads
    radius = rho(state.count) if callable(rho) else rho
    check_radius = not _concrete(radius)
    if check_radius:  # set under jit: an invalid radius raises below; meanwhile perturb by 0
      valid = jnp.isfinite(radius) & (radius >= 0)
      requested, radius = radius, jnp.where(valid, radius, jnp.zeros_like(radius))
    phantom, _, perturbation_norm = _phantom_and_perturbation_norm(
        params, ascent, radius, adaptive=adaptive, adaptive_eta=adaptive_eta,
        eps=eps, mask=mask)
    phantom_grads = _call_grad_fn(grad_fn, phantom, grads, has_aux)
    _check_unmapped_variance(phantom_grads, params, axis_name, 'grad_fn(phantom)')
    if axis_name is not None:
      _check_varying(phantom_grads, axis_name, 'grad_fn(phantom)')
      phantom_grads = jax.lax.pmean(phantom_grads, axis_name)
    if axis_name is not None and not sync_perturbation:
      perturbation_norm = jax.lax.pmean(perturbation_norm, axis_name)
    # Statistics over the perturbed leaves only: for LSAM this keeps the clean gradient of the
    # body unused, so XLA can skip the body's first backward pass.
    perturbed = _masked_leaves(synced, mask, params)
    cosine = cosine_similarity(perturbed, _masked_leaves(phantom_grads, mask, params))
    _check_at_run_time(state.count, cosine, requested if check_radius else radius, check_radius)
    new_state = SamState(
        count=optax.safe_increment(state.count),
        grad_norm=_global_norm(perturbed),
        perturbation_norm=perturbation_norm,
        cosine=cosine,
    )
    return phantom_grads, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def head_mask(params: PyTree, head: str = 'head') -> PyTree:
  """Bool pytree selecting the leaves under any dict key named ``head``."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(params)):
    raise ValueError(
        f'head_mask: got a single {type(params).__name__}, not a params tree. Under '
        'optax.inject_hyperparams a callable mask is called with the step count, as a '
        "schedule: pass it as static: optax.inject_hyperparams(samjax.sam, static_args=('mask',))"
        '(rho=..., mask=...).')

  def under_head(path, _):
    return any(getattr(k, 'key', None) == head for k in path)

  tree = jax.tree_util.tree_map_with_path(under_head, params)
  if not any(jax.tree.leaves(tree)):
    raise ValueError(
        f"lsam: no parameter lies under a key named {head!r}. Name the classifier "
        f"head's module {head!r} or pass head=<its name>.")
  return tree


def lsam(
    rho: ScalarOrSchedule,
    *,
    head: str = 'head',
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: Optional[AxisName] = None,
    sync_perturbation: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """LSAM (Springer et al., 2024): SAM that perturbs only the classifier head.

  Put it **first** in the chain, like :func:`sam` (whose composition rules it follows):
  ``optax.chain(samjax.lsam(rho), [clip], [decay], optax.sgd(lr))``. It replaces the update it
  receives with the gradient at the phantom, so ``optax.add_decayed_weights`` or a clip placed
  before it is dropped; placed after an optimizer it raises at the first step.
  ``optax.MultiSteps`` around it is refused (use :func:`samjax.accumulated_grad`).

  The phantom is ``(theta, v + rho g_v / ||g_v||)``; the descent gradient for
  every parameter is taken there. ``head`` names the module (a dict key in the
  params tree) holding the last layer. The other arguments are those of
  :func:`sam` (written out so that ``optax.inject_hyperparams(samjax.lsam)`` sees them),
  including ``axis_name`` (a mesh axis or a tuple of them) and ``sync_perturbation``;
  :class:`SamState`'s statistics are over the head. ``optax.contrib.sam`` has no
  counterpart: it perturbs every parameter.
  """
  return sam(rho, adaptive=adaptive, adaptive_eta=adaptive_eta, eps=eps,
             mask=lambda params: head_mask(params, head), axis_name=axis_name,
             sync_perturbation=sync_perturbation, has_aux=has_aux)

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

Place it first in the chain: what precedes it shapes only the ascent direction
(which SAM normalises, so a clip there has no effect), what follows it sees the
phantom gradient (clip, weight decay and learning-rate schedules go there).

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
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samjax.gradients import tracks_varying, varying_axes

PyTree = Any
ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]
MaskOrFn = Optional[Union[PyTree, Callable[[PyTree], PyTree]]]


class SamState(NamedTuple):
  """State of :func:`sam`: a step counter and the last step's statistics.

  Attributes:
    count: number of updates applied so far (drives a ``rho`` schedule).
    grad_norm: ``||g||`` of the clean gradient at ``theta`` over the perturbed
      (masked) leaves; all leaves for SAM and ASAM, the head for LSAM.
    perturbation_norm: ``||theta~ - theta||``.
    cosine: cosine similarity between the clean and the phantom gradient over
      the perturbed leaves.
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


def _check_varying(tree: PyTree, axis_name: str, what: str) -> None:
  """Under shard_map(check_vma=True): every leaf of ``tree`` must vary over ``axis_name``."""
  if not tracks_varying(axis_name, caller=f'sam(axis_name={axis_name!r})'):
    return  # pmap / check_vma=False: JAX cannot tell (see sam's docstring)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if axis_name not in varying_axes(leaf):
      raise ValueError(
          f'sam(axis_name={axis_name!r}): {what} does not vary over {axis_name!r} (leaf '
          f'{jax.tree_util.keystr(path) or "<root>"}): under shard_map with check_vma=True, '
          f'jax.grad with respect to replicated parameters is already summed over the axis, and '
          f'sam would average a sum. Take per-device gradients with '
          f'samjax.per_device_grad(loss_fn, {axis_name!r}), both for the gradient and inside '
          f'grad_fn.')


def _call_grad_fn(grad_fn: Callable, phantom: PyTree, like: PyTree, has_aux: bool) -> PyTree:
  """``grad_fn(phantom)``'s gradient, checked against the structure of the clean gradient."""
  out = grad_fn(phantom)
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


def sam(
    rho: ScalarOrSchedule,
    *,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    mask: MaskOrFn = None,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization: replaces ``g`` with the gradient at the phantom.

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
    axis_name: the mapped axis when used inside ``pmap``/``shard_map``; the
      incoming gradient and ``grad_fn``'s result must be per-device and the
      output is averaged over the axis. Under ``shard_map`` with ``check_vma=True``
      (JAX's default) ``jax.grad`` with respect to replicated parameters already
      sums over the axis: a gradient or ``grad_fn`` result that does not vary over
      ``axis_name`` is an error at trace time; compute both with
      :func:`samjax.per_device_grad`. Under ``pmap`` or ``check_vma=False`` JAX does not
      track which values vary, so this cannot be checked: there ``jax.grad`` gives
      per-device gradients, which is what ``sam`` needs.
    sync_perturbation: with ``axis_name``, ``True`` averages the gradient over
      the axis before forming the perturbation (one phantom for the global
      batch); ``False`` perturbs each device with its own gradient (Foret et
      al.'s m-sharpness, ``m`` = per-device batch). ``False`` needs ``axis_name``.
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
        'sam: sync_perturbation=False perturbs each device with its own gradient and needs '
        "axis_name (the pmap/shard_map axis, e.g. axis_name='data'); without it there is one "
        'device and nothing to desynchronise.')
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
    grads = updates
    synced = grads
    if axis_name is not None:
      _check_varying(grads, axis_name, 'the gradient passed to update()')
      synced = jax.lax.pmean(grads, axis_name)
    ascent = synced if (axis_name is None or sync_perturbation) else grads
    radius = rho(state.count) if callable(rho) else rho
    phantom, _, perturbation_norm = _phantom_and_perturbation_norm(
        params, ascent, radius, adaptive=adaptive, adaptive_eta=adaptive_eta,
        eps=eps, mask=mask)
    phantom_grads = _call_grad_fn(grad_fn, phantom, grads, has_aux)
    if axis_name is not None:
      _check_varying(phantom_grads, axis_name, 'grad_fn(phantom)')
      phantom_grads = jax.lax.pmean(phantom_grads, axis_name)
    if axis_name is not None and not sync_perturbation:
      perturbation_norm = jax.lax.pmean(perturbation_norm, axis_name)
    # Statistics over the perturbed leaves only: for LSAM this keeps the clean gradient of the
    # body unused, so XLA can skip the body's first backward pass.
    perturbed = _masked_leaves(synced, mask, params)
    new_state = SamState(
        count=optax.safe_increment(state.count),
        grad_norm=_global_norm(perturbed),
        perturbation_norm=perturbation_norm,
        cosine=cosine_similarity(perturbed, _masked_leaves(phantom_grads, mask, params)),
    )
    return phantom_grads, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def head_mask(params: PyTree, head: str = 'head') -> PyTree:
  """Bool pytree selecting the leaves under any dict key named ``head``."""

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
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """LSAM (Springer et al., 2024): SAM that perturbs only the classifier head.

  The phantom is ``(theta, v + rho g_v / ||g_v||)``; the descent gradient for
  every parameter is taken there. ``head`` names the module (a dict key in the
  params tree) holding the last layer. The other arguments are those of
  :func:`sam` (written out so that ``optax.inject_hyperparams(samjax.lsam)`` sees them).
  """
  return sam(rho, adaptive=adaptive, adaptive_eta=adaptive_eta, eps=eps,
             mask=lambda params: head_mask(params, head), axis_name=axis_name,
             sync_perturbation=sync_perturbation, has_aux=has_aux)

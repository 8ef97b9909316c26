"""The gradients a SAM step needs, in a user's own parallel or accumulating step.

:func:`per_device_grad` is ``jax.grad`` that returns each device's own gradient inside
``jax.shard_map`` or ``jax.pmap``. Under ``shard_map`` with ``check_vma=True`` (JAX's default),
``jax.grad`` with respect to a replicated (axis-invariant) argument returns the gradient already
*summed* over the axis: the transpose of an implicit broadcast is a ``psum``. ``samjax.sam`` with
``axis_name`` expects per-device gradients and averages them itself, so a summed gradient would
make every update ``N`` times too large on ``N`` devices. :func:`per_device_grad` marks the
differentiated arguments device-varying first (``jax.lax.pcast(x, axis, to='varying')``), leaf by
leaf and only where they are invariant: a SAM phantom formed from per-device gradients
(``sync_perturbation=False``) already varies and ``pcast`` refuses it. Under ``pmap`` or
``check_vma=False`` JAX tracks no such types and ``jax.grad`` already gives the per-device
gradient, so nothing is cast.

:func:`accumulated_grad` is the mean gradient over ``k`` micro-batches of a batch, computed with
``lax.scan`` so that activation memory is that of one micro-batch. Use it (not
``optax.MultiSteps``) to accumulate around SAM: ``MultiSteps`` calls the inner transformation
once per micro-batch with that micro-batch's extra arguments, so the SAM inside it would form its
phantom from, and evaluate ``grad_fn`` on, the last micro-batch only.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp

PyTree = Any


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` varies, as JAX's type system tracks them (empty if none)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'mat', None)  # jax >= 0.10; older releases name it `vma`
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', frozenset()))


def tracks_varying(axis_name: str, *, caller: str) -> bool:
  """Whether JAX tracks device variance over ``axis_name`` here.

  True under ``jax.shard_map`` with ``check_vma=True``; False under ``pmap`` or
  ``check_vma=False``, where every value looks invariant and nothing can be checked.

  Raises:
    ValueError: ``axis_name`` is not bound: the caller is not inside a ``pmap``/``shard_map``
      over it.
  """
  try:
    index = jax.lax.axis_index(axis_name)
  except NameError as e:
    raise ValueError(
        f'{caller}: axis {axis_name!r} is not bound here. Call it inside jax.shard_map or '
        f'jax.pmap over {axis_name!r}, or pass axis_name=None outside them.') from e
  return axis_name in varying_axes(index)


def device_varying(tree: PyTree, axis_name: str) -> PyTree:
  """Casts every leaf that does not vary over ``axis_name`` to device-varying (others as they are)."""

  def cast(x):
    if axis_name in varying_axes(x):
      return x
    return jax.lax.pcast(x, axis_name, to='varying')

  return jax.tree.map(cast, tree)


def per_device_grad(fun: Callable, axis_name: str, *, argnums: Union[int, Sequence[int]] = 0,
                    has_aux: bool = False) -> Callable:
  """Like ``jax.grad(fun, argnums, has_aux=has_aux)``, but each device's own gradient.

  Inside ``jax.shard_map`` with ``check_vma=True``, the arguments at ``argnums`` are made
  device-varying over ``axis_name`` (only the leaves that are not already), so the gradient of
  a replicated argument is this device's gradient, not the sum over the axis. Under ``pmap`` or
  ``check_vma=False`` it is ``jax.grad``. Hand its results to ``samjax.sam(axis_name=...)`` both
  as the gradient and as ``grad_fn``::

    grad_fn = samjax.per_device_grad(loss_fn, 'data')       # loss_fn(params, batch)
    grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: grad_fn(p, batch))

  Args:
    fun: the function to differentiate, as for ``jax.grad``.
    axis_name: the mapped axis of the enclosing ``shard_map``/``pmap``.
    argnums: which positional argument(s) to differentiate with respect to.
    has_aux: ``fun`` returns ``(value, aux)``; the result is then ``(grads, aux)``.

  Returns:
    A function with ``fun``'s signature returning the per-device gradient (and ``aux``).
  """
  grad_fun = jax.grad(fun, argnums=argnums, has_aux=has_aux)
  positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  def per_device(*args, **kwargs):
    if tracks_varying(axis_name, caller='per_device_grad'):
      args = list(args)
      for i in positions:
        args[i] = device_varying(args[i], axis_name)
    return grad_fun(*args, **kwargs)

  return per_device


def split_microbatches(batch: PyTree, k: int) -> PyTree:
  """``[B, ...] -> [k, B/k, ...]``, micro-batch ``i`` holding rows ``i, i+k, i+2k, ...``.

  Strided rather than contiguous so that, with the batch sharded over devices in contiguous
  blocks, every micro-batch is spread over all devices and no row has to move.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of :func:`split_microbatches` for one stacked array."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def mean_over_microbatches(fn: Callable, batch: PyTree, k: int):
  """``fn(micro_batch) -> (value, aux)``: the mean of ``value`` over ``k`` micro-batches and the
  ``aux`` stacked ``[k, ...]``, one micro-batch in memory at a time (``lax.scan``)."""
  if k == 1:
    value, aux = fn(batch)
    return value, jax.tree.map(lambda a: a[None], aux)
  micro = split_microbatches(batch, k)
  # The first micro-batch runs outside the scan so that the carry has the exact type of fn's
  # output (under shard_map that includes which axes a value varies over).
  total, first_aux = fn(jax.tree.map(lambda x: x[0], micro))

  def body(total, micro_batch):
    value, aux = fn(micro_batch)
    return jax.tree.map(jnp.add, total, value), aux

  total, rest_aux = jax.lax.scan(body, total, jax.tree.map(lambda x: x[1:], micro))
  aux = jax.tree.map(lambda a, r: jnp.concatenate([a[None], r]), first_aux, rest_aux)
  return jax.tree.map(lambda t: t / k, total), aux


def _check_divisible(batch: PyTree, k: int) -> None:
  for x in jax.tree.leaves(batch):
    if x.ndim == 0 or x.shape[0] % k:
      raise ValueError(
          f'accumulated_grad: a batch leaf of shape {tuple(x.shape)} does not split into '
          f'{k} micro-batches: every leaf needs a leading (batch) dimension divisible by {k}.')


def accumulated_grad(fun: Callable, num_microbatches: int, *, has_aux: bool = False,
                     axis_name: str | None = None) -> Callable:
  """``(params, batch) -> mean gradient of fun over num_microbatches micro-batches``.

  The batch (every leaf's leading dimension) is split into ``k = num_microbatches`` strided
  micro-batches, processed one after another by ``lax.scan``: activation memory is that of one
  micro-batch. When ``fun`` is a mean over examples and nothing normalises per batch (no
  BatchNorm in train mode), the result equals ``jax.grad(fun)(params, batch)`` up to float
  rounding, because the mean of equal-sized micro-batch means is the batch mean.

  Around SAM, use it for the clean gradient and inside ``grad_fn`` (the phantom gradient is
  then accumulated too), instead of wrapping the chain in ``optax.MultiSteps``, which would
  perturb with the last micro-batch only::

    grad = samjax.accumulated_grad(loss_fn, 4)               # loss_fn(params, batch)
    updates, opt_state = tx.update(grad(params, batch), opt_state, params,
                                   grad_fn=lambda p: grad(p, batch))

  Args:
    fun: ``fun(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
    num_microbatches: ``k >= 1``.
    has_aux: ``fun`` returns ``(value, aux)``; the result is then ``(grads, aux)`` with each
      ``aux`` leaf stacked along a new leading axis of length ``k``.
    axis_name: inside ``shard_map``/``pmap``: per-device gradients, as :func:`per_device_grad`.
  """
  if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
    raise ValueError(f'accumulated_grad: num_microbatches must be an int >= 1, got {num_microbatches!r}.')
  k = num_microbatches
  if axis_name is None:
    grad_fun = jax.grad(fun, has_aux=has_aux)
  else:
    grad_fun = per_device_grad(fun, axis_name, has_aux=has_aux)

  def accumulated(params, batch):
    _check_divisible(batch, k)

    def one(micro_batch):
      out = grad_fun(params, micro_batch)
      return out if has_aux else (out, ())

    grads, aux = mean_over_microbatches(one, batch, k)
    return (grads, aux) if has_aux else grads

  return accumulated

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
``optax.MultiSteps``) to accumulate around SAM: a SAM inside ``MultiSteps`` forms its phantom from
the mean gradient over the micro-batches but takes the applied gradient from the last
micro-batch's ``grad_fn`` alone, which is SAM on no batch (``samjax.sam`` refuses it).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

PyTree = Any


AxisName = Union[Hashable, tuple]  # one mesh axis, or a tuple of them (as JAX collectives take)


def axis_names(axis_name: AxisName) -> tuple:
  """``axis_name`` as a tuple of mesh axis names: ``'data'`` -> ``('data',)``."""
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` varies, as JAX's type system tracks them (empty if none)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'mat', None)  # jax >= 0.10; older releases name it `vma`
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', frozenset()))


def tracks_varying(axis_name: AxisName, *, caller: str, unbound_advice: str = '') -> bool:
  """Whether JAX tracks device variance over every axis of ``axis_name`` here.

  True under ``jax.shard_map`` with ``check_vma=True``; False under ``pmap`` or
  ``check_vma=False``, where every value looks invariant and nothing can be checked.

  Raises:
    ValueError: an axis of ``axis_name`` is not bound: the caller is not inside a
      ``pmap``/``shard_map`` over it. ``unbound_advice`` ends the message.
  """
  tracked = []
  for name in axis_names(axis_name):
    try:
      index = jax.lax.axis_index(name)
    except NameError as e:
      raise ValueError(
          f'{caller}: axis {name!r} is not bound here. Call it inside jax.shard_map or '
          f'jax.pmap over {name!r}{unbound_advice}.') from None
    tracked.append(name in varying_axes(index))
  return all(tracked)


def device_varying(tree: PyTree, axis_name: AxisName) -> PyTree:
  """Casts every leaf to device-varying over each axis of ``axis_name`` it does not vary over."""
  names = axis_names(axis_name)

  def cast(x):
    missing = tuple(a for a in names if a not in varying_axes(x))
    # pcast refuses an axis the value already varies over: cast only the missing ones.
    return jax.lax.pcast(x, missing, to='varying') if missing else x

  return jax.tree.map(cast, tree)


def per_device_grad(fun: Callable, axis_name: Optional[AxisName], *,
                    argnums: Union[int, Sequence[int]] = 0, has_aux: bool = False) -> Callable:
  """Like ``jax.grad(fun, argnums, has_aux=has_aux)``, but each device's own gradient.

  Inside ``jax.shard_map`` with ``check_vma=True``, the arguments at ``argnums`` are made
  device-varying over ``axis_name`` (only the leaves that are not already), so the gradient of
  a replicated argument is this device's gradient, not the sum over the axis. ``axis_name`` may
  be a tuple of mesh axes (a batch sharded over ``P(('data', 'replica'))``): the gradient is then
  each device's own over all of them. Under ``pmap`` or ``check_vma=False`` it is ``jax.grad``,
  and with ``axis_name=None`` too (outside any mapped axis). Hand its results to
  ``samjax.sam(axis_name=...)`` (the same ``axis_name``) both as the gradient and as
  ``grad_fn``::

    grad_fn = samjax.per_device_grad(loss_fn, 'data')       # loss_fn(params, batch)
    grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: grad_fn(p, batch))

  Args:
    fun: the function to differentiate, as for ``jax.grad``.
    axis_name: the mapped axis (or tuple of axes) of the enclosing ``shard_map``/``pmap``;
      ``None``: plain ``jax.grad``.
    argnums: which positional argument(s) to differentiate with respect to.
    has_aux: ``fun`` returns ``(value, aux)``; the result is then ``(grads, aux)``.

  Returns:
    A function with ``fun``'s signature returning the per-device gradient (and ``aux``).
  """
  grad_fun = jax.grad(fun, argnums=argnums, has_aux=has_aux)
  if axis_name is None:
    return grad_fun
  names = axis_names(axis_name)
  positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  value_and_grad = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)
  advice = (', or outside them use jax.grad(fun) (or per_device_grad(fun, None)): there the '
            "gradient is already the whole batch's")

  def per_device(*args, **kwargs):
    if not tracks_varying(axis_name, caller='per_device_grad', unbound_advice=advice):
      return grad_fun(*args, **kwargs)
    args = list(args)
    for i in positions:
      args[i] = device_varying(args[i], axis_name)
    out, grads = value_and_grad(*args, **kwargs)
    _check_summed_over_no_axis(out[0] if has_aux else out, [args[i] for i in positions], names)
    return (grads, out[1]) if has_aux else grads

  return per_device


def _check_summed_over_no_axis(value, differentiated: list, names: tuple) -> None:
  """jax.grad sums over every axis the value varies over and a leaf does not: here only over
  axes outside ``axis_name`` can that happen (the leaves vary over all of ``axis_name``)."""
  summed = set()
  for leaf in jax.tree.leaves(differentiated):
    summed |= varying_axes(value) - varying_axes(leaf)
  if summed:
    axes = tuple(names) + tuple(sorted(summed - set(names), key=str))
    raise ValueError(
        f'per_device_grad: the loss varies over the mesh axes {tuple(sorted(summed, key=str))} '
        f'as well (the batch is sharded over them), so the gradient would be summed over them. '
        f'Name every axis the batch is sharded over: per_device_grad(fun, {axes!r}) and '
        f'samjax.sam(..., axis_name={axes!r}).')


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
                     axis_name: Optional[AxisName] = None) -> Callable:
  """``(params, batch) -> mean gradient of fun over num_microbatches micro-batches``.

  The batch (every leaf's leading dimension) is split into ``k = num_microbatches`` strided
  micro-batches, processed one after another by ``lax.scan``: activation memory is that of one
  micro-batch. When ``fun`` is a mean over examples and nothing normalises per batch (no
  BatchNorm in train mode), the result equals ``jax.grad(fun)(params, batch)`` up to float
  rounding, because the mean of equal-sized micro-batch means is the batch mean.

  Around SAM, use it for the clean gradient and inside ``grad_fn`` (the phantom gradient is
  then accumulated too): that is exact SAM on the whole batch. Wrapping the chain in
  ``optax.MultiSteps`` instead is not: the SAM inside it forms its phantom from the mean
  gradient over the micro-batches, but the applied gradient is the last micro-batch's
  ``grad_fn`` at that phantom alone (``samjax.sam`` refuses to run inside ``MultiSteps``)::

    grad = samjax.accumulated_grad(loss_fn, 4)               # loss_fn(params, batch)
    updates, opt_state = tx.update(grad(params, batch), opt_state, params,
                                   grad_fn=lambda p: grad(p, batch))

  Args:
    fun: ``fun(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
    num_microbatches: ``k >= 1``.
    has_aux: ``fun`` returns ``(value, aux)``; the result is then ``(grads, aux)`` with each
      ``aux`` leaf stacked along a new leading axis of length ``k``.
    axis_name: inside ``shard_map``/``pmap``: per-device gradients over this axis (or tuple
      of axes), as :func:`per_device_grad`.
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

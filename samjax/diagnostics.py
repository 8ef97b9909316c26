"""Diagnostics of SAM's importance-weighting effect (Springer et al., 2024, Sec. 6).

For a loss that is a decreasing function of the per-example *margin* ``m_i``,
the gradient splits into a scalar per example and a vector per example
(the paper's Eq. 6, generalised from the binary case)::

    l_i            = softplus(-m_i)                       # logistic / softmax CE
    grad_theta l_i = -lambda_i * grad_theta m_i
    lambda_i       = sigma(-m_i)                          # the importance weight

with margins

    binary (one logit f, y in {-1,+1}):  m_i = y_i f(x_i)
    k >= 2 logits z, integer label y:    m_i = z_y - logsumexp_{j != y} z_j

so ``lambda_i = sigma(-y f)`` for the logistic loss and ``lambda_i = 1 - p_y``
for softmax cross-entropy (``-log p_y = softplus(-m)`` exactly). With two
logits the two conventions agree: ``1 - p_y = sigma(-(z_y - z_other))``.

SAM evaluates the gradient at the phantom ``theta~ = theta + e``
(:func:`samjax.phantom_params`), so the weights it applies are the *phantom
weights* ``lambda~_i = sigma(-m_i(theta~))``. The paper's first mechanism is
that the phantom weights are more uniform (Lorenz curves, Fig. 3) and larger on
examples that the easy feature fits but the hard one does not (median weight
per bin of signed feature contributions, Fig. 5). To first order (App. D,
Eqs. 20-23, here for the logistic loss rather than the exponential one)::

    log lambda~_i - log lambda_i  ~=  -sigma(m_i) * <grad_theta m_i, e>,

so the reweighting of an example scales with its *feature-gradient* norm
``||grad_theta m_i||`` over the perturbed parameters (for LSAM with a one-logit
head ``f = v . phi(x) + b``: ``||(phi(x), 1)||``, App. D Eq. 25).

Everything here is a pure function of arrays and pytrees and can be jitted.
Validation of *values* (NaN logits, label ranges) runs only on concrete inputs:
under ``jax.jit`` the arguments are tracers whose values are unknown, so those
checks are skipped rather than forcing a host sync inside a compiled step.
Eager calls on concrete arrays do read the values back to check them. Eager
calls also compile every primitive separately; for repeated use, jit the call
with the callables closed over (``jax.jit(lambda p, x, y:
phantom_diagnostics(logits_fn, p, x, y, rho))``).

References:
  Springer, Nagarajan, Raghunathan, Sharpness-Aware Minimization Enhances
  Feature Quality via Balanced Learning, ICLR 2024. https://arxiv.org/abs/2405.20439
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from samjax.arrays import all_finite, global_norm, is_concrete
from samjax.transforms import MaskOrFn, phantom_params, resolve_mask

PyTree = Any
ArrayLike = Union[jax.Array, np.ndarray]


# ----------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------


def _check_finite(name: str, fn: str, x: ArrayLike) -> None:
  if is_concrete(x) and not all_finite(x):
    raise ValueError(f'{fn}: {name} contains NaN or inf values.')


def _logit_kind(fn: str, logits: jax.Array, labels: jax.Array) -> bool:
  """Checks shapes and returns True for binary (one-logit) models."""
  if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
    binary = True
  elif logits.ndim == 2 and logits.shape[1] >= 2:
    binary = False
  else:
    raise ValueError(
        f'{fn}: logits must have shape [n], [n, 1] (binary) or [n, k >= 2] '
        f'(softmax), got {logits.shape}.')
  if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
    raise ValueError(
        f'{fn}: labels must have shape [n] matching logits {logits.shape}; '
        f'got labels of shape {labels.shape}.')
  if not binary and not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f'{fn}: labels must be integer class ids for logits of shape '
        f'{logits.shape}, got dtype {labels.dtype}.')
  _check_finite('logits', fn, logits)
  if is_concrete(labels):
    values = np.asarray(labels)
    if binary:
      if not (np.all(np.isin(values, (0, 1))) or np.all(np.isin(values, (-1, 1)))):
        raise ValueError(
            f'{fn}: binary labels must all be in {{0, 1}} or all in {{-1, +1}}, '
            f'got values {np.unique(values)[:10]}.')
    elif values.size and (values.min() < 0 or values.max() >= logits.shape[1]):
      raise ValueError(
          f'{fn}: labels must lie in [0, {logits.shape[1]}), got range '
          f'[{values.min()}, {values.max()}].')
  return binary


def _check_chunk_size(fn: str, chunk_size: Optional[int]) -> None:
  if chunk_size is None:
    return
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
      or chunk_size <= 0):
    raise ValueError(f'{fn}: chunk_size must be None or a positive int, got {chunk_size!r}.')


def _num_examples(fn: str, batch: PyTree, name: str = 'batch') -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f'{fn}: {name} has no array leaves.')
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f'{fn}: every leaf of {name} needs the same leading (example) axis, got '
        f'shapes {[np.shape(x) for x in leaves]}.')
  n = sizes.pop()
  if n == 0:
    raise ValueError(f'{fn}: {name} is empty.')
  return n


def _float_dtype(x: jax.Array) -> jnp.dtype:
  # Importance weights of well-fit examples are tiny; bfloat16/float16 would
  # round them to zero and flatten the Lorenz curve's tail.
  return jnp.promote_types(x.dtype, jnp.float32)


# ----------------------------------------------------------------------------
# Margins and importance weights.
# ----------------------------------------------------------------------------


def _margins(logits: jax.Array, labels: jax.Array, binary: bool) -> jax.Array:
  logits = logits.astype(_float_dtype(logits))
  if binary:
    signs = jnp.where(labels > 0, 1.0, -1.0).astype(logits.dtype)  # {0,1} or {-1,1} -> {-1,1}
    return signs * logits.reshape(-1)
  is_label = jnp.arange(logits.shape[1]) == labels[:, None]
  true_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=1)
  other = jax.nn.logsumexp(jnp.where(is_label, -jnp.inf, logits), axis=1)
  return true_logit - other


def margins(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Per-example margin ``m_i`` such that the training loss is ``softplus(-m_i)``.

  * Binary, ``logits`` of shape ``[n]`` or ``[n, 1]``, ``labels`` all in
    ``{0, 1}`` or all in ``{-1, +1}``: ``m_i = y_i f_i`` with ``y`` mapped to
    ``{-1, +1}`` (logistic loss ``log(1 + exp(-y f))``).
  * Softmax, ``logits`` ``[n, k >= 2]``, integer ``labels`` in ``[0, k)``:
    ``m_i = z_{i,y} - logsumexp_{j != y} z_{i,j}`` (cross-entropy
    ``-log p_y = softplus(-m)``). For ``k = 2`` this is ``z_y - z_other``.

  Positive margin means correctly classified. Computed in float32 or wider.

  Raises:
    ValueError: naming ``logits`` or ``labels`` for mismatched shapes, NaN or
      inf logits or out-of-range labels (value checks on concrete inputs only).
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  return _margins(logits, labels, _logit_kind('margins', logits, labels))


def importance_weights(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Per-example importance weights ``lambda_i = sigma(-m_i)`` (the paper's Eq. 6).

  ``lambda_i`` is the factor by which example ``i``'s logit gradient enters the
  loss gradient: ``grad l_i = -lambda_i grad m_i``.

  * Binary logistic loss (``logits`` ``[n]`` or ``[n, 1]``; ``labels`` in
    ``{0, 1}`` or ``{-1, +1}``): ``lambda_i = sigma(-y_i f_i)``.
  * Softmax cross-entropy (``logits`` ``[n, k >= 2]``; integer labels):
    ``lambda_i = 1 - p_{i, y_i}``, computed as
    ``exp(logsumexp_{j != y} z_j - logsumexp_j z_j)`` so that weights of
    confidently fit examples keep their relative precision instead of
    rounding ``1 - p_y`` to zero.

  Args:
    logits: model outputs.
    labels: ``[n]`` labels (see above).

  Returns:
    ``[n]`` weights in ``[0, 1]``, float32 (or float64 under x64).

  Raises:
    ValueError: naming ``logits``/``labels`` for mismatched shapes, NaN/inf
      logits or invalid labels. The value checks run on concrete inputs only
      (skipped under ``jit``).
  """
  return jax.nn.sigmoid(-margins(logits, labels))


# ----------------------------------------------------------------------------
# Lorenz curve and Gini coefficient.
# ----------------------------------------------------------------------------


def _check_weights_vector(fn: str, weights: jax.Array) -> None:
  if weights.ndim != 1 or weights.shape[0] == 0:
    raise ValueError(f'{fn}: weights must be a non-empty 1-D array, got shape {weights.shape}.')


def lorenz_curve(weights: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Lorenz curve of non-negative weights in the paper's top-``k`` form (Fig. 3).

  With ``w_(1) >= ... >= w_(n)`` sorted in *descending* order::

      x_k = k / n,   y_k = sum_{j <= k} w_(j) / sum_j w_j,   k = 0..n,

  the share of the total weight held by the ``k`` heaviest points. The curve
  runs from ``(0, 0)`` to ``(1, 1)``; uniform weights give the diagonal, and
  the more concentrated the weights, the higher (more concave) the curve.
  All-zero weights are treated as uniform (the diagonal) rather than ``0/0``.
  Jittable; no host synchronisation.

  Args:
    weights: ``[n]`` non-negative weights (not checked, to stay sync-free).

  Returns:
    ``(x, y)``, each ``[n + 1]``.
  """
  w = jnp.asarray(weights)
  _check_weights_vector('lorenz_curve', w)
  w = w.astype(_float_dtype(w))
  n = w.shape[0]
  cumulative = jnp.concatenate([jnp.zeros((1,), w.dtype), jnp.cumsum(jnp.sort(w)[::-1])])
  total = cumulative[-1]
  x = jnp.arange(n + 1, dtype=w.dtype) / n
  # Dividing by cumulative[-1] itself makes y[-1] exactly 1.
  y = jnp.where(total > 0, cumulative / jnp.where(total > 0, total, 1), x)
  return x, y


def gini(weights: ArrayLike) -> jax.Array:
  """Gini coefficient of non-negative weights: 0 uniform, ``(n - 1)/n`` one non-zero.

  Twice the area between the :func:`lorenz_curve` and the diagonal,
  ``G = 2 * AUC - 1`` with the trapezoidal AUC, which equals the mean absolute
  difference form ``G = sum_{i,j} |w_i - w_j| / (2 n sum_i w_i)``. Since
  ``AUC = (sum_{k=1}^n y_k - 1/2) / n``, ``G = (2 sum_{k=1}^n y_k - 1) / n - 1``.
  All-zero weights give 0. Jittable; no host synchronisation.

  Args:
    weights: ``[n]`` non-negative weights.

  Returns:
    A scalar in ``[0, (n - 1)/n]``.
  """
  w = jnp.asarray(weights)
  _check_weights_vector('gini', w)
  _, y = lorenz_curve(w)
  n = w.shape[0]
  return (2.0 * jnp.sum(y[1:]) - 1.0) / n - 1.0


# ----------------------------------------------------------------------------
# Per-example gradients.
# ----------------------------------------------------------------------------


def _map_examples(fn: Callable[[PyTree], PyTree], batch: PyTree, n: int,
                  chunk_size: Optional[int]) -> PyTree:
  """``vmap(fn)(batch)``, or chunks of ``chunk_size`` examples at a time."""
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(batch)
  # lax.map scans over full chunks (each vmapped) and vmaps the remainder
  # separately, so only one chunk's intermediates are alive at a time.
  return jax.lax.map(fn, batch, batch_size=chunk_size)


def _single_example_grad(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                         params: PyTree) -> Callable[[PyTree], PyTree]:
  grad_fn = jax.grad(loss_fn)

  def example_grad(example: PyTree) -> PyTree:
    # Re-add the example axis: loss_fn sees a batch of one, so model code
    # written for batches (and batch-mean losses) works unchanged.
    return grad_fn(params, jax.tree.map(lambda x: x[None], example))

  return example_grad


def per_example_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: Optional[int] = None,
) -> PyTree:
  """Gradients ``grad_theta loss_fn(theta, {x_i})`` for every example ``i``.

  Convention: ``loss_fn(params, batch) -> scalar`` is written for batches. Each
  example is passed as a *batch of one*: every leaf of ``batch`` keeps a
  leading axis of size 1, so ``model.apply(..., x)`` and a batch-mean loss
  work as they are (the mean over one example is that example's loss).

  Implementation: ``vmap(grad(loss_fn))`` over the leading axis. With
  ``chunk_size`` the examples are processed ``chunk_size`` at a time
  (``jax.lax.map(..., batch_size=chunk_size)``; a final smaller chunk takes
  the remainder, so ``chunk_size`` need not divide ``n``), which bounds the
  memory of the backward passes. The result itself is ``n`` copies of
  ``params``; when only norms are needed use :func:`per_example_grad_norms`.

  BatchNorm and dropout: statistics of a batch of one are not the training
  statistics. Evaluate the model in inference mode inside ``loss_fn``
  (``model.apply(variables, x, train=False)``, i.e. BatchNorm's running
  averages, no dropout), so each example's gradient is that of a fixed
  function of its own input.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: the point at which to differentiate.
    batch: pytree of arrays sharing a leading example axis of size ``n``.
    chunk_size: examples per vectorised chunk; ``None`` does all at once.

  Returns:
    A pytree like ``params`` whose leaves have a leading axis of size ``n``.

  Raises:
    ValueError: naming ``chunk_size`` if it is not a positive int, or ``batch``
      if its leaves do not share a leading axis.
  """
  _check_chunk_size('per_example_grads', chunk_size)
  n = _num_examples('per_example_grads', batch)
  return _map_examples(_single_example_grad(loss_fn, params), batch, n, chunk_size)


def per_example_grad_norms(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: Optional[int] = None,
    mask: MaskOrFn = None,
) -> jax.Array:
  """Global L2 norms ``||grad_theta loss_fn(theta, {x_i})||`` for every example.

  Same convention as :func:`per_example_grads` (``loss_fn`` sees batches of
  one; use inference-mode BatchNorm). The norm is taken inside each chunk, so
  at most ``chunk_size`` per-example gradients exist at any time: memory is
  ``O(chunk_size * |params|)`` instead of ``O(n * |params|)``.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: the point at which to differentiate.
    batch: pytree of arrays sharing a leading example axis.
    chunk_size: examples per vectorised chunk; ``None`` does all at once.
    mask: restricts the norm to some leaves, as in :func:`samjax.sam`: a bool
      pytree (or prefix) matching ``params`` or a callable ``params -> mask``;
      e.g. :func:`samjax.head_mask` for the classifier head alone.

  Returns:
    ``[n]`` float32 norms.

  Raises:
    ValueError: naming ``chunk_size``, ``batch`` or the mask, as above.
  """
  _check_chunk_size('per_example_grad_norms', chunk_size)
  n = _num_examples('per_example_grad_norms', batch)
  mask_tree = resolve_mask(mask, params)
  example_grad = _single_example_grad(loss_fn, params)
  return _map_examples(lambda ex: global_norm(example_grad(ex), mask_tree), batch, n,
                       chunk_size)


# ----------------------------------------------------------------------------
# Phantom diagnostics.
# ----------------------------------------------------------------------------


class PhantomDiagnostics(NamedTuple):
  """Importance weights at ``theta`` and at the SAM/LSAM phantom, per example.

  Attributes:
    margins: ``[n]`` margins ``m_i`` at ``theta`` (see :func:`margins`).
    phantom_margins: ``[n]`` margins at the phantom ``theta~``.
    weights: ``[n]`` real importance weights ``lambda_i = sigma(-m_i)``.
    phantom_weights: ``[n]`` phantom weights ``lambda~_i = sigma(-m~_i)``.
    log_weight_ratio: ``[n]`` ``log lambda~_i - log lambda_i``, computed from
      log-sigmoids so it stays finite when a weight underflows.
    weight_ratio: ``[n]`` ``lambda~_i / lambda_i = exp(log_weight_ratio)``.
    predicted_log_weight_ratio: ``[n]`` first-order prediction
      ``-sigma(m_i) <grad_theta m_i, e>`` (App. D), one JVP for the batch.
    gini: Gini coefficient of ``weights``.
    phantom_gini: Gini coefficient of ``phantom_weights`` (lower = more uniform).
    feature_grad_norms: ``[n]`` ``||grad_theta m_i||`` at ``theta`` over the
      perturbed leaves (the mask), or ``None`` when not requested.
    perturbation_norm: ``||e||`` (``rho`` for SAM with a non-zero gradient).
  """

  margins: jax.Array
  phantom_margins: jax.Array
  weights: jax.Array
  phantom_weights: jax.Array
  log_weight_ratio: jax.Array
  weight_ratio: jax.Array
  predicted_log_weight_ratio: jax.Array
  gini: jax.Array
  phantom_gini: jax.Array
  feature_grad_norms: Optional[jax.Array]
  perturbation_norm: jax.Array


def mean_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Batch-mean logistic (binary) or softmax cross-entropy loss, ``mean softplus(-m_i)``."""
  return jnp.mean(jax.nn.softplus(-margins(logits, labels)))


def phantom_diagnostics(
    logits_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    labels: ArrayLike,
    rho: Union[float, jax.Array],
    *,
    mask: MaskOrFn = None,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    grads: Optional[PyTree] = None,
    loss_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
    compute_feature_grad_norms: bool = True,
    chunk_size: Optional[int] = None,
) -> PhantomDiagnostics:
  """Real vs phantom importance weights of one batch (Figs. 3 and 5, App. D).

  The phantom is the one a SAM step on this batch would use:
  ``theta~, e = samjax.phantom_params(params, g, rho, mask=mask, ...)`` with
  ``g = grad_theta loss_fn(logits_fn(theta, inputs), labels)`` the batch-mean
  loss gradient (or ``grads`` when given). ``mask=None`` is SAM,
  ``mask=samjax.head_mask`` is LSAM, ``adaptive=True`` is ASAM.

  ``logits_fn(params, inputs) -> logits`` should be the model in inference
  mode (``train=False``: BatchNorm running averages, no dropout), so weights
  and per-example gradients are those of a fixed function. A train step that
  perturbs with training-mode BatchNorm statistics can pass its own gradient
  as ``grads`` to reproduce its exact perturbation direction.

  Jittable with ``logits_fn``, ``loss_fn``, ``mask``, ``adaptive``,
  ``compute_feature_grad_norms`` and ``chunk_size`` static (close over them).

  Args:
    logits_fn: ``(params, inputs) -> logits`` of shape ``[n]``, ``[n, 1]`` or
      ``[n, k]``; evaluated on batches (also on batches of one, for the
      feature-gradient norms).
    params: the real parameters ``theta``.
    inputs: pytree of arrays with leading axis ``n``.
    labels: ``[n]`` labels (see :func:`importance_weights`).
    rho: perturbation radius.
    mask: which leaves the phantom perturbs (see :func:`samjax.sam`). The
      feature-gradient norms are taken over the same leaves: they are what
      the perturbation acts through (LSAM, one-logit head: ``||(phi(x), 1)||``);
      plain Euclidean norms, also under ``adaptive=True``.
    adaptive: ASAM perturbation; ``adaptive_eta``, ``eps`` as in
      :func:`samjax.phantom_params`.
    adaptive_eta: ASAM's ``eta``.
    eps: added to the gradient norm.
    grads: the ascent gradient to use instead of computing it.
    loss_fn: ``(logits, labels) -> scalar`` batch loss whose gradient is the
      ascent direction; default :func:`mean_margin_loss` (logistic or softmax
      cross-entropy, the losses for which ``sigma(-m)`` is the weight).
    compute_feature_grad_norms: whether to compute the per-example
      ``||grad_theta m_i||`` (one backward pass per example).
    chunk_size: examples per chunk for the feature-gradient norms.

  Returns:
    A :class:`PhantomDiagnostics`.

  Raises:
    ValueError: naming ``logits``/``labels``/``chunk_size``/``inputs`` for bad
      shapes, NaN logits (concrete inputs only) or a bad ``chunk_size``.
  """
  _check_chunk_size('phantom_diagnostics', chunk_size)
  n = _num_examples('phantom_diagnostics', inputs, 'inputs')
  labels = jnp.asarray(labels)
  loss_fn = mean_margin_loss if loss_fn is None else loss_fn

  logits = logits_fn(params, inputs)
  binary = _logit_kind('phantom_diagnostics', logits, labels)
  if logits.shape[0] != n:
    raise ValueError(
        f'phantom_diagnostics: logits_fn returned {logits.shape[0]} rows for inputs '
        f'with {n} examples.')

  def margin_fn(p: PyTree) -> jax.Array:
    return _margins(logits_fn(p, inputs), labels, binary)

  if grads is None:
    grads = jax.grad(lambda p: loss_fn(logits_fn(p, inputs), labels))(params)
  phantom, perturbation = phantom_params(
      params, grads, rho, adaptive=adaptive, adaptive_eta=adaptive_eta, eps=eps, mask=mask)

  # One JVP gives <grad m_i, e> for the whole batch alongside the margins.
  real_margins, margin_change = jax.jvp(margin_fn, (params,), (perturbation,))
  phantom_margins = margin_fn(phantom)
  log_ratio = jax.nn.log_sigmoid(-phantom_margins) - jax.nn.log_sigmoid(-real_margins)
  weights = jax.nn.sigmoid(-real_margins)
  phantom_weights = jax.nn.sigmoid(-phantom_margins)

  feature_grad_norms = None
  if compute_feature_grad_norms:
    def example_margin(p: PyTree, example: tuple[PyTree, jax.Array]) -> jax.Array:
      example_inputs, example_labels = example
      return jnp.sum(_margins(logits_fn(p, example_inputs), example_labels, binary))

    feature_grad_norms = per_example_grad_norms(
        example_margin, params, (inputs, labels), chunk_size=chunk_size, mask=mask)

  return PhantomDiagnostics(
      margins=real_margins,
      phantom_margins=phantom_margins,
      weights=weights,
      phantom_weights=phantom_weights,
      log_weight_ratio=log_ratio,
      weight_ratio=jnp.exp(log_ratio),
      predicted_log_weight_ratio=-jax.nn.sigmoid(real_margins) * margin_change,
      gini=gini(weights),
      phantom_gini=gini(phantom_weights),
      feature_grad_norms=feature_grad_norms,
      perturbation_norm=global_norm(perturbation),
  )


def batch_gini_stats(logits_clean: ArrayLike, logits_phantom: ArrayLike,
                     labels: ArrayLike) -> dict[str, jax.Array]:
  """Gini of the real and phantom importance weights of a train-step batch.

  A SAM train step already evaluates the logits at ``theta`` and at the
  phantom (for the two gradients), so logging the paper's uniformity
  statistic per step costs no extra forward pass. Jittable; under ``jit`` on a
  sharded global batch the Gini is that of the global batch.

  Returns:
    ``{'gini_real': G(lambda), 'gini_phantom': G(lambda~)}``, scalars.
  """
  return {
      'gini_real': gini(importance_weights(logits_clean, labels)),
      'gini_phantom': gini(importance_weights(logits_phantom, labels)),
  }


# ----------------------------------------------------------------------------
# Signed feature contributions and binned medians (Fig. 5).
# ----------------------------------------------------------------------------


def signed_contributions(features: ArrayLike, labels: ArrayLike, probe_w: ArrayLike,
                         probe_b: ArrayLike = 0.0) -> jax.Array:
  """Signed contribution of a feature through a linear probe: the probe's margin.

  Toy setting: ``y v_k phi_k(x)`` (Sec. 6.2) with ``features = phi_k`` ``[n, 1]``,
  ``probe_w = [v_k]``, ``probe_b = 0``. Real data (Sec. 6.2): the margin of
  the probe ``(w, b)`` that best classifies the feature, ``y (w^T phi(x) + b)``
  (binary) or :func:`margins` of ``phi(x) W + b`` (multi-class). Positive
  means the feature, as read by the probe, classifies the example correctly;
  the magnitude is the margin.

  Args:
    features: ``[n, d]`` representations.
    labels: ``[n]`` labels in the probe's encoding (binary ``{0,1}``/
      ``{-1,+1}``, or class ids ``[0, k)``).
    probe_w: ``[d]`` or ``[d, 1]`` (binary) or ``[d, k]`` (multi-class).
    probe_b: scalar or ``[1]`` / ``[k]`` bias.

  Returns:
    ``[n]`` signed contributions.

  Raises:
    ValueError: naming ``features`` or ``probe_w``/``probe_b`` on shape mismatch,
      ``labels`` as in :func:`margins`.
  """
  features, w, b = jnp.asarray(features), jnp.asarray(probe_w), jnp.asarray(probe_b)
  if features.ndim != 2:
    raise ValueError(f'signed_contributions: features must be [n, d], got {features.shape}.')
  if w.ndim not in (1, 2) or w.shape[0] != features.shape[1]:
    raise ValueError(
        f'signed_contributions: probe_w must be [d] or [d, k] with d = '
        f'{features.shape[1]} (features), got {w.shape}.')
  out_dim = 1 if w.ndim == 1 else w.shape[1]
  if b.ndim > 1 or (b.ndim == 1 and b.shape[0] not in (1, out_dim)):
    raise ValueError(
        f'signed_contributions: probe_b must be a scalar or have shape [{out_dim}], got {b.shape}.')
  logits = features @ w + (b.reshape(()) if w.ndim == 1 and b.ndim == 1 else b)
  return margins(logits, labels)


class BinnedMedians(NamedTuple):
  """Median weight per cell of a 2-D grid (the paper's Fig. 5 heat maps).

  Attributes:
    medians: ``[num_x_bins, num_y_bins]``; cell ``(i, j)`` holds points with
      ``x`` in bin ``i`` and ``y`` in bin ``j``. Empty cells hold 0, *not* NaN:
      read them together with ``counts`` (e.g. plot
      ``np.where(counts > 0, medians, np.nan)``).
    counts: ``[num_x_bins, num_y_bins]`` int32 number of points per cell.
    x_edges: ``[num_x_bins + 1]`` bin edges along ``x``.
    y_edges: ``[num_y_bins + 1]``.
  """

  medians: jax.Array
  counts: jax.Array
  x_edges: jax.Array
  y_edges: jax.Array


def _edges(v: jax.Array, value_range: Optional[Sequence[float]], num: int) -> jax.Array:
  if value_range is None:
    lo, hi = jnp.min(v), jnp.max(v)
  else:
    lo, hi = (jnp.asarray(r, v.dtype) for r in value_range)
  # As numpy.histogram: a degenerate range is widened by 0.5 on each side.
  degenerate = hi <= lo
  lo, hi = jnp.where(degenerate, lo - 0.5, lo), jnp.where(degenerate, hi + 0.5, hi)
  return jnp.linspace(lo, hi, num + 1).astype(v.dtype)


def _bin_index(v: jax.Array, edges: jax.Array) -> jax.Array:
  """Bin of each value, -1 outside; bins are [e_i, e_{i+1}), the last one closed."""
  num = edges.shape[0] - 1
  index = jnp.searchsorted(edges, v, side='right') - 1
  index = jnp.where(v == edges[-1], num - 1, index)
  return jnp.where((v >= edges[0]) & (v <= edges[-1]), index, -1)


def binned_medians_2d(
    x: ArrayLike,
    y: ArrayLike,
    weights: ArrayLike,
    num_bins: Union[int, tuple[int, int]],
    *,
    x_range: Optional[Sequence[float]] = None,
    y_range: Optional[Sequence[float]] = None,
) -> BinnedMedians:
  """Median of ``weights`` in each cell of a 2-D histogram of ``(x, y)`` (Fig. 5).

  In the paper ``x, y`` are the signed contributions of the easy and the hard
  feature (:func:`signed_contributions`) and ``weights`` the (phantom)
  importance weights. Bins follow ``numpy.histogram2d``: ``num_bins`` equal
  bins over ``x_range`` (default ``[min x, max x]``, widened by 0.5 either side
  when degenerate), half-open except the last; points outside a given range
  are left out. The median of an even count is the mean of the two middle
  values (``numpy.median``).

  Jittable with ``num_bins`` static: one sort of the ``n`` points by
  ``(cell, weight)`` and a gather of each cell's middle elements.

  Args:
    x: ``[n]`` first coordinate.
    y: ``[n]`` second coordinate.
    weights: ``[n]`` values whose medians are taken.
    num_bins: bins per axis, an int or ``(num_x_bins, num_y_bins)``.
    x_range: optional ``(lo, hi)`` for ``x``.
    y_range: optional ``(lo, hi)`` for ``y``.

  Returns:
    A :class:`BinnedMedians`; empty cells have ``counts == 0`` and median 0.

  Raises:
    ValueError: naming ``num_bins``, or ``x``/``y``/``weights`` for
      mismatched shapes or (on concrete inputs) non-finite values.
  """
  fn = 'binned_medians_2d'
  x, y, weights = jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights)
  if isinstance(num_bins, numbers.Integral) and not isinstance(num_bins, bool):
    num_bins = (int(num_bins), int(num_bins))
  if (not isinstance(num_bins, (tuple, list)) or len(num_bins) != 2
      or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1
                 for b in num_bins)):
    raise ValueError(f'{fn}: num_bins must be a positive int or a pair of them, got {num_bins!r}.')
  nx, ny = (int(b) for b in num_bins)
  for name, v in (('x', x), ('y', y), ('weights', weights)):
    if v.ndim != 1 or v.shape[0] != x.shape[0] or v.shape[0] == 0:
      raise ValueError(
          f'{fn}: x, y and weights must be non-empty 1-D arrays of equal length; '
          f'{name} has shape {v.shape}, x has {x.shape}.')
    _check_finite(name, fn, v)
  dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
  x, y = x.astype(dtype), y.astype(dtype)
  weights = weights.astype(_float_dtype(weights))

  x_edges, y_edges = _edges(x, x_range, nx), _edges(y, y_range, ny)
  ix, iy = _bin_index(x, x_edges), _bin_index(y, y_edges)
  num_cells = nx * ny
  # Points outside the ranges go to an extra cell that is dropped at the end.
  cell = jnp.where((ix >= 0) & (iy >= 0), ix * ny + iy, num_cells)
  order = jnp.lexsort((weights, cell))  # by cell, then by weight within a cell
  sorted_weights = weights[order]
  counts = jnp.bincount(cell, length=num_cells + 1)
  starts = jnp.cumsum(counts) - counts
  counts, starts = counts[:num_cells], starts[:num_cells]
  last = weights.shape[0] - 1
  lower = sorted_weights[jnp.clip(starts + (counts - 1) // 2, 0, last)]
  upper = sorted_weights[jnp.clip(starts + counts // 2, 0, last)]
  medians = jnp.where(counts > 0, 0.5 * (lower + upper), 0.0)
  return BinnedMedians(
      medians=medians.reshape(nx, ny),
      counts=counts.astype(jnp.int32).reshape(nx, ny),
      x_edges=x_edges,
      y_edges=y_edges,
  )

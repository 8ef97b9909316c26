"""An optimizer's name (``sgd | sam | lsam | asam``) -> the perturbation it puts before the descent.

The one place a name becomes a transformation: the training chain (:mod:`samjax.train.optim`),
the grid trainer, the diagnostics figures and the benchmark all call :func:`perturbation` (or
:func:`sam_options` where only the phantom is formed, not a chain).
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from samjax.transforms import head_mask, sam

OPTIMIZERS = ('sgd', 'sam', 'lsam', 'asam')


def sam_options(name: str, *, adaptive_eta: float = 0.01, head: str = 'head'
                ) -> Optional[dict[str, Any]]:
  """:func:`samjax.sam`'s keyword arguments that make it the named optimizer; None for ``sgd``.

  ``lsam`` perturbs only the leaves under the dict key ``head``; ``asam`` is the adaptive
  (scale-invariant) ascent with ``adaptive_eta``.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name: {name!r} is not one of {", ".join(OPTIMIZERS)}.')
  if name == 'sgd':
    return None
  if name == 'lsam':
    return {'mask': lambda params: head_mask(params, head)}
  if name == 'asam':
    return {'adaptive': True, 'adaptive_eta': adaptive_eta}
  return {}


def perturbation(name: str, rho, *, adaptive_eta: float = 0.01, head: str = 'head',
                 **sam_kwargs) -> Optional[optax.GradientTransformationExtraArgs]:
  """``samjax.sam(rho, ...)`` as the named optimizer has it, or None for ``sgd``.

  ``rho`` may be traced (a vmapped grid) or a schedule; ``sam_kwargs`` (``axis_name``,
  ``sync_perturbation``, ...) go to :func:`samjax.sam` unchanged.
  """
  options = sam_options(name, adaptive_eta=adaptive_eta, head=head)
  return None if options is None else sam(rho, **options, **sam_kwargs)

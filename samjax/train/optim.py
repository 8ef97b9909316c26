"""The optimizer a config describes: ``optax.chain([sam | lsam | asam], [clip], [decay], sgd)``.

Built from ``config.optimizer`` alone; a field it does not set takes the schema's default
(:mod:`samjax.config`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from samjax import SamState
from samjax.config import SCHEDULES, get_field
from samjax.optimizers import perturbation

PyTree = Any


def _field(opt_config, name: str) -> Any:
  return get_field(opt_config, f'optimizer.{name}')


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """``opt_config.schedule``: 'cosine' (decay to 0 over the run) or 'constant'."""
  name = _field(opt_config, 'schedule')
  learning_rate = _field(opt_config, 'learning_rate')
  if name == 'cosine':
    return optax.cosine_decay_schedule(learning_rate, max(int(num_train_steps), 1))
  if name == 'constant':
    return optax.constant_schedule(learning_rate)
  raise ValueError(f'optimizer.schedule must be one of {SCHEDULES}, got {name!r}.')


def optimizer_parts(opt_config, num_train_steps: int, *, axis_name: Optional[str] = None,
                    sync_perturbation: bool = True) -> tuple[list, Optional[int]]:
  """The transformations of :func:`make_optimizer`'s chain and the index of the SAM one (or None)."""
  ascent = perturbation(opt_config.name, _field(opt_config, 'rho'),
                        adaptive_eta=_field(opt_config, 'adaptive_eta'),
                        head=_field(opt_config, 'head'), axis_name=axis_name,
                        sync_perturbation=sync_perturbation)
  parts = [] if ascent is None else [ascent]
  sam_index = 0 if parts else None
  clip = _field(opt_config, 'grad_clip_norm')
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  weight_decay = _field(opt_config, 'weight_decay')
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate_schedule(opt_config, num_train_steps),
                         momentum=_field(opt_config, 'momentum') or None,
                         nesterov=bool(_field(opt_config, 'nesterov'))))
  return parts, sam_index


def make_optimizer(opt_config, num_train_steps: int, *, axis_name: Optional[str] = None,
                   sync_perturbation: bool = True) -> optax.GradientTransformationExtraArgs:
  """``optax.chain([sam | lsam | asam], [clip], [weight decay], sgd(schedule, momentum))``.

  The SAM transform comes first so that it sees the raw gradient and every later transformation
  sees the phantom gradient; weight decay is added at ``theta``. Clipping acts on the gradient
  that is applied (the phantom gradient): before SAM a clip would only rescale the ascent
  direction, which SAM normalises to length ``rho`` anyway, so it would never clip anything.
  """
  parts, _ = optimizer_parts(opt_config, num_train_steps, axis_name=axis_name,
                             sync_perturbation=sync_perturbation)
  return optax.chain(*parts)


def find_sam_state(opt_state: PyTree) -> Optional[SamState]:
  """The :class:`SamState` inside a chain's state, or None for plain SGD."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SamState))
           if isinstance(s, SamState)]
  return found[0] if found else None



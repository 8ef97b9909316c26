"""Checkpoints: an orbax ``CheckpointManager`` in ``<workdir>/checkpoints`` and a restore that
falls back to the previous checkpoint when the newest cannot be read."""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from samjax.train import workdir as workdir_lib

QUARANTINE = 'checkpoints_unreadable'


def manager(workdir: epath.Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(epath.Path(workdir) / workdir_lib.CHECKPOINTS, options=options)


def _quarantine(directory: epath.Path, steps: list[int]) -> None:
  """Moves unreadable checkpoints aside (never deletes them) so that the run can save again."""
  target_root = directory.parent / QUARANTINE
  target_root.mkdir(parents=True, exist_ok=True)
  for step in steps:
    target = target_root / f'{step}.{int(time.time())}'
    (directory / str(step)).rename(target)
    logging.warning('moved the unreadable checkpoint of step %d to %s', step, target)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state) -> tuple[Optional[Any], int]:
  """Restores the newest readable checkpoint, falling back to older ones with a warning.

  An unreadable checkpoint is moved aside to ``checkpoints_unreadable/`` (never deleted).
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  unreadable = []
  restored, restored_step = None, 0
  for step in steps:
    try:
      restored = mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
      restored_step = step
      break
    except Exception as e:  # pylint: disable=broad-except  # truncated or corrupt: try older
      logging.warning('checkpoint at step %d is unreadable (corrupt, or saved for another '
                      'device layout: %s: %s); trying an older one',
                      step, type(e).__name__, str(e).splitlines()[0] if str(e) else '')
      unreadable.append(step)
  if unreadable:
    if jax.process_index() == 0:
      _quarantine(epath.Path(mgr.directory), unreadable)
    multihost_utils.sync_global_devices('samjax_checkpoints_quarantined')
    mgr.reload()
  if restored is None and steps:
    raise ValueError(f'no readable checkpoint in {mgr.directory}: all of steps {steps} are '
                     f'corrupt (moved to {QUARANTINE}/). Rerun to start afresh.')
  if unreadable and restored is not None:
    logging.warning('resumed from step %d, not the newest checkpoint', restored_step)
  return restored, restored_step


def restore_step(mgr: ocp.CheckpointManager, abstract_state, step: int):
  if step not in mgr.all_steps():
    raise ValueError(f'{mgr.directory}: no checkpoint at step {step}; saved steps: '
                     f'{sorted(mgr.all_steps())}.')
  return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
  mgr.save(step, args=ocp.args.StandardSave(state), force=True)
  mgr.wait_until_finished()


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def newest_finite_step(mgr: ocp.CheckpointManager, abstract_state) -> Optional[int]:
  """The newest checkpoint whose parameters and statistics are all finite (None if none)."""
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state = mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception:  # pylint: disable=broad-except  # unreadable: try an older one
      continue
    if _finite((state.params, state.batch_stats)):
      return step
  return None


def is_checkpoint(path: epath.Path) -> bool:
  """A samjax checkpoint folder (``<workdir>/checkpoints/<step>``)."""
  return path.is_dir() and (path / 'default').exists()


def restore_variables(path: epath.Path, abstract_state) -> dict:
  """``{'params', 'batch_stats'}`` of the samjax checkpoint at ``path`` (its optimizer state is
  not used: a run initialised from it starts its own)."""
  state = ocp.StandardCheckpointer().restore(epath.Path(path) / 'default', abstract_state)
  return {'params': state.params, 'batch_stats': state.batch_stats}

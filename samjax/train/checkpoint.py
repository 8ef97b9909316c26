"""Checkpoints: an orbax ``CheckpointManager`` in ``<workdir>/checkpoints`` and a restore that
falls back to the previous checkpoint when the newest cannot be read or does not verify.

Every checkpoint records the SHA-256 of its array data as a second item of the same orbax save
(``<step>/samjax_checksum/``, beside the state in ``<step>/default/``). orbax finalises a step
only after all of its items are written (a rename of the temporary folder on a local disk, a
commit marker on gs://), so a finalised checkpoint saved by samjax always holds its record. A
restore recomputes the checksum from the restored arrays and treats a mismatch like an
unreadable checkpoint: quarantined, with a warning naming it, and the previous checkpoint used.
Silent byte flips therefore never reach training.

A finalised checkpoint without a record was therefore saved by an older samjax: before
checksums existed, or by the versions that wrote the record as a side file after finalisation
(``<step>/samjax_checksum.json``) when a run was stopped in between. Its arrays are the ones
orbax finalised; it is restored unverified, with one warning naming it. A record in that side
file is still verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from samjax.io_utils import is_local, read_json
from samjax.train import workdir as workdir_lib
from samjax.arrays import all_finite, to_host
from samjax.cli import first_line

# How long a failed orbax operation's event loop waits for its other in-flight writes before it
# is closed anyway (they fail fast on a full disk; on gs:// tensorstore's own retries bound them).
DRAIN_SECONDS = 120.0

QUARANTINE = 'checkpoints_unreadable'
# orbax's name for a single-item checkpoint's folder: the state keeps it, so that checkpoints
# saved before the checksum item existed restore unchanged.
STATE_ITEM = 'default'
CHECKSUM_ITEM = 'samjax_checksum'  # <step>/samjax_checksum/: a JSON item {'sha256': ...}
LEGACY_CHECKSUM_FILE = 'samjax_checksum.json'  # the side file of earlier samjax versions


def _run_sync_draining(coro):
  """orbax's ``_run_sync_via_new_loop``, but the loop outlives the writes it started.

  orbax runs each save in a fresh event loop that it closes as soon as the coroutine ends. When
  one tensorstore write fails (``No space left on device``) ``asyncio.gather`` raises at once
  while the other writes are still in flight; when they finish, tensorstore's completion
  callbacks call ``loop.call_soon_threadsafe`` on the closed loop from its own threads and the
  ``RuntimeError: Event loop is closed`` tracebacks are printed from C++ (sys.excepthook,
  threading.excepthook and logging filters did not catch them). Here, after the coroutine ends,
  the loop keeps running until every task it still holds has finished (bounded by
  ``DRAIN_SECONDS``), so every callback reaches a live loop; only then is it closed. A successful save has no pending tasks: nothing changes for it.
  """
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    try:
      pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
      if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=DRAIN_SECONDS))
        for task in pending:  # their failures repeat the one already raised: mark them seen
          if task.done() and not task.cancelled():
            task.exception()
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
      asyncio.set_event_loop(None)
      loop.close()


# The private orbax function that _run_sync_draining replaces (orbax-checkpoint 0.12.8; pyproject
# pins the tested range). tests/test_checkpoint_orbax.py fails when a release renames or removes it.
PATCHED_MODULE = 'orbax.checkpoint._src.asyncio_utils'
PATCHED_FUNCTION = '_run_sync_via_new_loop'


def _install_draining_loops() -> bool:
  """Replaces orbax's private per-call loop runner with :func:`_run_sync_draining`.

  Returns whether it was replaced. A release without the function keeps working, with orbax's
  own runner, and a warning says what is lost (a full disk may then print 'Event loop is
  closed' tracebacks beside samjax's one-line error).
  """
  try:
    module = importlib.import_module(PATCHED_MODULE)
  except ImportError:
    module = None
  if not callable(getattr(module, PATCHED_FUNCTION, None)):
    logging.warning('orbax-checkpoint %s has no %s.%s: its save loops are not drained, so a '
                    'failed save (e.g. a full disk) may print tracebacks; samjax is tested with '
                    'the versions that pyproject.toml allows', importlib.metadata.version('orbax-checkpoint'),
                    PATCHED_MODULE,
                    PATCHED_FUNCTION)
    return False
  setattr(module, PATCHED_FUNCTION, _run_sync_draining)
  return True


DRAINING_INSTALLED = _install_draining_loops()


def checksum(state) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = np.ascontiguousarray(to_host(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


class ChecksumMismatch(ValueError):
  """A restored checkpoint's arrays differ from the ones saved."""


def recorded_checksum(step_dir: epath.Path) -> Optional[str]:
  """The SHA-256 recorded when the checkpoint in ``step_dir`` was saved, or None if none was."""
  step_dir = epath.Path(step_dir)
  if (step_dir / CHECKSUM_ITEM).exists():
    record = ocp.JsonCheckpointHandler().restore(step_dir / CHECKSUM_ITEM, ocp.args.JsonRestore())
  elif (step_dir / LEGACY_CHECKSUM_FILE).exists():
    record = read_json(step_dir / LEGACY_CHECKSUM_FILE)
  else:
    return None
  return record['sha256']


def _verify(step_dir: epath.Path, step: int, state) -> None:
  """Raises ChecksumMismatch if ``state`` differs from what was saved; warns if unrecorded."""
  expected = recorded_checksum(step_dir)
  if expected is None:
    # Finalised without the record: saved before samjax recorded checksums (the record is part
    # of the same atomic save now), so there is nothing to compare, not evidence of damage.
    logging.warning('checkpoint at step %d (%s): no checksum recorded: restored unverified '
                    '(saved before samjax recorded checksums)', step, step_dir)
    return
  if checksum(state) != expected:
    raise ChecksumMismatch('array data do not match the checksum recorded at save')


def manager(workdir: epath.Path, keep: int, *, save_every: Optional[int] = None,
            last_step: Optional[int] = None) -> ocp.CheckpointManager:
  """The workdir's manager, keeping ``keep`` checkpoints.

  Its ``should_save(step)`` is the run's cadence: every ``save_every`` steps, the ``last_step``
  and orbax's preemption points (not the first step, unlike orbax's default policy).
  """
  policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
  if save_every:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(save_every))
  if last_step is not None:
    policies.append(ocp.checkpoint_managers.SpecificStepsPolicy([last_step]))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False,
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies))
  return ocp.CheckpointManager(
      epath.Path(workdir) / workdir_lib.CHECKPOINTS, options=options,
      item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                     CHECKSUM_ITEM: ocp.JsonCheckpointHandler()})


def _restore_state(mgr: ocp.CheckpointManager, step: int, abstract_state):
  """The state item of step ``step`` (its checksum item, if any, is read by ``_verify``)."""
  restored = mgr.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
  return restored[STATE_ITEM]


def _move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves the folder ``source`` to ``target``: one rename on a local disk; on an object store
  (gs://), where a folder is only a name prefix and renaming it fails (HTTP 404: there is no
  folder object), every object is copied first and the source deleted only after all copies
  exist, so an interruption never loses data (the source, still there, is moved again later)."""
  if is_local(source):
    source.rename(target)
    return
  for root, _, files in source.walk():
    for name in files:
      destination = target / (root / name).relative_to(source)
      destination.parent.mkdir(parents=True, exist_ok=True)
      (root / name).copy(destination, overwrite=True)
  source.rmtree()


def _quarantine(directory: epath.Path, steps: list[int]) -> None:
  """Moves unreadable checkpoints aside (never deletes them) so that the run can save again."""
  target_root = directory.parent / QUARANTINE
  target_root.mkdir(parents=True, exist_ok=True)
  for step in steps:
    target = target_root / f'{step}.{int(time.time())}'
    _move_tree(directory / str(step), target)
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
      restored = _restore_state(mgr, step, abstract_state)
      _verify(epath.Path(mgr.directory) / str(step), step, restored)
      restored_step = step
      break
    except Exception as e:  # pylint: disable=broad-except  # truncated or corrupt: try older
      restored = None
      logging.warning('checkpoint at step %d is unreadable (corrupt, or saved for another '
                      'device layout: %s: %s); trying an older one',
                      step, type(e).__name__, first_line(e))
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
  state = _restore_state(mgr, step, abstract_state)
  _verify(epath.Path(mgr.directory) / str(step), step, state)
  return state


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves ``state`` at ``step`` with its checksum, as two items of one orbax save.

  One save, so orbax's finalisation covers both: no finalised step lacks its record (orbax
  writes JSON items from process 0 only; every process computes the same digest).
  """
  digest = checksum(state)
  mgr.save(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state),
      CHECKSUM_ITEM: ocp.args.JsonSave({'sha256': digest})}), force=True)
  mgr.wait_until_finished()


def newest_finite_step(mgr: ocp.CheckpointManager, abstract_state,
                       steps: Sequence[int]) -> Optional[int]:
  """The newest of ``steps`` whose parameters and statistics are all finite (None if none)."""
  for step in sorted(steps, reverse=True):
    try:
      state = _restore_state(mgr, step, abstract_state)
    except Exception:  # pylint: disable=broad-except  # unreadable: try an older one
      continue
    if all_finite((state.params, state.batch_stats)):
      return step
  return None


def is_checkpoint(path: epath.Path) -> bool:
  """A samjax checkpoint folder (``<workdir>/checkpoints/<step>``)."""
  return path.is_dir() and (path / STATE_ITEM).exists()


def restore_variables(path: epath.Path, abstract_state) -> dict:
  """``{'params', 'batch_stats'}`` of the samjax checkpoint at ``path`` (its optimizer state is
  not used: a run initialised from it starts its own)."""
  path = epath.Path(path)
  state = ocp.StandardCheckpointer().restore(path / STATE_ITEM, abstract_state)
  _verify(path, int(path.name), state)
  return {'params': state.params, 'batch_stats': state.batch_stats}

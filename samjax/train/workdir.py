"""The workdir: its files, the checks made before anything is written, config.json, metrics.

Layout (a local path or a URL such as ``gs://bucket/run``; every access goes through
:mod:`etils.epath`)::

  config.json       every field of the schema, resolved (a resumed run must match it)
  metrics.jsonl     one JSON object per logged step: step, loss, ...; each step once, in order
  tensorboard/      TensorBoard event files (clu metric writers)
  checkpoints/      orbax CheckpointManager (periodic, keep N, automatic resume)
  probe.json        test_error, worst_group_error, easy/hard probe errors, per-group numbers
  lock/             the live run's claim: host, pid, start; its heartbeat (removed when it ends)

Rules of a rerun on an existing workdir (checked before anything is written):

* the config must match ``config.json`` except the fields of :data:`RESUMABLE_FIELDS`;
* checkpoints without ``config.json`` are refused (the run they belong to is unknown);
* one run at a time: a second run on a workdir whose lock (:class:`WorkdirLock`) is alive is
  refused naming the holder; a dead run's lock is taken over;
* ``num_train_steps`` may be raised (training continues from the newest checkpoint; the
  learning-rate schedule is the new length's, so the steps after the old end follow the new
  schedule) but not lowered below the newest checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from clu import metric_writers
from etils import epath
from flax import traverse_util

from samjax import claim_lock
from samjax.io_utils import atomic_write_json, atomic_write_text, is_local

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
PROBE_FILE = 'probe.json'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'

# Fields a resumed run may change: its length (num_train_steps, num_epochs; the schedule follows
# the new length), logging, checkpointing cadence and where batches are made (input threads, the
# data placement: every placement trains bit-identically, and 'auto' may choose otherwise on
# another machine).
RESUMABLE_FIELDS = ('num_train_steps', 'num_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
                    'log_every_steps', 'progress_bar', 'profile_steps', 'input_workers',
                    'data.placement', 'data.device_memory_budget_mb')


def config_to_dict(config) -> dict:
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return dict(config)


def check_usable(workdir: str) -> epath.Path:
  """The workdir as an epath; ValueError if it cannot hold a run (checked without writing)."""
  path = epath.Path(workdir)
  if path.exists():
    if not path.is_dir():
      raise ValueError(f'--workdir {workdir} is a file, not a directory; pass a directory.')
    if is_local(path) and not os.access(os.fspath(path), os.W_OK | os.X_OK):
      raise ValueError(f'--workdir {workdir} is not writable; pass a writable directory.')
    return path
  if is_local(path):
    parent = path.absolute().parent
    while not parent.exists():
      parent = parent.parent
    if not parent.is_dir():
      raise ValueError(f'--workdir {workdir}: {parent} is a file, not a directory.')
    if not os.access(os.fspath(parent), os.W_OK | os.X_OK):
      raise ValueError(f'--workdir {workdir} cannot be created: {parent} is not writable.')
  return path


def checkpoint_steps(workdir: epath.Path) -> list[int]:
  """Steps of the checkpoints in the workdir (orbax names them by their step), ascending."""
  folder = workdir / CHECKPOINTS
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def saved_config(workdir: epath.Path) -> Optional[dict]:
  path = workdir / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore it or use a new --workdir.') from None


def check_rerun(workdir: epath.Path, config) -> None:
  """The rerun rules of the module docstring that need no data set; ValueError naming the fix."""
  saved = saved_config(workdir)
  steps = checkpoint_steps(workdir)
  if saved is None:
    if steps:
      raise ValueError(
          f'workdir {workdir} holds checkpoints (steps {steps}) but no {CONFIG_FILE}, so the run '
          f'they belong to is unknown; restore {CONFIG_FILE} or use a new --workdir.')
    return
  flat = lambda tree: traverse_util.flatten_dict(tree, sep='.')  # {'data.placement': ...}
  saved, current = flat(saved), flat(config_to_dict(config))
  differing = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
  if differing:
    raise ValueError(
        f'workdir {workdir} holds a run with another config (fields {", ".join(differing)} '
        'differ); use a new --workdir or the same config.')


def check_length(workdir: epath.Path, num_steps: int) -> None:
  steps = checkpoint_steps(workdir)
  if steps and steps[-1] > num_steps:
    raise ValueError(
        f'config.num_train_steps: {num_steps} is below the newest checkpoint of {workdir} (step '
        f'{steps[-1]}); a run cannot be shortened: use a new --workdir.')


def write_config(workdir: epath.Path, config) -> None:
  atomic_write_json(workdir / CONFIG_FILE, config_to_dict(config))


def read_metrics(path: epath.Path) -> list[dict]:
  """The intact records of a metrics.jsonl (a line torn by a kill is skipped)."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def truncate_metrics(path: epath.Path, last_step: int) -> None:
  """Drops metric lines logged after the restored step, so a resumed log equals a straight one."""
  if not path.exists():
    return
  kept = [r for r in read_metrics(path) if isinstance(r, dict) and r.get('step', 1 << 62) <= last_step]
  atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))


class JsonlWriter(metric_writers.interface.MetricWriter):
  """clu metric writer of ``metrics.jsonl``: one object per step, floats at full precision.

  Scalars written for one step are merged into one record; :meth:`flush` writes the records
  (appended to a local file; a URL's object is rewritten whole, object stores cannot append).
  """

  def __init__(self, path: epath.Path):
    self._path = epath.Path(path)
    self._local = is_local(self._path)
    self._records = [] if self._local else read_metrics(self._path)
    self._pending: dict[int, dict] = {}

  def write_scalars(self, step: int, scalars) -> None:
    record = self._pending.setdefault(int(step), {'step': int(step)})
    record.update({k: float(v) for k, v in scalars.items()})

  def flush(self) -> None:
    new = [self._pending[s] for s in sorted(self._pending)]
    self._pending.clear()
    if not new:
      return
    lines = ''.join(json.dumps(r) + '\n' for r in new)
    if self._local:
      with self._path.open('a') as f:
        f.write(lines)
    else:
      self._records.extend(new)
      atomic_write_text(self._path, ''.join(json.dumps(r) + '\n' for r in self._records))

  def close(self) -> None:
    self.flush()

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams


LOCK_DIR = 'lock'
# A live run touches its claim's heartbeat every HEARTBEAT_SECONDS; a claim from another host
# whose heartbeat is older than STALE_SECONDS belongs to a dead run (killed, or its host lost) and
# is taken over. On the claim's own host a run whose process no longer exists is seen dead at once.
HEARTBEAT_SECONDS = claim_lock.HEARTBEAT_SECONDS
STALE_SECONDS = claim_lock.STALE_SECONDS


class WorkdirLock(claim_lock.ClaimLock):
  """One run per workdir: the claim protocol of :class:`samjax.claim_lock.ClaimLock` over the
  files of ``<workdir>/lock/``; a refusal (ValueError) names the live run that holds it."""

  def __init__(self, workdir: epath.Path, heartbeat: float = HEARTBEAT_SECONDS,
               stale: float = STALE_SECONDS):
    super().__init__(epath.Path(workdir) / LOCK_DIR, heartbeat, stale)
    self._workdir = epath.Path(workdir)

  def refusal(self, holder: dict) -> str:
    return (f'workdir {self._workdir} is in use by another run (host {holder.get("host")}, '
            f'pid {holder.get("pid")}, since {claim_lock.format_since(holder)}); stop it, or use '
            f'a new --workdir. A lock whose run is gone is taken over (same host: at once; another '
            f'host: after {self.stale_seconds:.0f} s without a heartbeat).')

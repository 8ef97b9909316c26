"""The workdir: its files, the checks made before anything is written, config.json, metrics.

Layout (a local path or a URL such as ``gs://bucket/run``; every access goes through
:mod:`etils.epath`)::

  config.json       every field of the schema, resolved (a resumed run must match it)
  metrics.jsonl     one JSON object per logged step: step, loss, ...; each step once, in order
  tensorboard/      TensorBoard event files (clu metric writers)
  checkpoints/      orbax CheckpointManager (periodic, keep N, automatic resume)
  probe.json        test_error, worst_group_error, easy/hard probe errors, per-group numbers
  lock.json         the live run's host, pid, start and heartbeat (removed when it ends)

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
import socket
import threading
import time
import uuid
from typing import Optional

from clu import metric_writers
from etils import epath

from samjax.io_utils import atomic_write_json, atomic_write_text

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
PROBE_FILE = 'probe.json'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'

# Fields a resumed run may change: its length (num_train_steps, num_epochs; the schedule follows
# the new length), logging, checkpointing cadence and input threads.
RESUMABLE_FIELDS = ('num_train_steps', 'num_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
                    'log_every_steps', 'progress_bar', 'input_workers')


def config_to_dict(config) -> dict:
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return dict(config)


def _is_local(path: epath.Path) -> bool:
  return '://' not in os.fspath(path)


def check_usable(workdir: str) -> epath.Path:
  """The workdir as an epath; ValueError if it cannot hold a run (checked without writing)."""
  path = epath.Path(workdir)
  if path.exists():
    if not path.is_dir():
      raise ValueError(f'--workdir {workdir} is a file, not a directory; pass a directory.')
    if _is_local(path) and not os.access(os.fspath(path), os.W_OK | os.X_OK):
      raise ValueError(f'--workdir {workdir} is not writable; pass a writable directory.')
    return path
  if _is_local(path):
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
  current = config_to_dict(config)
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
    self._local = _is_local(self._path)
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


LOCK_FILE = 'lock.json'
# A live run rewrites its lock every HEARTBEAT_SECONDS; a lock not rewritten for STALE_SECONDS
# belongs to a dead run (killed, or its host lost) and is taken over. On the lock's own host a
# run whose process no longer exists is seen dead at once.
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class WorkdirLock:
  """One run per workdir: ``<workdir>/lock.json`` names the holder (host, pid, since).

  Object stores such as gs:// have no file locks, so the lock is a file with a heartbeat: a
  daemon thread rewrites it while the run lives, and a lock is stale when its heartbeat is
  older than :data:`STALE_SECONDS` or its process is gone from this host. Two runs starting
  within the same second may both see no lock; each then re-reads the lock after writing it
  and only the one whose token is there proceeds.
  """

  def __init__(self, workdir: epath.Path, heartbeat: float = HEARTBEAT_SECONDS,
               stale: float = STALE_SECONDS):
    self._path = epath.Path(workdir) / LOCK_FILE
    self._heartbeat, self._stale = heartbeat, stale
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._since = time.time()

  def _record(self) -> dict:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'since': self._since,
            'heartbeat': time.time(), 'token': self._token}

  def holder(self) -> Optional[dict]:
    """The live holder's record, or None if the workdir is free (no lock, or a stale one)."""
    if not self._path.exists():
      return None
    try:
      record = json.loads(self._path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError):
      return None  # torn or just removed: free
    if time.time() - float(record.get('heartbeat', 0)) > self._stale:
      return None
    if record.get('host') == socket.gethostname() and not _process_alive(record.get('pid')):
      return None
    return record

  def check(self) -> None:
    """ValueError naming the holder if another live run holds the workdir (reads only)."""
    record = self.holder()
    if record is not None and record.get('token') != self._token:
      since = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(record['since'])))
      raise ValueError(
          f'workdir {self._path.parent} is in use by another run (host {record["host"]}, pid '
          f'{record["pid"]}, since {since}); stop it, or use a new --workdir. A lock whose '
          f'run died is taken over after {self._stale:.0f} s without heartbeat.')

  def acquire(self) -> None:
    self.check()
    atomic_write_json(self._path, self._record())
    time.sleep(0.2)  # let a simultaneous starter's write land, then see who won
    self.check()
    self._thread = threading.Thread(target=self._beat, name='samjax-lock', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat):
      try:
        atomic_write_json(self._path, self._record())
      except Exception:  # pylint: disable=broad-except  # a missed beat: the next one retries
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      try:
        record = json.loads(self._path.read_text())
        if record.get('token') == self._token:
          self._path.unlink()
      except (FileNotFoundError, json.JSONDecodeError):
        pass


def _process_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError):
    return False
  except PermissionError:  # exists, another user's
    return True
  return True

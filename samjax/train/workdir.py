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
import random
import socket
import threading
import time
import uuid
from typing import Optional

from clu import metric_writers
from etils import epath
from flax import traverse_util

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
                    'log_every_steps', 'progress_bar', 'input_workers', 'data.placement',
                    'data.device_memory_budget_mb')


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
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
_ATTEMPTS = 4


class WorkdirLock:
  """One run per workdir: a claim protocol over plain files in ``<workdir>/lock/``.

  Object stores such as gs:// have no file locks and epath exposes no exclusive create, so:

  1. a run writes its claim ``lock/<token>.json`` (host, pid, since);
  2. it lists the claims that are not stale. If its own is the only one, it holds the lock;
     otherwise it deletes its claim, waits a random moment and tries again (a few times), then
     stops naming the oldest other claim.

  At most one run holds the lock, given writes and listings with read-after-write consistency
  (local disks and GCS give them): a run that saw no other claim listed after writing its own,
  so every claim written later sees it. Runs that start together may all back off once; the
  random waits let one of them win a retry. The holder touches ``lock/<token>.alive`` every
  :data:`HEARTBEAT_SECONDS` and deletes both files when it ends.
  """

  def __init__(self, workdir: epath.Path, heartbeat: float = HEARTBEAT_SECONDS,
               stale: float = STALE_SECONDS):
    self._folder = epath.Path(workdir) / LOCK_DIR
    self._heartbeat, self._stale = heartbeat, stale
    self._host = socket.gethostname()
    self._claim = {'token': uuid.uuid4().hex, 'host': self._host, 'pid': os.getpid(),
                   'since': time.time()}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  @property
  def token(self) -> str:
    return self._claim['token']

  def _file(self, token: str, suffix: str) -> epath.Path:
    return self._folder / f'{token}.{suffix}'

  def _remove(self, token: str) -> None:
    for suffix in ('json', 'alive'):
      try:
        self._file(token, suffix).unlink(missing_ok=True)
      except OSError:
        pass

  def _is_stale(self, path: epath.Path, claim: dict) -> bool:
    if claim.get('host') == self._host:
      return not _process_alive(claim.get('pid'))
    last = max(_mtime(path), _mtime(self._file(claim['token'], 'alive')))
    return time.time() - last > self._stale

  def others(self, *, remove_stale: bool) -> list[dict]:
    """The live claims of other runs (stale ones deleted when ``remove_stale``)."""
    if not self._folder.exists():
      return []
    live = []
    for path in self._folder.glob('*.json'):
      try:
        claim = json.loads(path.read_text())
        token = claim['token']
      except (OSError, ValueError, KeyError, TypeError):
        continue  # removed meanwhile, or not a claim
      if token == self.token:
        continue
      if self._is_stale(path, claim):
        if remove_stale:
          self._remove(token)
      else:
        live.append(claim)
    return live

  def _refuse(self, others: list[dict]) -> None:
    holder = min(others, key=lambda c: float(c.get('since', 0)))
    since = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(holder.get('since', 0))))
    raise ValueError(
        f'workdir {self._folder.parent} is in use by another run (host {holder.get("host")}, '
        f'pid {holder.get("pid")}, since {since}); stop it, or use a new --workdir. A lock whose '
        f'run is gone is taken over (same host: at once; another host: after {self._stale:.0f} '
        's without a heartbeat).')

  def check(self) -> None:
    """ValueError naming the holder if another live run holds the workdir (reads only)."""
    others = self.others(remove_stale=False)
    if others:
      self._refuse(others)

  def acquire(self) -> None:
    """Takes the lock, or raises ValueError naming the run that holds it."""
    self._folder.mkdir(parents=True, exist_ok=True)
    others = []
    for attempt in range(_ATTEMPTS):
      if attempt:
        time.sleep(random.uniform(0.05, 0.5) * attempt)
      self._file(self.token, 'json').write_text(json.dumps(self._claim))
      others = self.others(remove_stale=True)
      if not others:
        self._thread = threading.Thread(target=self._beat, name='samjax-lock', daemon=True)
        self._thread.start()
        return
      self._remove(self.token)
    self._refuse(others)

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat):
      try:
        self._file(self.token, 'alive').write_text(str(time.time()))
      except OSError:  # a missed beat only brings a takeover from another host nearer
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      self._remove(self.token)


def _mtime(path: epath.Path) -> float:
  try:
    return path.stat().mtime
  except OSError:
    return 0.0


def _process_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError):
    return False
  except PermissionError:  # exists, another user's
    return True
  return True

"""A lock over plain files that works on local disks and object stores (gs://).

Object stores have no file locks and :mod:`etils.epath` exposes no exclusive create, so a
:class:`ClaimLock` is a claim protocol over the files of one folder:

1. a process writes its claim ``<folder>/<token>.json`` (host, pid, since);
2. it lists the claims that are not stale. If its own is the only one, it holds the lock;
   otherwise it deletes its claim, waits a random moment and tries again (a few times), then
   raises :class:`Held` naming the oldest other claim.

At most one process holds the lock, given writes and listings with read-after-write consistency
(local disks and GCS give them): a process that saw no other claim listed after writing its own
is seen by every claim written later. Processes that start together may all back off once; the
random waits let one of them win a retry. The holder touches ``<folder>/<token>.alive`` every
``heartbeat`` seconds and deletes both files when it releases the lock.

A claim is stale (its process is gone, and the lock is taken over) when, on this host, its
process no longer exists, or, from another host, its heartbeat is older than ``stale`` seconds.

Users: the workdir (one run at a time, :class:`samjax.train.workdir.WorkdirLock`) and the data
directory (one process prepares a data set, the others wait, :mod:`samjax.data.prepare`).
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

from etils import epath

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
_ATTEMPTS = 4


class Held(ValueError):
  """The lock is held by another live process; ``holder`` is its claim (host, pid, since)."""

  def __init__(self, message: str, holder: dict):
    super().__init__(message)
    self.holder = holder


class ClaimLock:
  """One holder at a time among the processes that claim ``folder`` (see the module docstring)."""

  def __init__(self, folder: epath.Path, heartbeat: float = HEARTBEAT_SECONDS,
               stale: float = STALE_SECONDS):
    self._folder = epath.Path(folder)
    self._heartbeat, self._stale = heartbeat, stale
    self._host = socket.gethostname()
    self._claim = {'token': uuid.uuid4().hex, 'host': self._host, 'pid': os.getpid(),
                   'since': time.time()}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  @property
  def token(self) -> str:
    return self._claim['token']

  @property
  def stale_seconds(self) -> float:
    return self._stale

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
    """The live claims of other processes (stale ones deleted when ``remove_stale``)."""
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

  def refusal(self, holder: dict) -> str:
    """The one-line message of :class:`Held` (subclasses name what is locked and the fix)."""
    return (f'{self._folder} is locked by host {holder.get("host")}, pid {holder.get("pid")}, '
            f'since {format_since(holder)}')

  def _refuse(self, others: list[dict]) -> None:
    holder = min(others, key=lambda c: float(c.get('since', 0)))
    raise Held(self.refusal(holder), holder)

  def check(self) -> None:
    """Raises :class:`Held` naming the holder if another live process holds the lock."""
    others = self.others(remove_stale=False)
    if others:
      self._refuse(others)

  def acquire(self) -> None:
    """Takes the lock, or raises :class:`Held` naming the process that holds it."""
    self._folder.mkdir(parents=True, exist_ok=True)
    others = []
    for attempt in range(_ATTEMPTS):
      if attempt:
        time.sleep(random.uniform(0.05, 0.5) * attempt)
      self._file(self.token, 'json').write_text(json.dumps(self._claim))
      others = self.others(remove_stale=True)
      if not others:
        self._stop.clear()
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


def format_since(claim: dict) -> str:
  return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(claim.get('since', 0))))


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

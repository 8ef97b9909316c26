"""One run per workdir: the lock's rules, with real processes racing for it."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from samjax.train import workdir as workdir_lib


def claim_file(workdir, token, host, pid):
  folder = workdir / workdir_lib.LOCK_DIR
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'{token}.json'
  path.write_text(json.dumps({'token': token, 'host': host, 'pid': pid, 'since': time.time()}))
  return path


def dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def claims(workdir):
  return sorted(p.name for p in (workdir / workdir_lib.LOCK_DIR).glob('*.json'))


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tmp_path):
  first = workdir_lib.WorkdirLock(epath.Path(tmp_path))
  first.acquire()
  second = workdir_lib.WorkdirLock(epath.Path(tmp_path))
  with pytest.raises(ValueError) as read_only:
    second.check()
  with pytest.raises(ValueError) as taking:
    second.acquire()
  for e in (read_only, taking):
    message = str(e.value)
    assert f'pid {os.getpid()}' in message and f'host {socket.gethostname()}' in message
    assert 'since' in message and '\n' not in message
  assert claims(tmp_path) == [f'{first.token}.json']  # the refused run left nothing
  first.release()
  assert claims(tmp_path) == []
  second.acquire()  # free again
  second.release()


def test_a_killed_runs_lock_on_this_host_is_taken_over_at_once(tmp_path):
  stale = claim_file(tmp_path, 'dead', socket.gethostname(), dead_pid())
  lock = workdir_lib.WorkdirLock(epath.Path(tmp_path))
  lock.check()  # a dead holder does not count
  lock.acquire()
  assert not stale.exists()
  lock.release()


def test_another_hosts_lock_blocks_until_its_heartbeat_is_stale(tmp_path):
  path = claim_file(tmp_path, 'remote', 'some-other-host', 12345)
  with pytest.raises(ValueError, match='host some-other-host, pid 12345'):
    workdir_lib.WorkdirLock(epath.Path(tmp_path)).acquire()
  old = time.time() - workdir_lib.STALE_SECONDS - 5
  os.utime(path, (old, old))
  alive = tmp_path / workdir_lib.LOCK_DIR / 'remote.alive'
  alive.write_text('')
  with pytest.raises(ValueError):  # a recent heartbeat keeps it alive
    workdir_lib.WorkdirLock(epath.Path(tmp_path)).acquire()
  os.utime(alive, (old, old))
  lock = workdir_lib.WorkdirLock(epath.Path(tmp_path))
  lock.acquire()
  assert not path.exists() and not alive.exists()
  lock.release()


def test_the_holder_keeps_its_heartbeat(tmp_path):
  lock = workdir_lib.WorkdirLock(epath.Path(tmp_path), heartbeat=0.05)
  lock.acquire()
  alive = tmp_path / workdir_lib.LOCK_DIR / f'{lock.token}.alive'
  deadline = time.time() + 10
  while not alive.exists() and time.time() < deadline:
    time.sleep(0.02)
  assert alive.exists()
  lock.release()
  assert not alive.exists()


def contender(workdir, barrier, results):
  barrier.wait()
  lock = workdir_lib.WorkdirLock(epath.Path(workdir))
  try:
    lock.acquire()
  except ValueError:
    results.put(('refused', 0.0, 0.0))
    return
  start = time.monotonic()
  time.sleep(0.5)
  results.put(('held', start, time.monotonic()))
  lock.release()


@pytest.mark.parametrize('round_', range(2))
def test_racing_runs_never_hold_it_together(tmp_path, round_):
  del round_
  ctx = multiprocessing.get_context('fork')
  n = 4
  barrier, results = ctx.Barrier(n), ctx.Queue()
  procs = [ctx.Process(target=contender, args=(str(tmp_path), barrier, results)) for _ in range(n)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(60)
  outcomes = [results.get(timeout=5) for _ in range(n)]
  held = sorted((start, end) for what, start, end in outcomes if what == 'held')
  assert held, outcomes  # someone got it
  for (_, end), (start, _) in zip(held, held[1:]):
    assert end <= start, held  # never two holders at once
  assert claims(tmp_path) == []

"""A data set is prepared once among the processes that share a data_dir; the others wait, then read."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from samjax.data import prepare as prepare_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENERATED = []  # one entry per preparation of TinyCounted


class TinyCounted(tfds.core.GeneratorBasedBuilder):
  """Four scalars; counts how often it is prepared, and takes long enough for others to arrive."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'x': tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    GENERATED.append(time.monotonic())
    time.sleep(0.5)
    for i in range(4):
      yield i, {'x': i}


def values(builder):
  return sorted(int(e['x']) for e in tfds.as_numpy(builder.as_dataset(split='train')))


def lock_folder(data_dir):
  return os.path.join(data_dir, prepare_lib.LOCKS, 'tiny_counted')


def test_callers_at_once_prepare_once_and_all_read_it(tmp_path):
  GENERATED.clear()
  data_dir = str(tmp_path / 'tfds')
  barrier, builders, errors = threading.Barrier(3), [], []

  def caller():
    barrier.wait()
    try:
      builders.append(prepare_lib.prepare_once('tiny_counted', data_dir, poll_seconds=0.05))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=caller) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert not errors, errors
  assert len(GENERATED) == 1
  assert [values(b) for b in builders] == [[0, 1, 2, 3]] * 3
  assert os.listdir(lock_folder(data_dir)) == []  # released
  # Prepared: a later call reads it without the lock.
  assert values(prepare_lib.prepare_once('tiny_counted', data_dir)) == [0, 1, 2, 3]
  assert len(GENERATED) == 1


def write_claim(folder, pid):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'other.json'), 'w') as f:
    json.dump({'token': 'other', 'host': socket.gethostname(), 'pid': pid,
               'since': time.time()}, f)


def test_a_preparer_that_dies_is_taken_over(tmp_path):
  GENERATED.clear()
  data_dir = str(tmp_path / 'tfds')
  # A live process holds the claim and never prepares; it dies after a second.
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.0)'])
  reaper = threading.Thread(target=holder.wait)  # reaped at once: a zombie would still be alive
  reaper.start()
  write_claim(lock_folder(data_dir), holder.pid)
  start = time.monotonic()
  builder = prepare_lib.prepare_once('tiny_counted', data_dir, poll_seconds=0.05)
  reaper.join()
  assert values(builder) == [0, 1, 2, 3]
  assert len(GENERATED) == 1 and GENERATED[0] - start >= 0.5  # waited for the holder first
  assert os.listdir(lock_folder(data_dir)) == []


# ----------------------------------------------------------------------------------------------
# End to end: `python -m samjax.main` processes on a fresh data_dir.


def env(devices):
  out = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  out.pop('XLA_FLAGS', None)
  return out


def start(args, devices=1):
  return subprocess.Popen([sys.executable, '-m', 'samjax.main', *args], cwd=ROOT, env=env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tiny_args(workdir, data_dir):
  return ['--config=configs/digits_dominoes.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.num_train_steps=4',
          '--config.batch_size=16', '--config.eval_batch_size=64', '--config.log_every_steps=2',
          '--config.progress_bar=False', '--verbosity=0']  # INFO: 'preparing' is logged


def finish_all(procs):
  results = [proc.communicate(timeout=600) for proc in procs]
  return [(proc.returncode, err) for proc, (_, err) in zip(procs, results)]


def read(path):
  with open(path) as f:
    return f.read()


def preparations(errs):
  return sum(line.count('preparing digits_dominoes') for err in errs for line in err.splitlines())


def check_prepared_once(data_dir):
  assert os.listdir(os.path.join(data_dir, 'digits_dominoes')) == ['1.0.0']  # no incomplete.*
  assert os.listdir(os.path.join(data_dir, prepare_lib.LOCKS, 'digits_dominoes')) == []


@pytest.mark.slow
def test_three_first_runs_at_once_on_a_fresh_data_dir_all_finish_alike(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  workdirs = [str(tmp_path / f'run{i}') for i in range(3)]
  outcomes = finish_all([start(tiny_args(w, data_dir)) for w in workdirs])
  for code, err in outcomes:
    assert code == 0, err[-3000:]
  assert preparations([err for _, err in outcomes]) == 1
  check_prepared_once(data_dir)
  for name in ('probe.json', 'metrics.jsonl'):
    first = read(os.path.join(workdirs[0], name))
    assert all(read(os.path.join(w, name)) == first for w in workdirs[1:]), name


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_process_run_on_a_fresh_data_dir_prepares_once(tmp_path):
  data_dir, workdir, port = str(tmp_path / 'tfds'), str(tmp_path / 'run'), free_port()
  procs = [start(tiny_args(workdir, data_dir) + [
      f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'])
           for i in range(2)]
  outcomes = finish_all(procs)
  for code, err in outcomes:
    assert code == 0, err[-3000:]
  assert preparations([err for _, err in outcomes]) == 1
  check_prepared_once(data_dir)
  assert os.path.exists(os.path.join(workdir, 'probe.json'))


@pytest.mark.slow
def test_a_missing_init_checkpoint_is_refused_before_the_data_set_is_prepared(tmp_path):
  data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
  (code, err), = finish_all([start(tiny_args(workdir, data_dir) + [
      f'--config.model.init_checkpoint={tmp_path / "absent.npz"}'])])
  lines = [l for l in err.splitlines() if l.startswith('samjax: error:')]
  assert code == 2 and len(lines) == 1 and 'init_checkpoint' in lines[0], err[-3000:]
  assert 'Traceback' not in err
  assert preparations([err]) == 0
  assert not os.path.exists(data_dir) and not os.path.exists(workdir)

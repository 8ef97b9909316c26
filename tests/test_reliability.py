"""Real processes: killed at random points and resumed bit-exactly; two processes equal one."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def tiny_args(workdir, data_dir, steps=32):
  return ['--config=configs/digits_dominoes.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', f'--config.num_train_steps={steps}',
          '--config.batch_size=16', '--config.eval_batch_size=64',
          '--config.checkpoint_every_steps=4', '--config.log_every_steps=2',
          '--config.progress_bar=False']


def env_with(devices):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  return env


def start(args, devices=2, **kwargs):
  return subprocess.Popen([sys.executable, '-m', 'samjax.main', *args], cwd=ROOT,
                          env=env_with(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    if name.endswith('.jsonl'):
      return [json.loads(line) for line in f]
    return json.load(f)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Builds the digits data set once, so that the processes under test only read it."""
  from samjax import data as data_lib
  from samjax.config import base_train_config
  path = str(tmp_path_factory.mktemp('tfds'))
  config = base_train_config()
  config.data.data_dir = path
  data_lib.load_dataset(config.data, seed=0)
  return path


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  code, _, err = finish(start(tiny_args(workdir, data_dir)))
  assert code == 0, err
  return workdir


def wait_for_checkpoint(workdir, proc, timeout=240):
  folder = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder)):
      return True
    time.sleep(0.05)
  return False


@pytest.mark.parametrize('sig, seed', [(signal.SIGKILL, 0), (signal.SIGKILL, 1), (signal.SIGTERM, 2)])
def test_killed_at_a_random_point_then_resumed_equals_straight_run(tmp_path, data_dir,
                                                                  straight_run, sig, seed):
  workdir = str(tmp_path / 'run')
  proc = start(tiny_args(workdir, data_dir))
  if wait_for_checkpoint(workdir, proc):
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    proc.send_signal(sig)
  code, _, err = finish(proc)
  assert code in (0, -signal.SIGKILL, 143), err
  code, _, err = finish(start(tiny_args(workdir, data_dir)))
  assert code == 0, err
  assert read(workdir, 'metrics.jsonl') == read(straight_run, 'metrics.jsonl')
  assert read(workdir, 'probe.json') == read(straight_run, 'probe.json')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, data_dir):
  single = str(tmp_path / 'single')
  code, _, err = finish(start(tiny_args(single, data_dir, steps=12), devices=4))
  assert code == 0, err
  multi = str(tmp_path / 'multi')
  port = free_port()
  procs = [start(tiny_args(multi, data_dir, steps=12) +
                 [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                  f'--process_id={i}'], devices=2) for i in range(2)]
  for proc in procs:
    code, _, err = finish(proc)
    assert code == 0, err
  one, two = read(single, 'metrics.jsonl'), read(multi, 'metrics.jsonl')
  assert [m['step'] for m in one] == [m['step'] for m in two]
  # Same global batches and mesh size; only the all-reduce order may differ.
  np.testing.assert_allclose([m['loss'] for m in one], [m['loss'] for m in two], rtol=1e-4)
  p1, p2 = read(single, 'probe.json'), read(multi, 'probe.json')
  for key in ('test_error', 'easy_probe_error', 'hard_probe_error'):
    assert abs(p1[key] - p2[key]) <= 0.02, key

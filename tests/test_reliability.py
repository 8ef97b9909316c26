"""Real processes: killed at random points and resumed bit-exactly; two processes equal one."""

import json
import os
import random
import shlex
import shutil
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


# 'sharded': this digits dominoes split (1.5 MiB) exceeds 1 MiB, its shard over 4 devices does not.
@pytest.mark.parametrize('placement, budget_mb, made_on', [
    ('device', 2048, 'device (split replicated)'), ('host', 2048, 'host'),
    ('device', 1.0, 'device (split sharded)')])
def test_two_processes_equal_one(tmp_path, data_dir, placement, budget_mb, made_on):
  args = lambda workdir: tiny_args(workdir, data_dir, steps=12) + [
      '--config.data.augment=True', f'--config.data.placement={placement}',
      f'--config.data.device_memory_budget_mb={budget_mb}']
  single = str(tmp_path / 'single')
  code, _, err = finish(start(args(single) + ['--verbosity=0'], devices=4))
  assert code == 0, err
  assert f'training batches are made on the {made_on}:' in err
  multi = str(tmp_path / 'multi')
  port = free_port()
  procs = [start(args(multi) + ['--config.progress_bar=True'] +
                 [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                  f'--process_id={i}'], devices=2) for i in range(2)]
  outputs = []
  for proc in procs:
    code, out, err = finish(proc)
    assert code == 0, err
    outputs.append((out, err))
  # Only process 0 prints the progress bar and the summary.
  assert 'samjax: done' in outputs[0][0] and 'samjax: done' not in outputs[1][0]
  assert '12/12' in outputs[0][1] and '12/12' not in outputs[1][1]
  one, two = read(single, 'metrics.jsonl'), read(multi, 'metrics.jsonl')
  assert [m['step'] for m in one] == [m['step'] for m in two]
  # Same global batches and mesh size; only the all-reduce order may differ.
  np.testing.assert_allclose([m['loss'] for m in one], [m['loss'] for m in two], rtol=1e-4)
  p1, p2 = read(single, 'probe.json'), read(multi, 'probe.json')
  for key in ('test_error', 'easy_probe_error', 'hard_probe_error'):
    assert abs(p1[key] - p2[key]) <= 0.02, key


def one_error_line(err):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert 'Traceback' not in err, err
  assert len(lines) == 1 and lines[0].startswith('samjax: error:'), err
  return lines[0]


def snapshot(workdir):
  """Every file under workdir with its size and modification time."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def test_reruns_raise_lower_and_lose_config(tmp_path, data_dir, straight_run):
  # Raised num_train_steps on a finished workdir: training continues; each step logged once.
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight_run, workdir)
  code, out, err = finish(start(tiny_args(workdir, data_dir, steps=40)))
  assert code == 0, err
  steps = [m['step'] for m in read(workdir, 'metrics.jsonl')]
  assert steps == list(range(2, 41, 2))
  assert read(workdir, 'metrics.jsonl')[:16] == read(straight_run, 'metrics.jsonl')
  assert read(workdir, 'probe.json')['num_train_steps'] == 40
  assert 'samjax: done' in out and 'test error' in out

  # Lowered below the newest checkpoint: refused, nothing touched.
  before = snapshot(workdir)
  code, _, err = finish(start(tiny_args(workdir, data_dir, steps=20)))
  assert code == 2 and 'num_train_steps' in one_error_line(err)
  assert snapshot(workdir) == before

  # config.json missing beside checkpoints: refused, the checkpoints are not quarantined.
  os.remove(os.path.join(workdir, 'config.json'))
  before = snapshot(workdir)
  code, _, err = finish(start(tiny_args(workdir, data_dir, steps=40)))
  assert code == 2 and 'config.json' in one_error_line(err)
  assert snapshot(workdir) == before
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))


@pytest.mark.parametrize('contents', [None, b'garbage, not a state dict'])
def test_an_unusable_init_checkpoint_is_refused_before_the_workdir_exists(tmp_path, data_dir,
                                                                         contents):
  path = tmp_path / 'weights.npz'
  if contents is not None:
    path.write_bytes(contents)
  workdir = str(tmp_path / 'run')
  code, _, err = finish(start(tiny_args(workdir, data_dir) +
                              [f'--config.model.init_checkpoint={path}']))
  assert code == 2 and 'init_checkpoint' in one_error_line(err)
  assert not os.path.exists(workdir)


def test_the_nan_stop_ends_with_a_command_that_works_as_printed(tmp_path, data_dir):
  # Each stop prints a command (new workdir, learning rate / 10, from the last sane checkpoint);
  # run as printed it trains, and may stop again if the rate is still too high: follow the
  # advice until the run finishes (5 -> 0.5 -> 0.05, the config's own rate, at most).
  workdir = str(tmp_path / 'diverged')
  argv = [a.replace('--config=configs/digits_dominoes.py', '--config=configs/digits_dominoes.py:sgd')
          for a in tiny_args(workdir, data_dir, steps=24)] + ['--config.optimizer.learning_rate=5']
  code, out, err = finish(start(argv))
  assert code == 3, err
  learning_rate = 5.0
  for _ in range(3):
    if code == 0:
      break
    last = err.strip().splitlines()[-1]
    assert last.startswith('samjax: training stopped: non-finite'), last
    command = last.split(', run: ', 1)[1]
    assert command.startswith('python -m samjax.main ')
    argv = shlex.split(command)[3:]
    flags = dict(a.split('=', 1) for a in argv if '=' in a)
    init = flags.get('--config.model.init_checkpoint')
    if init is not None:
      assert os.path.isdir(init), init
    code, out, err = finish(start(argv))
    learning_rate /= 10
    assert code in (0, 3), err
    saved = read(flags['--workdir'], 'config.json')
    assert saved['optimizer']['learning_rate'] == pytest.approx(learning_rate)
    assert saved['model']['init_checkpoint'] == init
  assert code == 0, err
  assert 'samjax: done' in out


def test_a_full_disk_is_one_line_and_exit_74(tmp_path, data_dir):
  small = tmp_path / 'small'
  small.mkdir()
  # A 1.2 MB file system: config, logs and the first checkpoint (~0.8 MB) fit, the second not.
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1200k', 'tmpfs', str(small)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root): no way to fill a disk safely')
  try:
    workdir = str(small / 'run')
    code, _, err = finish(start(tiny_args(workdir, data_dir, steps=24)))
    assert code == 74, err
    ours = [l for l in err.splitlines() if l.startswith('samjax: error:')]
    assert len(ours) == 1 and 'no space left on device' in ours[0], err
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))  # the saved one is intact,
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4', 'samjax_checksum'))  # recorded
  finally:
    subprocess.run(['umount', str(small)], check=True)
  # Strict: orbax's save loop used to close while tensorstore's other writes were in flight, and
  # their callbacks printed 'Event loop is closed' tracebacks in about half of the runs;
  # samjax.train.checkpoint now lets that loop drain first.
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err
  one_error_line(err)


def the_claim(workdir):
  claims = [n for n in os.listdir(os.path.join(workdir, 'lock')) if n.endswith('.json')]
  assert len(claims) == 1, claims
  return read(workdir, os.path.join('lock', claims[0]))


def test_one_run_per_workdir_and_a_killed_runs_lock_is_taken_over(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  first = start(tiny_args(workdir, data_dir, steps=5000))  # alive while the second one starts
  try:
    assert wait_for_checkpoint(workdir, first), 'the first run saved no checkpoint'
    lock = the_claim(workdir)
    assert lock['pid'] == first.pid and lock['host'] == socket.gethostname()
    code, _, err = finish(start(tiny_args(workdir, data_dir, steps=5000)))
    assert code == 2, err
    line = one_error_line(err)
    assert f'pid {first.pid}' in line and socket.gethostname() in line and 'since' in line
    assert first.poll() is None  # the holder is unharmed
  finally:
    first.kill()
    first.communicate()
  assert the_claim(workdir)['pid'] == first.pid  # left behind by the killed run
  newest = max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  # Taken over at once (same host, the holder's process is gone); a shorter length than the
  # killed run's, still past its newest checkpoint, so that the test stays short.
  code, _, err = finish(start(tiny_args(workdir, data_dir, steps=newest + 4)))
  assert code == 0, err
  assert not os.listdir(os.path.join(workdir, 'lock'))  # released at the end
  steps = [m['step'] for m in read(workdir, 'metrics.jsonl')]
  assert steps == list(range(2, newest + 5, 2))  # each step once, in order


def test_a_run_is_quiet_ends_with_a_summary_and_writes_0644_files(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  proc = start(tiny_args(workdir, data_dir, steps=8), preexec_fn=lambda: os.umask(0o022))
  code, out, err = finish(proc)
  assert code == 0, err
  assert err == ''  # no absl / orbax / TFDS INFO lines (progress bar off here)
  assert out.startswith('samjax: done') and f'outputs in {workdir}' in out
  assert 'final step 8: loss' in out and 'easy probe error' in out
  for name in ('config.json', 'metrics.jsonl', 'probe.json'):
    assert os.stat(os.path.join(workdir, name)).st_mode & 0o777 == 0o644, name
  proc = start(tiny_args(str(tmp_path / 'verbose'), data_dir, steps=8) + ['--verbosity=0'])
  code, _, err = finish(proc)
  assert code == 0 and sum(line.startswith('I') for line in err.splitlines()) > 50

"""gs:// workdir and TFDS data_dir, for real, against a local GCS emulator (no network, no mocks).

The digits-dominoes config trains with --workdir=gs://bucket/run and data_dir=gs://bucket/tfds,
is stopped by SIGTERM once a checkpoint is on gs://, resumed, and ends identical to a local run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

COPY_TO_GCS = '''
import sys, tensorflow as tf
src, dst = sys.argv[1:3]
for root, _, files in tf.io.gfile.walk(src):
  target = dst + root[len(src):]
  tf.io.gfile.makedirs(target)
  for name in files:
    tf.io.gfile.copy(f"{root}/{name}", f"{target}/{name}", overwrite=True)
'''


def env_with(extra):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu', **extra)
  env.pop('XLA_FLAGS', None)
  return env


def args(workdir, data_dir):
  return ['--config=configs/digits_dominoes.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.num_train_steps=24',
          '--config.batch_size=16', '--config.eval_batch_size=64',
          '--config.checkpoint_every_steps=4', '--config.log_every_steps=2',
          '--config.progress_bar=False']


def start(arguments, env):
  return subprocess.Popen([sys.executable, '-m', 'samjax.main', *arguments], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  server = gcs_emulator.start(str(tmp_path_factory.mktemp('gcs')))
  yield server
  server.stop()


def test_gs_workdir_and_data_dir_with_sigterm_and_resume_equal_a_local_run(tmp_path, emulator):
  local_data = str(tmp_path / 'tfds')
  local = str(tmp_path / 'local')
  proc = start(args(local, local_data), env_with({}))  # also prepares the data set locally
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err

  gcs_env = env_with(emulator.env)
  subprocess.run([sys.executable, '-c', COPY_TO_GCS, local_data, 'gs://bucket/tfds'],
                 env=gcs_env, check=True, timeout=300, capture_output=True)
  assert any(n.startswith('tfds/digits_dominoes/') for n in emulator.list('tfds/'))

  proc = start(args('gs://bucket/run', 'gs://bucket/tfds'), gcs_env)
  deadline = time.time() + 400
  while proc.poll() is None and time.time() < deadline:
    if any(n.split('/')[2].isdigit() for n in emulator.list('run/checkpoints/')
           if n.count('/') >= 3):
      break
    time.sleep(0.5)
  assert proc.poll() is None, 'the run ended before a checkpoint reached gs://'
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  assert not any(n.startswith('run/probe.json') for n in emulator.list('run/'))
  proc = start(args('gs://bucket/run', 'gs://bucket/tfds'), gcs_env)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  assert 'gs://bucket/run' in out

  def local_file(name):
    with open(os.path.join(local, name)) as f:
      return f.read()
  remote_metrics = [json.loads(l) for l in emulator.read('run/metrics.jsonl').decode().splitlines()]
  local_metrics = [json.loads(l) for l in local_file('metrics.jsonl').splitlines()]
  assert [m['step'] for m in remote_metrics] == list(range(2, 25, 2))
  assert remote_metrics == local_metrics
  assert json.loads(emulator.read('run/probe.json')) == json.loads(local_file('probe.json'))
  assert json.loads(emulator.read('run/config.json'))['data']['data_dir'] == 'gs://bucket/tfds'
  names = emulator.list('run/')
  assert any(n.startswith('run/tensorboard/') for n in names)
  assert any(n.startswith('run/checkpoints/24/') for n in names)


LOCK_ON_GCS = '''
from etils import epath
from samjax.train import workdir as w
first, second = w.WorkdirLock(epath.Path("gs://bucket/locked")), w.WorkdirLock(epath.Path("gs://bucket/locked"))
first.acquire()
for attempt in (second.check, second.acquire):
  try:
    attempt()
    raise SystemExit("a second run took a held lock")
  except ValueError as e:
    assert "in use by another run" in str(e), e
first.release()
second.acquire()
second.release()
print("LOCK OK")
'''


def test_the_workdir_lock_on_gcs(emulator):
  proc = subprocess.run([sys.executable, '-c', LOCK_ON_GCS], cwd=ROOT, env=env_with(emulator.env),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'LOCK OK' in proc.stdout, proc.stderr[-3000:]
  assert not [n for n in emulator.list('locked/lock/') if n.endswith(('.json', '.alive'))]


def test_the_toy_study_writes_to_a_gs_workdir(emulator):
  proc = start(['--config=configs/toy.py', '--workdir=gs://bucket/toy', '--config.seeds=(0,)',
                "--config.methods=('sgd','lsam')", '--config.rhos=(1.0,)', '--config.noflip_rhos=()',
                '--config.complexities=(360.0,)', '--config.num_steps=200',
                '--config.eval_every=100'], env_with(emulator.env))
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  names = emulator.list('toy/')
  assert 'toy/results.json' in names and 'toy/report.md' in names
  assert any(n.endswith('.png') for n in names)
  assert json.loads(emulator.read('toy/results.json'))['runs']


QUARANTINE_ON_GCS = '''
import json, numpy as np
from etils import epath
from samjax.train import checkpoint as c
mgr = c.manager(epath.Path("gs://bucket/q"), keep=5)
state = lambda v: {"w": np.full((3,), v, np.float32)}
c.save(mgr, 1, state(1.0))
c.save(mgr, 2, state(2.0))
# A wrong record: step 2 no longer verifies.
record = epath.Path("gs://bucket/q/checkpoints/2") / c.CHECKSUM_ITEM / "metadata"
record.write_text(json.dumps({"sha256": "0" * 64}))
restored, step = c.restore_latest(mgr, state(0.0))
assert step == 1 and float(restored["w"][0]) == 1.0, (step, restored)
assert mgr.all_steps() == [1], mgr.all_steps()
c.save(mgr, 2, state(3.0))  # the step can be saved again
restored, step = c.restore_latest(mgr, state(0.0))
assert step == 2 and float(restored["w"][0]) == 3.0, (step, restored)
print("QUARANTINE OK")
'''


def test_a_checkpoint_that_does_not_verify_is_quarantined_on_gcs(emulator):
  proc = subprocess.run([sys.executable, '-c', QUARANTINE_ON_GCS], cwd=ROOT,
                        env=env_with(emulator.env), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'QUARANTINE OK' in proc.stdout, proc.stderr[-3000:]
  moved = [n for n in emulator.list('q/checkpoints_unreadable/') if not n.endswith('/')]
  assert moved and all(n.startswith('q/checkpoints_unreadable/2.') for n in moved), moved
  # All of it moved (gs:// has no folder rename: samjax copies every object, then deletes):
  # the array data, orbax's metadata and the wrong record kept as evidence.
  assert any('/default/ocdbt.process_0/d/' in n for n in moved), moved
  assert any(n.endswith('/default/_METADATA') for n in moved), moved
  (record,) = [n for n in moved if n.endswith('/samjax_checksum/metadata')]
  assert json.loads(emulator.read(record)) == {'sha256': '0' * 64}
  assert 'moved the unreadable checkpoint of step 2' in proc.stderr

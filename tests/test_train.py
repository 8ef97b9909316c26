"""End-to-end real-data training on the real scikit-learn digits: outputs, resume, bad input."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from samjax.train import step as step_lib
from samjax import train
from samjax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  return load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'), arg)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def tiny_digits_config(data_dir, optimizer='sam', steps=24):
  config = load_config('digits_dominoes', optimizer)
  config.data.data_dir = data_dir
  config.num_train_steps = steps
  config.batch_size = 16
  config.eval_batch_size = 64
  config.checkpoint_every_steps = 8
  config.log_every_steps = 4
  config.progress_bar = False
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def restore_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(manager.latest_step())
  manager.close()
  return restored


@pytest.mark.slow
def test_digits_dominoes_trains_for_real_and_writes_every_output(tmp_path, data_dir):
  config = tiny_digits_config(data_dir, 'sam', steps=120)
  config.checkpoint_every_steps = 40
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  for name in ('config.json', 'metrics.jsonl', 'probe.json', 'checkpoints', 'tensorboard'):
    assert os.path.exists(os.path.join(workdir, name)), name
  metrics = read_metrics(workdir)
  assert [m['step'] for m in metrics] == list(range(4, 121, 4))
  assert {'loss', 'accuracy', 'grad_norm', 'sam_cosine', 'learning_rate', 'gini_real',
          'gini_phantom'} <= set(metrics[0])
  first, last = np.mean([m['loss'] for m in metrics[:3]]), np.mean([m['loss'] for m in metrics[-3:]])
  assert last < 0.5 * first, (first, last)
  with open(os.path.join(workdir, 'probe.json')) as f:
    probe = json.load(f)
  assert probe == json.loads(json.dumps(result))
  # Both features are binary and probed on group-balanced sets: chance is 0.5.
  assert probe['easy_probe_error'] < 0.2
  assert probe['hard_probe_error'] < 0.4
  assert probe['test_error'] < 0.5
  assert set(probe) >= {'test_error', 'worst_group_error', 'label_probe_error',
                        'attribute_probe_error', 'group_test_errors'}


@pytest.mark.slow
def test_resume_after_sigterm_equals_a_straight_run(tmp_path, data_dir, monkeypatch):
  def config():  # the host pipeline (test_resumed_device_placement_run_... : the device's)
    c = tiny_digits_config(data_dir)
    c.data.placement = 'host'
    return c

  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config(), straight)
  resumed = str(tmp_path / 'resumed')
  restore = preempt_at(monkeypatch, 11)  # between two periodic checkpoints (every 8 steps)
  first = train.train_and_evaluate(config(), resumed)
  assert first == {'preempted_at_step': 11}
  assert not os.path.exists(os.path.join(resumed, 'probe.json'))
  restore()
  train.train_and_evaluate(config(), resumed)
  assert_same_run(straight, resumed)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, caplog):
  workdir = str(tmp_path / 'run')
  config = tiny_digits_config(data_dir, 'sgd', steps=16)
  train.train_and_evaluate(config, workdir)
  latest = os.path.join(workdir, 'checkpoints', '16')
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\0garbage')
  os.remove(os.path.join(workdir, 'probe.json'))
  config.num_train_steps = 16
  train.train_and_evaluate(config, workdir)
  assert 'unreadable' in caplog.text
  assert os.path.exists(os.path.join(workdir, 'probe.json'))


@pytest.mark.slow
def test_checkpoint_from_another_config_is_refused_and_workdir_untouched(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_digits_config(data_dir, 'sgd', steps=8), workdir)
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  other = tiny_digits_config(data_dir, 'sam', steps=8)
  with pytest.raises(ValueError, match='optimizer'):
    train.train_and_evaluate(other, workdir)
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  assert before == after


def test_nan_stops_the_run_naming_step_and_quantity(tmp_path, data_dir):
  config = tiny_digits_config(data_dir, 'sgd', steps=16)
  config.optimizer.learning_rate = 1e30
  config.optimizer.schedule = 'constant'
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.TrainingFault, match=r'non-finite \w+ .* at step \d+'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'probe.json'))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '8'))


@pytest.mark.slow
@pytest.mark.parametrize('perturbation, mode', [('per_device', 'per_microbatch'),
                                                ('sync', 'full_batch')])
def test_every_step_option_trains_end_to_end(tmp_path, data_dir, perturbation, mode):
  config = tiny_digits_config(data_dir, 'lsam', steps=4)
  config.perturbation, config.microbatches, config.microbatch_mode = perturbation, 2, mode
  config.compute_dtype = 'bfloat16'
  config.checkpoint_every_steps = 0
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  metrics = read_metrics(str(tmp_path / 'run'))
  assert [m['step'] for m in metrics] == [4]
  assert all(np.isfinite(v) for v in metrics[0].values())
  assert 0.0 <= result['hard_probe_error'] <= 1.0


def flip_a_byte_in_array_data(step_dir):
  """Flips one byte in the middle of the largest array-data file of a checkpoint step."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'default'))
           for name in names if os.sep + 'd' + os.sep in os.path.join(root, name)]
  target = max(files, key=os.path.getsize)
  with open(target, 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    f.seek(0)
    f.write(bytes(data))
  return target


@pytest.mark.slow
def test_a_byte_flip_in_a_checkpoint_is_caught_and_the_previous_one_used(tmp_path, data_dir,
                                                                         caplog):
  def config(steps):
    c = tiny_digits_config(data_dir, 'sgd', steps=steps)
    c.checkpoint_every_steps = 4
    return c
  straight = str(tmp_path / 'straight')
  expected = train.train_and_evaluate(config(16), straight)
  workdir = str(tmp_path / 'flipped')
  train.train_and_evaluate(config(16), workdir)  # checkpoints 12 and 16 kept
  flip_a_byte_in_array_data(os.path.join(workdir, 'checkpoints', '16'))
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(config(16), workdir)
  warnings = '\n'.join(r.getMessage() for r in caplog.records)
  # orbax restores the flipped bytes silently; the recorded checksum catches them.
  assert 'checkpoint at step 16 is unreadable' in warnings and 'ChecksumMismatch' in warnings
  assert os.listdir(os.path.join(workdir, 'checkpoints_unreadable'))[0].startswith('16.')
  assert 'resumed from step 12' in warnings
  assert read_metrics(workdir) == read_metrics(straight)
  assert result == expected
  for x, y in zip(jax.tree.leaves(restore_params(straight)), jax.tree.leaves(restore_params(workdir))):
    np.testing.assert_array_equal(x, y)


def assert_a_wrong_record_quarantines_step_8(workdir, record):
  """Overwrites the checksum ``record`` of step 8 with a wrong digest: the step is quarantined."""
  with open(record, 'w') as f:
    json.dump({'sha256': '0' * 64}, f)
  with pytest.raises(ValueError, match='no readable checkpoint'):
    train.load_run(workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints_unreadable'))[0].startswith('8.')


@pytest.mark.slow
def test_checksums_are_recorded_and_verified(tmp_path, data_dir, caplog):
  from samjax.train import checkpoint as checkpoint_lib
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_digits_config(data_dir, 'sgd', steps=8), workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '8')
  # An item of the same orbax save as the state, so finalised with it.
  assert os.path.isdir(os.path.join(step_dir, checkpoint_lib.CHECKSUM_ITEM))
  digest = checkpoint_lib.recorded_checksum(step_dir)
  assert len(digest) == 64
  *_, step = train.load_run(workdir)  # verifies the checksum of what it restores
  assert step == 8 and not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))
  # A record in the side file of earlier versions is still verified (and no warning).
  shutil.rmtree(os.path.join(step_dir, checkpoint_lib.CHECKSUM_ITEM))
  legacy_record = os.path.join(step_dir, checkpoint_lib.LEGACY_CHECKSUM_FILE)
  with open(legacy_record, 'w') as f:
    json.dump({'sha256': digest}, f)
  with caplog.at_level('WARNING'):
    *_, step = train.load_run(workdir)
  assert step == 8 and 'unverified' not in caplog.text
  assert_a_wrong_record_quarantines_step_8(workdir, legacy_record)


@pytest.mark.slow
def test_a_wrong_recorded_checksum_quarantines_the_checkpoint(tmp_path, data_dir):
  from samjax.train import checkpoint as checkpoint_lib
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_digits_config(data_dir, 'sgd', steps=8), workdir)
  item = os.path.join(workdir, 'checkpoints', '8', checkpoint_lib.CHECKSUM_ITEM)
  record = os.path.join(item, 'metadata')  # orbax JsonCheckpointHandler's file name
  assert os.path.isfile(record)
  assert_a_wrong_record_quarantines_step_8(workdir, record)


def preempt_at(monkeypatch, call):
  """Makes train_and_evaluate's step send SIGTERM to this process at its ``call``-th call."""
  real_make_train_step = step_lib.make_train_step

  def make_step_that_gets_preempted(*args, **kwargs):
    tx, step = real_make_train_step(*args, **kwargs)
    calls = {'n': 0}

    def preempted_step(*step_args):
      calls['n'] += 1
      if calls['n'] == call:
        os.kill(os.getpid(), signal.SIGTERM)
      return step(*step_args)

    return tx, preempted_step

  monkeypatch.setattr(step_lib, 'make_train_step', make_step_that_gets_preempted)
  return lambda: monkeypatch.setattr(step_lib, 'make_train_step', real_make_train_step)


def assert_same_run(a, b):
  assert read_metrics(a) == read_metrics(b)
  with open(os.path.join(a, 'probe.json')) as f, open(os.path.join(b, 'probe.json')) as g:
    assert json.load(f) == json.load(g)
  for x, y in zip(jax.tree.leaves(restore_params(a)), jax.tree.leaves(restore_params(b)),
                  strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize('augment, perturbation', [(True, 'sync'), (False, 'sync'),
                                                   (True, 'per_device')])
def test_device_and_host_placement_train_bit_identically(tmp_path, data_dir, caplog, augment,
                                                         perturbation):
  runs = {}
  # digits dominoes' split: ~0.7 MiB, ~0.09 MiB per device over 8; 0.25 MiB makes it sharded.
  cases = {'replicated': ('device', 2048, 'device (split replicated)'),
           'sharded': ('device', 0.25, 'device (split sharded)'),
           'host': ('host', 2048, 'host')}
  for name, (placement, budget, logged) in cases.items():
    config = tiny_digits_config(data_dir, 'sam', steps=12)
    config.data.augment, config.perturbation, config.data.placement = (augment, perturbation,
                                                                       placement)
    config.data.device_memory_budget_mb = budget
    runs[name] = str(tmp_path / name)
    with caplog.at_level('INFO'):
      train.train_and_evaluate(config, runs[name])
    assert f'training batches are made on the {logged}: data.placement is' in caplog.text
    caplog.clear()
  assert_same_run(runs['replicated'], runs['host'])
  assert_same_run(runs['sharded'], runs['host'])


@pytest.mark.slow
def test_resumed_device_placement_run_equals_a_straight_run(tmp_path, data_dir, monkeypatch):
  def config():
    c = tiny_digits_config(data_dir)
    c.data.augment, c.data.placement = True, 'device'
    return c

  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config(), straight)
  resumed = str(tmp_path / 'resumed')
  restore = preempt_at(monkeypatch, 11)  # between two periodic checkpoints (every 8 steps)
  assert train.train_and_evaluate(config(), resumed) == {'preempted_at_step': 11}
  restore()
  train.train_and_evaluate(config(), resumed)
  assert_same_run(straight, resumed)


@pytest.mark.slow
def test_auto_placement_follows_the_budget_and_device_beyond_it_is_refused(tmp_path, data_dir,
                                                                          caplog):
  config = tiny_digits_config(data_dir, 'sgd', steps=2)
  config.data.device_memory_budget_mb = 0  # digits dominoes: ~0.7 MiB, above a 0 MiB budget
  with caplog.at_level('INFO'):
    train.train_and_evaluate(config, str(tmp_path / 'auto'))
  assert 'training batches are made on the host: data.placement is auto but' in caplog.text
  config.data.placement = 'device'
  workdir = tmp_path / 'device'
  with pytest.raises(ValueError, match=r"^config\.data\.placement: 'device' .* MiB .* is 0;"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_a_rerun_may_change_the_placement_but_not_the_data():
  from etils import epath  # pylint: disable=g-import-not-at-top
  from samjax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as folder:
    path = epath.Path(folder)
    config = tiny_digits_config(folder)
    workdir_lib.write_config(path, config)
    config.data.placement, config.data.device_memory_budget_mb = 'host', 1
    workdir_lib.check_rerun(path, config)
    saved = json.loads((path / 'config.json').read_text())
    del saved['data']['placement'], saved['data']['device_memory_budget_mb']
    (path / 'config.json').write_text(json.dumps(saved))  # a run from before the fields existed
    workdir_lib.check_rerun(path, config)
    config.data.augment = True
    with pytest.raises(ValueError, match=r'fields data\.augment differ'):
      workdir_lib.check_rerun(path, config)


@pytest.mark.slow
def test_a_checkpoint_without_a_checksum_record_restores_unverified_and_resumes(
    tmp_path, data_dir, caplog):
  from samjax.train import checkpoint as checkpoint_lib
  def config(steps):
    c = tiny_digits_config(data_dir, 'sgd', steps=steps)
    c.checkpoint_every_steps = 4
    c.optimizer.schedule = 'constant'  # so that a run lengthened from 8 to 16 steps is the same
    return c
  straight = str(tmp_path / 'straight')
  expected = train.train_and_evaluate(config(16), straight)
  workdir = str(tmp_path / 'legacy')
  train.train_and_evaluate(config(8), workdir)
  # As saved before samjax recorded checksums: the finalised step holds the state only.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8', checkpoint_lib.CHECKSUM_ITEM))
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(config(16), workdir)
  unverified = [r.getMessage() for r in caplog.records
                if 'no checksum recorded: restored unverified' in r.getMessage()]
  assert len(unverified) == 1 and 'step 8' in unverified[0], caplog.text
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))
  assert read_metrics(workdir) == read_metrics(straight)
  assert result == expected
  for x, y in zip(jax.tree.leaves(restore_params(straight)), jax.tree.leaves(restore_params(workdir))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_checkpoint_saved_in_the_single_item_layout_of_earlier_versions_restores(tmp_path,
                                                                                  caplog):
  """As samjax saved before the checksum item: a manager without item handlers, StandardSave."""
  from etils import epath
  from samjax.train import checkpoint as checkpoint_lib
  state = {'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3), 'step': jnp.int32(4)}
  directory = tmp_path / 'checkpoints'
  old = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  old.save(4, args=ocp.args.StandardSave(state))
  old.wait_until_finished()
  old.close()
  mgr = checkpoint_lib.manager(epath.Path(tmp_path), keep=2)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  with caplog.at_level('WARNING'):
    restored, step = checkpoint_lib.restore_latest(mgr, abstract)
  assert step == 4
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert 'no checksum recorded: restored unverified' in caplog.text
  assert not (tmp_path / checkpoint_lib.QUARANTINE).exists()


@pytest.mark.slow
def test_checkpoints_follow_the_cadence_and_the_profile_hook_writes_a_trace(tmp_path, data_dir):
  config = tiny_digits_config(data_dir, 'sgd', steps=14)
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 10
  config.profile_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  # Every 4 steps and the last; not the first step (orbax's default policy would save it).
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  assert saved == [4, 8, 12, 14]
  # jax.profiler's trace of steps 10-12, where TensorBoard's profile tab reads it.
  traces = [name for _, _, names in os.walk(os.path.join(workdir, 'tensorboard', 'plugins',
                                                         'profile')) for name in names
            if name.endswith('.xplane.pb')]
  assert len(traces) == 1, traces
  # The trace length may change on resume (a resumable field).
  config.num_train_steps = 16
  config.profile_steps = 0
  train.train_and_evaluate(config, workdir)
  assert [m['step'] for m in read_metrics(workdir)] == [4, 8, 12, 14, 16]

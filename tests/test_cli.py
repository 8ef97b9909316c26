"""The command line: a user mistake is one line on stderr, exit code 2, and no workdir damage."""

import os
import subprocess
import sys

import pytest

from samjax.config import base_train_config, validate_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, env_extra=None, timeout=120):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, '-m', 'samjax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('override, field', [
    ('--config.optimizer.rho=-0.5', 'optimizer.rho'),
    # Each case starts a Python process (~4 s): one in the fast suite, the rest with the slow ones.
    pytest.param('--config.optimizer.name=adamw', 'optimizer.name', marks=pytest.mark.slow),
    pytest.param('--config.batch_size=7', 'batch_size', marks=pytest.mark.slow),
    pytest.param('--config.data.name=imagenet', 'data.name', marks=pytest.mark.slow),
])
def test_bad_train_config_is_one_line_and_exit_2(tmp_path, override, field):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('precious')
  proc = run_main(['--config=configs/digits_dominoes.py', f'--workdir={workdir}', override])
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith('samjax: error:') and field in lines[-1], proc.stderr
  assert 'Traceback' not in proc.stderr
  assert sorted(os.listdir(workdir)) == ['keep.txt']
  assert (workdir / 'keep.txt').read_text() == 'precious'


@pytest.mark.parametrize('args', [
    ['--config=configs/digits_dominoes.py', '--workdir={w}', '--config.no_such_field=1'],
    pytest.param(['--config=configs/no_such_config.py', '--workdir={w}'], marks=pytest.mark.slow),
    pytest.param(['--workdir={w}'], marks=pytest.mark.slow),
    pytest.param(['--config=configs/digits_dominoes.py', '--workdir={w}',
                  '--config.optimizer.rho=abc'], marks=pytest.mark.slow),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args):
  workdir = tmp_path / 'run'
  proc = run_main([a.format(w=workdir) for a in args])
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('samjax: error:'), proc.stderr
  assert not workdir.exists()


def test_validation_names_the_field():
  config = base_train_config()
  validate_train_config(config, num_devices=8)
  cases = [('num_epochs', 0, 'num_train_steps'), ('microbatches', 3, 'batch_size'),
           ('compute_dtype', 'float8', 'compute_dtype'), ('perturbation', 'async', 'perturbation')]
  for field, value, named in cases:
    bad = base_train_config()
    bad[field] = value
    if field == 'num_epochs':
      bad.num_train_steps = 0
    with pytest.raises(ValueError, match=f'config.{named}'):
      validate_train_config(bad, num_devices=8)
  bad = base_train_config()
  bad.model.name = 'vgg'
  with pytest.raises(ValueError, match='config.model.name.*convnet, resnet18'):
    validate_train_config(bad, num_devices=1)


def test_help_lists_the_flags_and_where_the_fields_are():
  proc = run_main(['--help'])
  assert proc.returncode == 0, proc.stderr
  for flag in ('--config', '--workdir', '--verbosity', '--show_config', 'docs/CONFIG.md',
               'exit codes'):
    assert flag in proc.stdout, flag


def test_show_config_prints_every_field(tmp_path):
  proc = run_main(['--config=configs/digits_dominoes.py', '--show_config'])
  assert proc.returncode == 0, proc.stderr
  for field in ('checkpoint_every_steps', 'grad_clip_norm', 'held_out_domain'):
    assert field in proc.stdout


def write(path, text):
  path.write_text(text)
  return str(path)


@pytest.fixture
def bad_config_files(tmp_path):
  return {
      'syntax error': write(tmp_path / 'syntax.py', 'def get_config(:\n'),
      'get_config() raised': write(tmp_path / 'raises.py',
                                 'def get_config():\n  raise RuntimeError("boom")\n'),
      'ModuleNotFoundError': write(tmp_path / 'imports.py', 'import no_such_module_xyz\n'),
      'not a Python file': write(tmp_path / 'config.yaml', 'a: 1\n'),
      'defines no get_config': write(tmp_path / 'empty.py', 'x = 1\n'),
  }


@pytest.mark.parametrize('kind', ['syntax error'] + [
    pytest.param(k, marks=pytest.mark.slow) for k in (
        'get_config() raised', 'ModuleNotFoundError', 'not a Python file', 'defines no get_config')])
def test_broken_config_files_are_one_line_and_exit_2(tmp_path, bad_config_files, kind):
  workdir = tmp_path / 'run'
  proc = run_main([f'--config={bad_config_files[kind]}', f'--workdir={workdir}'])
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('samjax: error:') and kind in lines[0], lines
  assert not workdir.exists()


@pytest.mark.parametrize('override, field', [
    ('--config.seed=1180591620717411303424', 'seed'),  # 2**70
    ('--config.num_train_steps=1000000000000000000000000000000', 'num_train_steps'),  # 10**30
])
@pytest.mark.slow
def test_numbers_out_of_range_are_refused_by_the_schema(tmp_path, override, field):
  workdir = tmp_path / 'run'
  proc = run_main(['--config=configs/digits_dominoes.py', f'--workdir={workdir}', override])
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and field in lines[0], lines
  assert not workdir.exists()


@pytest.mark.slow
def test_a_workdir_that_is_a_file_or_read_only_is_refused_untouched(tmp_path):
  as_file = tmp_path / 'file'
  as_file.write_text('not a directory')
  proc = run_main(['--config=configs/digits_dominoes.py', f'--workdir={as_file}'])
  assert proc.returncode == 2 and 'is a file' in proc.stderr, proc.stderr
  assert as_file.read_text() == 'not a directory'
  read_only = tmp_path / 'ro'
  read_only.mkdir()
  read_only.chmod(0o555)
  if os.geteuid() == 0:  # root ignores permission bits: an immutable folder refuses root too
    if subprocess.run(['chattr', '+i', str(read_only)], capture_output=True).returncode:
      pytest.skip('running as root and chattr +i is unavailable: no read-only folder possible')
  try:
    for workdir in (read_only, read_only / 'run'):
      proc = run_main(['--config=configs/digits_dominoes.py', f'--workdir={workdir}'])
      assert proc.returncode == 2 and 'not writable' in proc.stderr, proc.stderr
      assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
      assert os.listdir(read_only) == []
  finally:
    if os.geteuid() == 0:
      subprocess.run(['chattr', '-i', str(read_only)], check=True)
    read_only.chmod(0o755)


@pytest.mark.slow
def test_a_data_set_that_is_not_prepared_stops_before_any_download(tmp_path):
  workdir, data_dir = tmp_path / 'run', tmp_path / 'empty_tfds'
  data_dir.mkdir()
  proc = run_main(['--config=configs/cifar_mnist.py', f'--workdir={workdir}',
                   f'--config.data.data_dir={data_dir}'])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, lines
  for part in ('cifar_mnist is not prepared', str(data_dir),
               f'python -m samjax.data.prepare --name=cifar_mnist --data_dir={data_dir}',
               'data.download=True'):
    assert part in lines[0], part
  assert not workdir.exists()
  assert os.listdir(data_dir) == []  # nothing downloaded, nothing half-written


def test_a_typo_in_a_field_name_is_plain_text_with_a_suggestion(tmp_path):
  proc = run_main(['--config=configs/digits_dominoes.py', f'--workdir={tmp_path / "run"}',
                   '--config.optimizer.nmae=sgd'])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Did you mean "name"' in lines[0] and '\\' not in lines[0], lines


@pytest.mark.slow
def test_device_placement_of_a_split_above_the_budget_is_one_line_and_exit_2(tmp_path):
  from samjax import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  config = base_train_config()
  config.data.data_dir = data_dir
  data_lib.load_dataset(config.data, seed=0)  # prepared: the run gets as far as the split's size
  workdir = tmp_path / 'run'
  proc = run_main(['--config=configs/digits_dominoes.py', f'--workdir={workdir}',
                   f'--config.data.data_dir={data_dir}', '--config.data.placement=device',
                   '--config.data.device_memory_budget_mb=0'])
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert 'Traceback' not in proc.stderr
  assert len(lines) == 1, proc.stderr
  assert lines[-1].startswith("samjax: error: config.data.placement: 'device'"), proc.stderr
  assert 'MiB' in lines[-1] and 'device_memory_budget_mb is 0' in lines[-1], proc.stderr
  assert not workdir.exists()

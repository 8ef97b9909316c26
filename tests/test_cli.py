"""The command line: a user mistake is one line on stderr, exit code 2, and no workdir damage."""

import os
import subprocess
import sys

import pytest

from samjax.config_validation import base_train_config, validate_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, env_extra=None, timeout=120):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, '-m', 'samjax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('override, field', [
    ('--config.optimizer.rho=-0.5', 'optimizer.rho'),
    ('--config.optimizer.name=adamw', 'optimizer.name'),
    ('--config.batch_size=7', 'batch_size'),
    ('--config.data.name=imagenet', 'data.name'),
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
    ['--config=configs/no_such_config.py', '--workdir={w}'],
    ['--workdir={w}'],
    ['--config=configs/digits_dominoes.py', '--workdir={w}', '--config.optimizer.rho=abc'],
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

"""`python -m samjax.data.prepare`: a data set prepared once into a data_dir, then trained from."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare(*args):
  return subprocess.run([sys.executable, '-m', 'samjax.data.prepare', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepares_digits_dominoes_into_a_data_dir_that_training_reads(tmp_path):
  data_dir = tmp_path / 'tfds'
  done = prepare('--name=digits_dominoes', f'--data_dir={data_dir}')
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'digits_dominoes prepared in' in done.stdout
  assert (data_dir / 'digits_dominoes').is_dir()
  # The TFDS reader (what training uses) finds it prepared where the command put it.
  check = subprocess.run(
      [sys.executable, '-c', 'import sys, tensorflow_datasets as tfds; '
       'import samjax.data.builders; '
       'print(tfds.builder("digits_dominoes", data_dir=sys.argv[1]).is_prepared())',
       str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert check.stdout.strip().endswith('True'), check.stderr[-2000:]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
  missing = prepare(f'--data_dir={tmp_path}')
  assert missing.returncode == 2 and '--name is required' in missing.stderr
  unknown = prepare('--name=imagenet', f'--data_dir={tmp_path}')
  assert unknown.returncode == 2 and 'imagenet' in unknown.stderr
  assert len([l for l in unknown.stderr.splitlines() if l.strip()]) == 1, unknown.stderr
  assert not os.listdir(tmp_path)  # nothing written

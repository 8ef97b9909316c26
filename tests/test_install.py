"""The base install (`pip install samjax`, no extra) is light: no TensorFlow, yet the library,
the README's examples and the toy main job work; real-data training names the extra it needs.

A real virtual environment with a real `pip install` of this checkout (PyPI or pip's cache).
"""

import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, **kwargs):
  return subprocess.run(args, capture_output=True, text=True, timeout=1200, **kwargs)


@pytest.mark.slow
def test_base_install_has_no_tensorflow_and_runs_the_toy_job(tmp_path):
  env_dir = tmp_path / 'venv'
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / 'bin' / 'python')
  install = run([python, '-m', 'pip', 'install', '-q', ROOT])
  assert install.returncode == 0, install.stderr[-3000:]
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'JAX_NUM_CPU_DEVICES')}
  probe = run([python, '-c', 'import importlib.util as u, samjax; '
               'print([m for m in ("tensorflow", "tensorflow_datasets", "sklearn") if u.find_spec(m)])'],
              cwd=tmp_path, env=env)
  assert probe.returncode == 0, probe.stderr[-3000:]
  assert probe.stdout.strip() == '[]', probe.stdout

  # The toy main job (a small grid: this checks the dependencies, not the science).
  toy = run([python, '-m', 'samjax.main', f'--config={ROOT}/configs/toy.py',
             f'--workdir={tmp_path}/toy', '--config.seeds=(0,)', "--config.methods=('sgd','lsam')",
             '--config.rhos=(1.0,)', '--config.noflip_rhos=()', '--config.complexities=(360.0,)',
             '--config.num_steps=200',
             '--config.eval_every=100'], cwd=tmp_path, env=env)
  assert toy.returncode == 0, toy.stderr[-3000:]
  assert (tmp_path / 'toy' / 'report.md').exists() and (tmp_path / 'toy' / 'results.json').exists()

  # The README's library examples.
  readme = run([python, '-c', 'import re, sys; blocks = re.findall(r"```python\\n(.*?)```", '
                'open(sys.argv[1]).read(), flags=re.S); [exec(b, {}) for b in blocks]',
                f'{ROOT}/README.md'], cwd=tmp_path, env=env)
  assert readme.returncode == 0, readme.stderr[-3000:]

  # Real-data training without the extra: one line naming it, exit 2, no workdir.
  real = run([python, '-m', 'samjax.main', f'--config={ROOT}/configs/digits_dominoes.py',
              f'--workdir={tmp_path}/digits'], cwd=tmp_path, env=env)
  assert real.returncode == 2, real.stderr[-3000:]
  lines = [l for l in real.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "'train' extra" in lines[0] and 'samjax[train]' in lines[0], lines
  assert not (tmp_path / 'digits').exists()

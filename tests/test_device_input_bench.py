"""experiments/device_input_bench.py on a tiny case, end to end: its JSON and finite timings.

Nothing here asserts anything about speed: the goal is reported by the script, not tested.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'experiments', 'device_input_bench.py')


def test_device_input_bench_reports_the_ratio(tmp_path):
  out = tmp_path / 'device_input.json'
  env = dict(os.environ)
  for key in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES'):  # the script sets up its own host devices
    env.pop(key, None)
  env.update(JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, SCRIPT, '--case=tiny', '--reps=2', '--iters=1',
                         '--examples=64', f'--out={out}'], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-5000:]
  report = json.loads(out.read_text())
  assert report == json.loads(proc.stdout)
  assert set(report['contenders']) == {'preplaced', 'device', 'device_inputs_preplaced'}
  for contender in report['contenders'].values():
    assert len(contender['samples_s']) == 2
    assert all(math.isfinite(s) and s > 0 for s in contender['samples_s'])
  ratio = report['device_over_preplaced']
  assert math.isfinite(ratio) and ratio > 0
  assert report['goal']['met'] == (ratio <= 1.05)

"""``python -m experiments.benchmark`` at the tiny size, end to end: every section, finite positive timings.

Nothing here asserts anything about speed: the goals are reported by the benchmark, not tested.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # the whole benchmark at its tiny size: minutes
SECTIONS = ('steps', 'scaling', 'toy', 'grids', 'per_example', 'pipeline', 'input')
STEP_CONTENDERS = ('sgd', 'sam', 'optax_sam', 'lsam', 'asam', 'sam_diagnostics')


def _positive_finite(value, where):
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (where, value)


def _timings(samples, where):
  assert samples, where
  for s in samples:
    _positive_finite(s, where)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  env = dict(os.environ)
  # Its own process, as a user runs it: the script sets up its 8 host devices before jax loads.
  for key in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES'):
    env.pop(key, None)
  env.update(JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--size=tiny',
                         f'--out={out}'], env=env, capture_output=True, text=True, timeout=600,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def test_every_section_is_present_and_none_failed(report):
  results, stdout = report
  for section in SECTIONS:
    assert section in results, section
    assert results[section].get('status') != 'error', results[section].get('traceback')
  assert results['meta']['size'] == 'tiny'
  assert '[goals]' in stdout


def test_step_timings_and_ratios(report):
  results, _ = report
  assert results['steps'], 'no model in the steps section'
  for model, r in results['steps'].items():
    assert set(STEP_CONTENDERS) <= set(r['contenders']), model
    for name, c in r['contenders'].items():
      _timings(c['samples_s'], (model, name))
      _positive_finite(c['median_s'], (model, name))
      _positive_finite(c['compile_s'], (model, name))
      assert c['hlo']['convolutions'] > 0, (model, name)
    for name, v in r['ratios'].items():
      _positive_finite(v['ratio_of_medians'], (model, name))
      _positive_finite(v['median_paired_ratio'], (model, name))


def test_scaling_covers_one_to_eight_devices(report):
  scaling = report[0]['scaling']
  assert sorted(int(n) for n in scaling['devices']) == [1, 2, 4, 8]
  for n, c in scaling['devices'].items():
    _timings(c['samples_s'], n)
    _positive_finite(c['images_per_s'], n)


def test_toy_and_per_example_sections(report):
  results, _ = report
  toy = results['toy']
  assert toy['status'] == 'ok', toy.get('reason')
  for name in ('vmapped', 'one_at_a_time'):
    _timings(toy['contenders'][name]['samples_s'], name)
    _positive_finite(toy['contenders'][name]['run_steps_per_s'], name)
  _positive_finite(toy['speedup'], 'toy speedup')
  for key in ('warm_speedup', 'cold_s', 'warm_s'):
    _positive_finite(toy[key], key)
  for name in ('vmapped', 'one_at_a_time'):
    _positive_finite(toy['contenders'][name]['execute_s'], (name, 'execute_s'))
    # cold minus warm medians: finite; its sign is whatever a busy machine's noise makes it
    assert math.isfinite(toy['contenders'][name]['compile_s']), name
  # the main job really ran and filled its cache for the warm run
  assert toy['main_job']['cold_cache_entries'] > 0
  pex = results['per_example']
  for name in ('chunked', 'unchunked'):
    _timings(pex['contenders'][name]['samples_s'], name)
    _positive_finite(pex['contenders'][name]['examples_per_s'], name)
    memory = pex['contenders'][name]['memory']
    assert memory['available'], memory
    _positive_finite(memory['peak_estimate_bytes'], name)
  assert pex['norms_max_abs_diff'] < 1e-3


def test_grids_section(report):
  grids = report[0]['grids']
  assert grids.get('status') == 'ok', grids.get('traceback')
  for key in ('vmapped_points_per_s_cold', 'sequential_points_per_s_cold',
              'vmapped_points_per_s_warm', 'sequential_points_per_s_warm',
              'vmapped_over_sequential_cold', 'vmapped_over_sequential_warm'):
    _positive_finite(grids[key], key)


def test_pipeline_section(report):
  pipeline = report[0]['pipeline']
  assert pipeline.get('status') == 'ok', pipeline.get('reason')  # TensorFlow is a dependency
  assert pipeline['datasets']
  for name, r in pipeline['datasets'].items():
    _positive_finite(r['pipeline_images_per_s'], name)
    _positive_finite(r['step_images_per_s'], name)


def test_input_section_times_the_resident_split_against_a_preplaced_batch(report):
  section = report[0]['input']
  assert set(section['contenders']) == {'preplaced', 'preplaced_f32', 'device',
                                        'device_inputs_preplaced', 'replicated_all',
                                        'sharded_all'}
  _positive_finite(section['ratios']['sharded_over_replicated']['ratio_of_medians'],
                   'sharded_over_replicated')
  for name, c in section['contenders'].items():
    _timings(c['samples_s'], name)
  ratio = section['device_over_preplaced']
  _positive_finite(ratio, 'device_over_preplaced')
  assert ratio == (section['contenders']['device']['median_s']
                   / section['contenders']['preplaced']['median_s'])


def test_goals_are_reported_with_verdicts(report):
  goals = report[0]['goals']
  names = {g['goal'] for g in goals}
  assert {'sam_vs_optax_sam', 'sam_vs_sgd', 'lsam_vs_sgd', 'diagnostics_overhead',
          'toy_vmap_speedup', 'toy_cold_s', 'toy_warm_s', 'per_example_bounded_memory',
          'pipeline_vs_step', 'device_over_preplaced'} <= names
  for g in goals:
    assert g['verdict'] in ('PASS', 'MISS', 'NOT MEASURED'), g
  measured = {g['goal'] for g in goals if g['verdict'] != 'NOT MEASURED'}
  assert {'toy_vmap_speedup', 'toy_cold_s', 'toy_warm_s', 'device_over_preplaced'} <= measured


def test_load_average_is_recorded(report):
  meta = report[0]['meta']
  for key in ('load_average_start', 'load_average_end'):
    assert len(meta[key]) == 3 and all(math.isfinite(x) for x in meta[key]), key

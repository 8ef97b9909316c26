"""The Table 1 and Table 2 scripts run a tiny grid end to end, write their tables, and resume."""

import csv
import json
import os
import subprocess
import sys

import pytest
from scipy import stats

from test_data_builders import write_pacs_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def run_script(script, args, expect=0):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  module = 'experiments.' + script.removesuffix('.py')
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == expect, proc.stderr[-3000:]
  return proc


def probe_files(out):
  return {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
          for dp, _, fs in os.walk(out) for f in fs if f == 'probe.json'}


def check_table(out, name, metric):
  for ext in ('md', 'csv', 'png'):
    assert os.path.getsize(os.path.join(out, f'{name}.{ext}')) > 0
  with open(os.path.join(out, f'{name}.csv')) as f:
    rows = list(csv.DictReader(f))
  assert {r['method'] for r in rows} == {'sgd', 'sam'}
  for row in rows:
    assert 0.0 <= float(row[f'{metric}_mean']) <= 1.0
  return rows


def test_table1_tiny_grid_in_two_shards_writes_tables_and_resumes(tmp_path):
  out = str(tmp_path / 'table1')
  args = [f'--out={out}', '--datasets=digits_dominoes', '--budget=tiny', '--num_seeds=1',
          f'--data_dir={tmp_path / "tfds"}']
  run_script('table1.py', args + ['--shard=0/2'])
  assert len(probe_files(out)) == 1 and not os.path.exists(os.path.join(out, 'table1.md'))
  run_script('table1.py', args + ['--merge'], expect=2)  # a slice is missing
  run_script('table1.py', args + ['--shard=1/2'])  # the last slice merges
  rows = check_table(out, 'table1', 'hard_probe_error')
  assert {float(r['rho']) for r in rows} == {0.0, 0.05}
  with open(os.path.join(out, 'table1.md')) as f:
    text = f.read()
  assert 'digits_dominoes: SAM hard_probe_error' in text and 'SAM < SGD' in text
  finished = probe_files(out)
  assert len(finished) == 2
  run_script('table1.py', args)  # every run is finished: nothing is trained again
  assert probe_files(out) == finished


def test_table2_tiny_grid_on_a_fixture_tree(tmp_path):
  write_pacs_tree(tmp_path / 'manual')
  out = str(tmp_path / 'table2')
  run_script('table2.py', [f'--out={out}', '--datasets=pacs', '--domains=sketch', '--budget=tiny',
                           '--num_seeds=1', f'--manual_dir={tmp_path / "manual"}',
                           f'--data_dir={tmp_path / "tfds"}'])
  check_table(out, 'table2', 'probe_accuracy')
  with open(os.path.join(out, 'table2.md')) as f:
    text = f.read()
  assert '0.893' in text and '0.908' in text  # the paper's PACS sketch numbers beside ours


@pytest.mark.parametrize('script,value', [('table1.py', '3/2'), ('table1.py', 'x'),
                                          ('table1.py', '2/2'), ('table2.py', '3/2')])
def test_bad_shard_is_one_line_and_exit_2(tmp_path, script, value):
  out = tmp_path / 'out'
  proc = run_script(script, [f'--out={out}', f'--shard={value}', '--embedded'] if
                    script == 'table1.py' else [f'--out={out}', f'--shard={value}'], expect=2)
  assert proc.stderr.strip().count('\n') == 0 and '--shard' in proc.stderr
  assert not out.exists()


def recomputed_interval(d):
  """scipy's t interval of the mean of ``d`` (a zero-spread list gives the point)."""
  if len(set(d)) == 1:
    return [d[0], d[0]]
  return list(stats.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d)))


def check_embedded_table(table, budget):
  """The issue-22 contract of ``table1.json``, recomputed from the stored points."""
  points = table['points']
  primary_cfg = table['primary_endpoint']
  records = table['paired']
  assert [r['endpoint'] for r in records].count('primary') == 1
  for r in records:
    assert r['dataset'] == 'digits_textures' and r['lr'] == r['sgd_lr']  # equal learning rates
    assert r['budget'] == {'steps': budget['steps'], 'width': budget['width']}
    assert r['selection'] and 'mde' in r
    assert r['ci95'] == pytest.approx(recomputed_interval(r['per_seed_differences']))
    assert r['mean'] == pytest.approx(sum(r['per_seed_differences']) / r['n_seeds'])
  # The primary endpoint: per seed, SAM's hard-probe error averaged over the rho grid minus SGD's
  # at the same learning rate and seed, recomputed from the points.
  primary = table['primary']
  lr = primary_cfg['learning_rate']
  assert primary['lr'] == primary['sgd_lr'] == lr and primary['metric'] == 'hard_probe_error'
  rhos = sorted({p['rho'] for p in points if p['method'] == 'sam'})
  for seed, d in zip(primary['seeds'], primary['per_seed_differences']):
    sam = [p['hard_probe_error'] for p in points if (p['method'], p['learning_rate'],
                                                      p['seed']) == ('sam', lr, seed)]
    (sgd,) = [p['hard_probe_error'] for p in points if (p['method'], p['learning_rate'],
                                                         p['seed']) == ('sgd', lr, seed)]
    assert len(sam) == len(rhos) and d == pytest.approx(sum(sam) / len(sam) - sgd)
  # Baselines present; counts_as_test follows from them.
  baselines = table['baselines']
  assert set(baselines) == {'raw_pixels', 'untrained_features', 'hand_made_statistics',
                            'trained_on_hard_alone', 'sgd'}
  assert all(0.0 <= v <= 1.0 for v in baselines.values())
  learned = table['room']['sgd_minus_untrained']
  sgd_points = {p['seed']: p for p in points if p['method'] == 'sgd' and p['learning_rate'] == lr}
  assert learned['per_seed_differences'] == pytest.approx(
      [sgd_points[s]['hard_probe_error'] - sgd_points[s]['untrained_hard_probe_error']
       for s in learned['seeds']])
  assert learned['ci95'] == pytest.approx(recomputed_interval(learned['per_seed_differences']))
  expected = (learned['ci95'][1] < 0
              and baselines['hand_made_statistics'] > table['room']['hand_made_solved_below'])
  assert table['counts_as_test'] is expected
  if not expected:
    assert primary['verdict'].startswith('no verdict')


def test_embedded_study_tiny_in_two_shards_pairs_seeds_at_equal_lr(tmp_path):
  out = str(tmp_path / 'embedded')
  args = ['--embedded', f'--out={out}', '--budget=tiny', f'--data_dir={tmp_path / "tfds"}']
  run_script('table1.py', args + ['--shard=1/2', '--vmap'])
  assert not os.path.exists(os.path.join(out, 'table1.json'))
  run_script('table1.py', args + ['--merge'], expect=2)  # a slice is missing
  run_script('table1.py', args + ['--shard=0/2'])
  with open(os.path.join(out, 'table1.json')) as f:
    table = json.load(f)
  assert table['budget']['name'] == 'tiny' and table['budget']['num_seeds'] == 3
  check_embedded_table(table, table['budget'])
  assert {(r['method'], r['metric']) for r in table['paired']} == {
      ('sam', k) for k in ('hard_probe_error', 'easy_probe_error', 'test_error')}
  for name in ('table1_embedded.md', 'table1_embedded.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, 'table1_embedded.md')) as f:
    text = f.read()
  assert 'Primary endpoint' in text and 'counts_as_test' in text
  # --merge again with another budget is one line, not a traceback.
  proc = run_script('table1.py', ['--embedded', f'--out={out}', '--budget=cpu', '--merge',
                                  '--shard=0/2'], expect=2)
  assert 'Traceback' not in proc.stderr and 'budget' in proc.stderr.strip().splitlines()[-1]


def test_embedded_study_paper_budget_end_to_end_at_a_tiny_size(tmp_path):
  """The paper's net (width 32) and recipe, shrunk to 2 steps, 3 seeds, one lr and one rho."""
  from experiments import embedded  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'paper')
  summary = embedded.run_study(out, budget='paper', num_seeds=3, data_dir=str(tmp_path / 'tfds'),
                               log=lambda *_: None, num_steps=2, learning_rates=[0.05],
                               rhos=[0.05], max_train_examples=300)
  assert summary['budget'] == {'name': 'paper', 'steps': 2, 'width': 32, 'batch_size': 100,
                               'num_seeds': 3}
  with open(os.path.join(out, 'table1.json')) as f:
    table = json.load(f)
  check_embedded_table(table, table['budget'])
  # The paper budget trains LSAM too: its rows are secondary, paired at equal lr.
  assert {r['method'] for r in table['paired']} == {'sam', 'lsam'}


def test_cpu_budget_needs_the_embedded_study(tmp_path):
  proc = run_script('table1.py', [f'--out={tmp_path}', '--budget=cpu'], expect=2)
  assert proc.stderr.strip().count('\n') == 0 and '--embedded' in proc.stderr

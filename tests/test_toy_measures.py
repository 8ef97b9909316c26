"""The toy's new per-run measures against independent computations (issue 15).

A tiny sweep (SGD, LSAM and LSAM-noflip at a radius that flips v~_easy, and one
intervention) is trained once; its records are recomputed by hand from the
logged heads and snapshots.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from samjax import config as config_lib
from samjax.toy import claims
from samjax.toy import metrics as toy_metrics
from samjax.toy import plots
from samjax.toy import report
from samjax.toy import study
from test_toy_study import get_config


def expit(x):
  """The logistic function in float64, written out (an independent reference)."""
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def measures_config():
  config = get_config()
  config.methods = ('sgd', 'lsam', 'lsam_noflip', 'iw_only')
  config.seeds = (0, 1, 2)
  config.rhos = (0.5, 3.0)  # 3.0 > v_easy = 1: the phantom flips v~_easy early on
  config.complexities = (360.0,)
  config.fixed_ratios = (2.0,)
  config.intervention_complexities = (360.0,)
  config.num_train = 20
  config.num_steps = 12
  config.eval_every = 4
  config.hidden = 4
  config.num_probe = 32
  config.compilation_cache_dir = ''
  config.heads = ('constant',)
  config.rho_unit = 'absolute'
  config.noflip_rhos = ()
  return config


@pytest.fixture(scope='module')
def sweep():
  config = measures_config()
  outputs = study.run_sweep(config, progress=False)
  return config, outputs, study.summarize(config, outputs)


def test_flip_fraction_and_normalised_scales_by_hand(sweep):
  _, outputs, records = sweep
  flipped = 0
  for i, record in enumerate(records):
    v = np.stack([outputs.stats.real_easy[i], outputs.stats.real_hard[i]], -1).astype(np.float64)
    w = np.stack([outputs.stats.phantom_easy[i], outputs.stats.phantom_hard[i]], -1)
    w = w.astype(np.float64)
    flips = [1.0 if (w_t[0] > 0) != (v_t[0] > 0) and w_t[0] != 0 else 0.0
             for v_t, w_t in zip(v, w)]
    assert record['easy_flip_fraction'] == pytest.approx(sum(flips) / len(flips))
    flipped += record['easy_flip_fraction'] > 0
    if record['method'] == 'lsam_noflip':
      assert record['easy_flip_fraction'] == 0 and record['hard_flip_fraction'] == 0
    with np.errstate(divide='ignore', invalid='ignore'):  # a clipped phantom can be 0
      scale = [(w_t[k] / np.linalg.norm(w_t)) / (v_t[k] / np.linalg.norm(v_t))
               for v_t, w_t in zip(v, w) for k in (0, 1)]
    if np.all(np.isfinite(scale)):
      assert record['lr_scale_easy_normalised'] == pytest.approx(np.mean(scale[0::2]), rel=1e-6)
      assert record['lr_scale_hard_normalised'] == pytest.approx(np.mean(scale[1::2]), rel=1e-6)
    if record['method'] == 'sgd':
      assert record['lr_scale_easy_normalised'] == pytest.approx(1.0)
  assert flipped > 0, 'the sweep must contain a flip for the test to mean anything'


def test_noflip_clips_where_lsam_flips(sweep):
  _, outputs, records = sweep
  lsam = outputs.select(method='lsam', rho=3.0, seed=0)[0]
  noflip = outputs.select(method='lsam_noflip', rho=3.0, seed=0)[0]
  # the first step: same v, so the noflip phantom is LSAM's clipped at 0
  first = lambda i: np.array([outputs.stats.phantom_easy[i, 0], outputs.stats.phantom_hard[i, 0]])
  v = np.array([outputs.stats.real_easy[lsam, 0], outputs.stats.real_hard[lsam, 0]])
  assert (np.sign(first(lsam)) != np.sign(v)).any()
  np.testing.assert_allclose(first(noflip), np.where(np.sign(first(lsam)) == np.sign(v),
                                                     first(lsam), 0.0), rtol=1e-5, atol=1e-7)
  # at a radius that never flips, noflip is LSAM exactly
  a = records[outputs.select(method='lsam', rho=0.5, seed=1)[0]]
  b = records[outputs.select(method='lsam_noflip', rho=0.5, seed=1)[0]]
  if a['easy_flip_fraction'] == 0 and a['hard_flip_fraction'] == 0:
    assert a['hard_probe_error_curve'] == b['hard_probe_error_curve']


def test_learning_phase_ratio_by_hand(sweep):
  _, outputs, records = sweep
  for i, record in enumerate(records):
    end = record['learning_window_end']
    assert end in set(outputs.eval_steps.tolist())
    # the phantom head along the real head's orientation: v~_k sgn(v_k)
    sign = lambda v: np.where(v >= 0, 1.0, -1.0)
    hard = outputs.stats.phantom_hard[i, :end] * sign(outputs.stats.real_hard[i, :end])
    easy = outputs.stats.phantom_easy[i, :end] * sign(outputs.stats.real_easy[i, :end])
    with np.errstate(divide='ignore', invalid='ignore'):
      ratio = hard.astype(np.float64).mean() / easy.astype(np.float64).mean()
    if record['phantom_ratio_learning'] is not None:
      assert record['phantom_ratio_learning'] == pytest.approx(ratio, rel=1e-5)


def test_learning_window_end():
  steps = np.array([100, 200, 300, 400])
  # drop from chance 0.5 to 0.1; 90% of it reached at 0.14
  assert toy_metrics.learning_window_end([0.3, 0.13, 0.11, 0.1], steps) == 200
  assert toy_metrics.learning_window_end([0.45, 0.3, 0.2, 0.1], steps) == 400
  assert toy_metrics.learning_window_end([0.5, 0.5, 0.5, 0.5], steps) == 100


def test_linear_regression_against_lstsq_and_the_closed_form():
  rng = np.random.default_rng(0)
  easy, hard = rng.normal(size=500), rng.normal(size=500) + 0.5 * rng.normal(size=500)
  target = 0.3 + 1.5 * easy - 0.7 * hard + 0.1 * rng.normal(size=500)
  coefficients, errors = toy_metrics.linear_regression([easy, hard], target)
  design = np.column_stack([np.ones(500), easy, hard])
  np.testing.assert_allclose(coefficients, np.linalg.lstsq(design, target, rcond=None)[0],
                             rtol=1e-10)
  np.testing.assert_allclose(coefficients, [0.3, 1.5, -0.7], atol=0.03)
  # one regressor: SE(slope) = s / sqrt(sum (x - mean x)^2)
  (a, b), (_, se) = toy_metrics.linear_regression([easy], target)
  residual = target - a - b * easy
  s = np.sqrt(residual @ residual / (500 - 2))
  assert se == pytest.approx(s / np.sqrt(np.sum((easy - easy.mean())**2)), rel=1e-8)


def test_log_weight_ratio_is_the_log_of_the_weights():
  m, m_phantom = np.array([-3.0, 0.0, 2.0, 40.0]), np.array([-1.0, 0.5, 1.0, 30.0])
  want = np.log(expit(-m_phantom)) - np.log(expit(-m))
  np.testing.assert_allclose(toy_metrics.log_weight_ratio(m, m_phantom), want, rtol=1e-9)
  # where the weights underflow in float32 the ratio is still exact
  assert toy_metrics.log_weight_ratio([200.0], [150.0])[0] == pytest.approx(50.0)


def test_fig5_cell_is_lstsq_on_the_snapshots(sweep):
  _, outputs, _ = sweep
  indices = outputs.select(method='lsam', rho=3.0)
  fit = claims.fig5_cell(outputs, indices, 'late')
  late = slice(len(outputs.eval_steps) // 2, None)
  for n, i in enumerate(indices):
    s = outputs.snapshots
    pick = lambda field: getattr(s, field)[i, late].ravel().astype(np.float64)
    target = (np.log(expit(-pick('margin_phantom')))
              - np.log(expit(-pick('margin_real'))))
    design = np.column_stack([np.ones(target.size), pick('contribution_easy'),
                              pick('contribution_hard')])
    want = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose([fit['easy'][n], fit['hard'][n]], want[1:], rtol=1e-5, atol=1e-8)
    # the contrast is the coefficient of s_e - s_h in the regression on (s_e + s_h, s_e - s_h)
    rotated = np.column_stack([np.ones(target.size),
                               pick('contribution_easy') + pick('contribution_hard'),
                               pick('contribution_easy') - pick('contribution_hard')])
    assert fit['contrast'][n] == pytest.approx(
        np.linalg.lstsq(rotated, target, rcond=None)[0][2], rel=1e-5, abs=1e-8)
    heads = s.phantom_head[i, late].astype(np.float64) / s.real_head[i, late]
    assert fit['identity_hard'][n] == pytest.approx(np.mean(1 - heads[:, 1]), rel=1e-6)


def test_snapshot_margins_are_the_weights(sweep):
  _, outputs, _ = sweep
  s = outputs.snapshots
  np.testing.assert_allclose(s.weight_real, expit(-s.margin_real.astype(np.float64)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(s.weight_phantom, expit(-s.margin_phantom.astype(np.float64)),
                             rtol=1e-4, atol=1e-7)


def test_report_json_claims_recompute_from_their_seeds(sweep, tmp_path):
  """Every paired claim's estimate and interval recompute from per_seed (scipy's t); no
  'held' interval contains 0; report.md lists every claim of report.json."""
  config, outputs, records = sweep
  path = report.write_report(config, outputs, records, [], str(tmp_path), train_time_s=0,
                             wall_time_s=0)
  with open(tmp_path / 'report.json') as f:
    content = json.load(f)
  keys = {'id', 'figure', 'regime', 'head', 'verdict', 'n_seeds', 'estimate', 'ci95',
          'per_seed', 'test'}
  text = open(path).read()
  assert content['claims']
  for c in content['claims']:
    assert keys <= set(c) and c['verdict'] in claims.VERDICTS
    assert c['regime'] in ('flip_free', 'flip', 'all') and c['head'] in ('constant', 'random')
    assert f'| {c["id"]} |' in text
    if c['per_seed'] is not None:
      x = np.asarray(c['per_seed'])
      half = scipy_stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
      assert c['n_seeds'] == x.size and c['estimate'] == pytest.approx(x.mean())
      np.testing.assert_allclose(c['ci95'], [x.mean() - half, x.mean() + half], rtol=1e-9)
    if c['verdict'] == 'held' and c['ci95'] is not None and not c['id'].startswith('eq10-'):
      assert not c['ci95'][0] <= 0 <= c['ci95'][1]  # (Eq. 10's "held" is a match, within +-0.02)
  figures = {c['figure'] for c in content['claims']}
  assert {'2A', '2B', '3', '4', '5'} <= figures
  assert {r['regime'] for r in content['regimes']} <= {'flip_free', 'flip'}


def test_fitting_values_and_unflipped_radii():
  records = [dict(rho=1.0, train_error=0.0, easy_flip_fraction=0.0),
             dict(rho=1.0, train_error=0.0, easy_flip_fraction=0.1),
             dict(rho=2.0, train_error=0.0, easy_flip_fraction=0.0),
             dict(rho=2.0, train_error=0.2, easy_flip_fraction=0.0)]
  assert plots.fitting_values(records, 'rho') == [1.0]
  assert plots.unflipped_radii(records) == [2.0]


def test_sensitivity_variants_move_one_knob_at_a_time():
  config = get_config('sensitivity')
  config_lib.validate_config(config)
  names = [name for name, _ in study.variants(config)]
  assert names[0] == 'default' and len(names) == len(set(names))
  default = dict(study.variants(config))['default']
  for name, knobs in study.variants(config)[1:]:
    changed = [k for k in ('learning_rate', 'head_init', 'head_random') if knobs[k] != default[k]]
    changed += [k for k in knobs['data']._fields
                if getattr(knobs['data'], k) != getattr(default['data'], k)]
    assert len(changed) == 1 and name.startswith(changed[0])
  rows = study.build_rows(config)
  assert {r.program for r in rows} == {'lsam'}  # the whole map is one compiled program


@pytest.mark.parametrize('knob,value,message', [
    ('bogus', (1.0,), r'^config.sensitivity.bogus: unknown knob'),
    ('learning_rate', (0.0,), r'^config.sensitivity.learning_rate: must be in \(0.0, \), got 0.0'),
    ('easy_margin', (1.0,), r'^config.sensitivity.easy_margin: must be in \[0.0, 1.0\), got 1.0'),
])
def test_bad_sensitivity_knob(knob, value, message):
  config = get_config('sensitivity')
  config.sensitivity[knob] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


def test_compilation_cache_is_written_and_read(tmp_path):
  """A jitted function compiled under enable_compilation_cache leaves an entry that a
  second process loads (JAX logs the hit)."""
  script = (
      'import jax, jax.numpy as jnp\n'
      'from samjax.toy import study\n'
      f'study.enable_compilation_cache({str(tmp_path)!r})\n'
      'print(float(jax.jit(lambda x: jnp.sin(x) * 2)(1.0)))\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR='')
  env.pop('JAX_COMPILATION_CACHE_DIR')
  run = lambda: subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                               text=True, check=True)
  run()
  entries = list(tmp_path.iterdir())
  assert entries, 'nothing was written to the cache'
  second = subprocess.run([sys.executable, '-c', script.replace(
      'import jax,', 'import logging; logging.basicConfig(level=logging.DEBUG)\nimport jax,')],
                          env=env, capture_output=True, text=True, check=True)
  assert 'cache hit' in second.stderr.lower() or 'persistent compilation cache hit' in \
      second.stderr.lower()
  assert sorted(tmp_path.iterdir()) == sorted(entries)  # nothing new compiled


def test_compilation_cache_off():
  before = study.jax.config.jax_compilation_cache_dir
  assert study.enable_compilation_cache('') == (before or None)


def test_fig5_binned_medians_refuse_nan_under_jit_as_eagerly():
  """The figure bins under one jit; a NaN weight must still stop it, not become a NaN cell."""
  from samjax.toy import plots  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x, y, w = rng.random(50), rng.random(50), rng.random(50)
  unit = np.array([0.0, 1.0])
  binned = plots._binned_medians_2d(x, y, w, unit, unit, num_bins=4)
  assert int(np.sum(binned.counts)) == 50
  w[3] = np.nan
  with pytest.raises(ValueError, match='weights contains NaN'):
    plots._binned_medians_2d(x, y, w, unit, unit, num_bins=4)

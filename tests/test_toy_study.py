"""The toy study driver: config validation, the run list, and a tiny end-to-end run."""

import json
import os
import pathlib

import numpy as np
import pytest

from samjax import config as config_lib
from samjax.config import load_config_file
from samjax.toy import study
from samjax.toy import train as toy_train

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'toy.py'


def get_config(arg=None):
  return load_config_file(str(CONFIG_PATH), arg)


def tiny_config():
  """SGD, LSAM, LSAM-noflip and one intervention (enough for every figure; the other
  methods' steps are tested in test_toy_train), one noisy setting of each kind and
  two batch sizes, a few steps: three training programs in all."""
  config = get_config()
  config.methods = ('sgd', 'lsam', 'lsam_noflip', 'iw_lr')
  config.seeds = (0, 1)
  config.rhos = (1.0, 2.0)
  config.complexities = (180.0, 540.0)
  config.fixed_ratios = (1.0, 8.0)
  config.intervention_complexities = (540.0,)
  config.num_train = 20
  config.batch_sizes = (5, 10)
  config.num_steps = 6
  config.eval_every = 3
  config.hidden = 4
  config.num_probe = 32
  config.noise.label_noise = (0.1,)
  config.noise.gaussian_noise = (0.5,)
  config.noise.dropout = (0.2,)
  config.noise.hard_only = (True,)
  config.compilation_cache_dir = ''  # tests leave the user's cache alone
  config.heads = ()  # one head (head_random), absolute radii: the other studies' layout
  config.rho_unit = 'absolute'
  config.noflip_rhos = ()
  return config


@pytest.mark.parametrize('arg', [None, 'main', 'noise', 'batch_size', 'sensitivity'])
def test_configs_are_valid(arg):
  config = get_config(arg)
  assert config.job == 'toy'
  config_lib.validate_config(config)
  rows = study.build_rows(config)
  assert rows and len(set(rows)) == len(rows)


def test_default_config_covers_the_issue():
  """Issue 21: >= 10 seeds, both heads, radii in units of ||v0|| spanning >= 4 flip-free
  radii (below 1/sqrt(2): no step-0 flip for the constant head) and the flip range."""
  config = get_config()
  assert {'sgd', 'lsam', 'lsam_noflip', 'iw_only', 'lr_only', 'iw_lr'} <= set(config.methods)
  assert config.intervention_norm == 'initial'  # Appendix C fixes v^
  assert config.figure_complexity is None  # Fig. 1 where LSAM gains most
  assert len(config.seeds) >= 10 and tuple(config.heads) == ('constant', 'random')
  assert config.rho_unit == 'initial_head'
  assert sum(r < 1 / np.sqrt(2) for r in config.rhos) >= 4 and max(config.rhos) >= 1.4
  assert set(config.noflip_rhos) <= set(config.rhos)
  assert config.batch_size == 5 and config.num_train == 300


def test_unknown_config_argument():
  with pytest.raises(ValueError, match='unknown argument'):
    get_config('bogus')


def _with(config, field, value):
  """``config`` with ``field`` set to ``value``, whatever its type (as a config file may)."""
  *groups, key = field.split('.')
  node = config
  for group in groups:
    node = node[group]
  with node.ignore_type():
    node[key] = value
  return config


@pytest.mark.parametrize('field,value,message', [
    ('methods', ('sgd', 'adam'), r"^config.methods: 'adam' is not one of sgd, "),
    ('methods', (), r'^config.methods: the sweep is empty'),
    ('methods', ('sgd', 'sgd'), r"^config.methods: duplicate values in \('sgd', 'sgd'\)"),
    ('rhos', (0.5, -0.1), r'^config.rhos: must be in \[0.0, \), got -0.1'),
    ('sam_rhos', (-1.0,), r'^config.sam_rhos: must be in \[0.0, \), got -1.0'),
    ('batch_size', 301, r'^config.batch_size: 301 is larger than the training set'),
    ('batch_sizes', (5, 500), r'^config.batch_sizes: 500 is larger than the training set'),
    ('seeds', (), r'^config.seeds: the sweep is empty'),
    ('complexities', (), r'^config.complexities: the sweep is empty'),
    ('fixed_ratios', (), r'^config.fixed_ratios: the sweep is empty'),
    ('fixed_ratios', (0.0,), r'^config.fixed_ratios: must be in \(0.0, \), got 0.0'),
    ('eval_every', 7, r'^config.eval_every: 7 does not divide num_steps'),
    ('learning_rate', 0.0, r'^config.learning_rate: must be in \(0.0, \), got 0.0'),
    ('noise.dropout', (1.0,), r'^config.noise.dropout: must be in \[0.0, 1.0\), got 1.0'),
    ('data.easy_margin', 1.5, r'^config.data.easy_margin: must be in \[0.0, 1.0\), got 1.5'),
    ('intervention_norm', 'fixed', r"^config.intervention_norm: 'fixed' is not one of initial, "),
    ('sensitivity_steps', (250,), r'^config.sensitivity_steps: 250 is not a multiple'),
    ('heads', ('constant', 'kaiming'), r"^config.heads: 'kaiming' is not one of constant, "),
    ('rho_unit', 'meters', r"^config.rho_unit: 'meters' is not one of absolute, "),
    ('noflip_rhos', (7.0,), r'^config.noflip_rhos: 7.0 is not one of rhos'),
    ('num_steps', -1, r'^config.num_steps: must be in \[1, 2\^31-1\], got -1'),
    ('hidden', 2.5, r'^config.hidden: must be an integer, got 2.5'),
    ('head_random', 1, r'^config.head_random: must be true or false, got 1'),
    ('noise.hard_only', (), r'^config.noise.hard_only: the sweep is empty'),
])
def test_bad_config_raises_before_compiling(monkeypatch, tmp_path, field, value, message):
  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before validating')

  monkeypatch.setattr(toy_train, "compiled_chunk", no_compiling)
  monkeypatch.setattr(toy_train, "compiled_params_and_data", no_compiling)
  config = _with(get_config(), field, value)
  with pytest.raises(ValueError, match=message) as error:
    study.run(config, str(tmp_path))
  assert '\n' not in str(error.value)
  assert not list(tmp_path.iterdir())


def test_missing_field_is_named():
  config = get_config()
  del config['rhos']
  with pytest.raises(ValueError, match=r'^config.rhos: missing; start the config from '
                     r'samjax.config.base_toy_config\(\)'):
    config_lib.validate_config(config)


def test_unknown_field_is_refused():
  config = get_config()
  config.noise.droput = (0.1,)
  with pytest.raises(ValueError, match=r'^config.noise.droput: unknown field; allowed fields '
                     r'here: dropout, gaussian_noise, hard_only, label_noise\.$'):
    config_lib.validate_config(config)


def test_toy_config_starts_from_the_schema():
  """configs/toy.py's main study is the schema's defaults, and every study sets only fields of
  the schema (what validate_config checks: no field added beside it)."""
  config = get_config()
  base = config_lib.base_toy_config()
  assert config.to_dict() == base.to_dict()
  for arg in ('noise', 'batch_size', 'sensitivity'):
    assert set(get_config(arg).keys()) == set(base.keys())


def test_rows_are_the_product_of_the_sweep():
  config = tiny_config()
  rows = study.build_rows(config)
  seeds, noise, complexities = len(config.seeds), 4, 2  # noise: clean + 3 kinds
  first_batch = (1 + 2 * len(config.rhos)) * complexities + len(config.fixed_ratios) * 1
  other_batches = (1 + len(config.rhos)) * complexities  # SGD and LSAM only
  assert len(rows) == (first_batch + other_batches) * seeds * noise
  assert {r.method for r in rows} == set(config.methods)
  assert {r.batch_size for r in rows if r.method == 'iw_lr'} == {5}
  assert all(r.rho is None for r in rows if r.method in study.INTERVENTIONS)
  assert all(r.fixed_ratio is None for r in rows if r.method not in study.INTERVENTIONS)


@pytest.mark.slow
def test_run_writes_every_output(tmp_path):
  config = tiny_config()
  out = study.run(config, str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  assert results['config']['job'] == 'toy'
  assert results['config']['rhos'] == [1.0, 2.0]
  runs = results['runs']
  assert len(runs) == out['num_runs'] == len(study.build_rows(config))
  keys = {'method', 'rho', 'fixed_ratio', 'complexity', 'seed', 'steps', 'hard_probe_error',
          'easy_probe_error', 'train_error', 'phantom_ratio', 'real_ratio', 'lr_scale_easy',
          'lr_scale_hard', 'gini_real', 'gini_phantom', 'lr_scale_easy_normalised',
          'lr_scale_hard_normalised', 'easy_flip_fraction', 'phantom_ratio_median',
          'real_ratio_median', 'phantom_ratio_learning', 'learning_window_end'}
  for run in runs:
    assert keys <= set(run)
    assert run['steps'] == 6
    assert 0.0 <= run['hard_probe_error'] <= 1.0 and 0.0 <= run['gini_real'] <= 1.0
    assert len(run['hard_probe_error_curve']) == 2
  assert {r['method'] for r in runs} == set(config.methods)
  sgd = [r for r in runs if r['method'] == 'sgd']
  assert all(r['phantom_ratio'] == r['real_ratio'] for r in sgd)
  assert all(r['fixed_ratio'] is not None for r in runs if r['method'] == 'iw_lr')
  expected = {'fig1_feature_contours.png', 'fig2a_probe_error_vs_rho.png',
              'fig2b_ratio_vs_rho.png', 'fig3_lorenz.png', 'fig4_lr_scale.png',
              'fig_importance_spread.png',
              'fig5_importance_by_contribution.png', 'fig5_importance_2d.png',
              'figG_lorenz_over_time.png', 'figG_importance_over_time.png',
              'fig6_interventions.png', 'figH_noise.png', 'figH_batch_size.png',
              'fig_learning_curves.png'}
  assert {os.path.basename(p) for p in out['figures']} == expected
  for name in expected:
    assert (tmp_path / name).stat().st_size > 10_000
  report = (tmp_path / 'report.md').read_text()
  for name in expected:
    assert f']({name})' in report
  for verdict_row in ('fig2a-gain', 'fig3-gini', 'fig6-iw_lr', 'App. H.1', 'App. H.2'):
    assert verdict_row in report
  assert json.loads((tmp_path / 'report.json').read_text())['claims']


def test_balanced_parts_split_large_groups_into_equal_padded_parts():
  groups = {('lsam', 5): list(range(0, 660)), ('intervention', 5): list(range(660, 840))}
  parts = study._balanced_parts(groups, cores=2)
  assert [(key[0], len(indices), size) for key, indices, size in parts] == [
      ('lsam', 330, 330), ('lsam', 330, 330), ('intervention', 180, 180)]
  assert sorted(i for _, indices, _ in parts for i in indices) == list(range(840))
  (part,) = study._balanced_parts({('lsam', 5): [0, 1, 2]}, cores=1)
  assert part == (('lsam', 5), [0, 1, 2], 3)
  odd = study._balanced_parts({('lsam', 5): list(range(7))}, cores=2)
  assert [(len(indices), size) for _, indices, size in odd] == [(4, 4), (3, 4)]

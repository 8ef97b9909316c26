"""``python -m experiments.diagnostics_figures`` on a tiny digits-dominoes run: outputs, numbers, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samjax
from experiments import diagnostics_figures as figures
from experiments import load_config
from samjax import diagnostics, train

NUM_EXAMPLES = 96
RHO = 0.1


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = load_config('configs/digits_dominoes.py', 'sam')
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.num_train_steps = 20
  config.batch_size = 16
  config.eval_batch_size = 64
  config.progress_bar = False
  config.checkpoint_every_steps = 0
  config.log_every_steps = 10
  path = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope='module')
def outputs(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('figures'))
  paths = figures.run(workdir, out, num_examples=NUM_EXAMPLES, rho=RHO, num_bins=4)
  with open(paths['json']) as f:
    return paths, json.load(f)


@pytest.mark.slow
def test_writes_pngs_and_json(outputs):
  paths, result = outputs
  for key in ('fig3', 'fig5'):
    with open(paths[key], 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert result['step'] == 20 and result['rho'] == RHO and result['perturbation'] == 'sam'
  assert result['num_examples'] == NUM_EXAMPLES == len(set(result['example_indices']))
  assert not [n for n in os.listdir(os.path.dirname(paths['json'])) if n.startswith('.')]


@pytest.mark.slow
def test_lorenz_gini_and_bins_are_consistent(outputs):
  _, result = outputs
  lorenz = result['lorenz']
  for key in ('x', 'real', 'phantom'):
    assert len(lorenz[key]) == NUM_EXAMPLES + 1
    assert lorenz[key][0] == pytest.approx(0.0, abs=1e-7)
    assert lorenz[key][-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(lorenz[key]) >= -1e-7)
  for key in ('real', 'phantom'):
    assert 0.0 <= result['gini'][key] <= 1.0
  assert result['perturbation_norm'] == pytest.approx(RHO, rel=1e-3)

  bins = result['bins']
  counts = np.asarray(bins['counts'])
  assert counts.shape == (4, 4) and counts.sum() == NUM_EXAMPLES
  assert len(bins['x_edges']) == len(bins['y_edges']) == 5
  for key in ('median_real', 'median_phantom'):
    medians = np.asarray(bins[key], dtype=np.float64)  # null (empty cell) -> nan
    assert np.array_equal(np.isnan(medians), counts == 0)
    assert np.all((medians[counts > 0] >= 0) & (medians[counts > 0] <= 1))
  # The cell medians are medians of the per-example numbers in the JSON.
  examples = result['examples']
  easy, hard = np.asarray(examples['easy_contribution']), np.asarray(examples['hard_contribution'])
  ix = np.clip(np.searchsorted(bins['x_edges'], easy, side='right') - 1, 0, 3)
  iy = np.clip(np.searchsorted(bins['y_edges'], hard, side='right') - 1, 0, 3)
  i, j = np.unravel_index(np.argmax(counts), counts.shape)
  in_cell = (ix == i) & (iy == j)
  assert in_cell.sum() == counts[i, j]
  assert bins['median_phantom'][i][j] == pytest.approx(
      float(np.median(np.asarray(examples['weight_phantom'])[in_cell])), rel=1e-5)


@pytest.mark.slow
def test_phantom_gini_matches_an_independent_recomputation(workdir, outputs):
  _, result = outputs
  _, dataset, model, variables, step = train.load_run(workdir)
  assert step == result['step']
  index = np.asarray(result['example_indices'])
  images = jnp.asarray(dataset.normalize(dataset.train.images[index]), jnp.float32)
  labels = jnp.asarray(dataset.train.labels[index], jnp.int32)
  stats = {k: v for k, v in variables.items() if k != 'params'}

  def logits_at(params):
    return model.apply({'params': params, **stats}, images, train=False)

  def loss(params):
    return optax.softmax_cross_entropy_with_integer_labels(logits_at(params), labels).mean()

  def weights(params):  # lambda_i = 1 - p_{y_i}
    probs = jax.nn.softmax(logits_at(params).astype(jnp.float32), axis=-1)
    return 1.0 - jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]

  @jax.jit
  def real_and_phantom_weights(params):
    phantom, _ = samjax.phantom_params(params, jax.grad(loss)(params), RHO)
    return weights(params), weights(phantom)

  real, phantom = real_and_phantom_weights(variables['params'])
  assert result['gini']['phantom'] == pytest.approx(float(diagnostics.gini(phantom)), abs=2e-5)
  assert result['gini']['real'] == pytest.approx(float(diagnostics.gini(real)), abs=2e-5)
  np.testing.assert_allclose(result['examples']['weight_phantom'], phantom, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(result['examples']['weight_real'], real, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with open(os.path.join(workdir, 'config.json')) as f:
    (empty / 'config.json').write_text(f.read())  # a run that never checkpointed
  for args in ([f'--workdir={tmp_path / "missing"}'], [f'--workdir={empty}'], ['--num_bins=4'],
               [f'--workdir={workdir}', '--rho=-1'], [f'--workdir={workdir}', '--step=7']):
    with pytest.raises(SystemExit) as exit_info:
      figures.cli(['diagnostics_figures', *args])
    assert exit_info.value.code == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith('diagnostics_figures: error:') and '\n' not in err, (args, err)


def test_helpers():
  assert figures.resolve_perturbation('sgd') == 'sam'
  assert figures.resolve_perturbation('lsam') == 'lsam'
  assert figures.resolve_perturbation('sam', 'asam') == 'asam'
  assert figures.resolve_rho(0.05, 'sam', None) == 0.05
  assert figures.resolve_rho(0.0, 'sgd', 0.1) == 0.1
  with pytest.raises(ValueError, match='--rho'):
    figures.resolve_rho(0.0, 'sgd', None)  # an SGD run has no radius of its own
  classes = np.array([3, 5])
  np.testing.assert_array_equal(figures.probe_targets(classes, [5, 3, 5], 'label'), [1, 0, 1])
  with pytest.raises(ValueError, match='never saw'):
    figures.probe_targets(classes, [4], 'label')
  assert figures.nan_to_none([[1.0, np.nan]]) == [[1.0, None]]
  assert len(figures.choose_examples(10, 50, 0)) == 10
  chosen = figures.choose_examples(1000, 7, 0)
  assert len(set(chosen.tolist())) == 7 and np.all(np.diff(chosen) > 0)

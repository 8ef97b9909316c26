"""Figures 3 and 5 on real data: importance weights at the real parameters vs at the SAM phantom.

  python -m experiments.diagnostics_figures --workdir=runs/digits
  python -m experiments.diagnostics_figures --workdir=RUN --out=DIR --num_examples=512 --rho=0.05

From the newest checkpoint (or ``--step``) of a run written by ``samjax.train.train_and_evaluate``
(CelebA, Waterbirds, digits dominoes, ...), on ``--num_examples`` training examples drawn at
random (``--seed``):

* **Fig. 3** (Lorenz curves): the importance weights ``lambda_i = sigma(-m_i)`` at the real
  parameters ``theta`` and the phantom weights at ``theta~ = theta + e``, the perturbation a SAM
  step on these examples would take (:func:`samjax.phantom_params` with the gradient of the mean
  loss over them; :func:`samjax.diagnostics.phantom_diagnostics`). The perturbation follows the
  run's optimizer (SAM, LSAM: only the head, ASAM: adaptive; an SGD run gets SAM's) unless
  ``--perturbation`` names one; ``rho`` is the run's ``optimizer.rho`` unless ``--rho`` is given
  (an SGD run has ``rho = 0``, so it needs ``--rho``). The model runs in eval mode (BatchNorm
  running averages).
* **Fig. 5** (median weight per bin of signed feature contributions): linear probes for the easy
  and the hard feature are fitted on the frozen features of the group-balanced ``probe_train``
  split (:func:`samjax.probe.fit_probe`); the signed contribution of feature ``k`` to example
  ``x`` is the probe's margin ``y_k (w_k . phi(x) + b_k)``, ``y_k in {-1, +1}`` the example's
  value of feature ``k`` (multi-class features: the softmax margin). The panels show the median
  real weight, the median phantom weight and the median ``log(lambda~ / lambda)`` in each cell of
  a ``--num_bins`` x ``--num_bins`` grid (easy contribution on x, hard on y).

Outputs in ``--out`` (default ``WORKDIR/diagnostics``), named by checkpoint step ``S``:
``fig3_lorenz_stepS.png``, ``fig5_importance_bins_stepS.png`` and ``diagnostics_stepS.json`` with
every number behind them (Lorenz points, Gini real/phantom, probes, per-example contributions and
weights, binned medians/counts/edges; empty cells are ``null``). A missing workdir or checkpoint,
or a bad flag, ends with one line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from absl import app, flags, logging
from etils import epath

from samjax import cli as cli_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Run directory written by samjax.train.train_and_evaluate.')
flags.DEFINE_string('out', None, 'Output folder (default: WORKDIR/diagnostics).')
flags.DEFINE_integer('num_examples', 512, 'Training examples to weight (all if fewer exist).')
flags.DEFINE_float('rho', None, "Perturbation radius (default: the run's optimizer.rho).")
flags.DEFINE_integer('num_bins', 8, 'Bins per axis of the Fig. 5 grid.')
flags.DEFINE_enum('perturbation', 'run', ['run', 'sam', 'lsam', 'asam'],
                  "Phantom to form: the run's optimizer ('run'; SGD runs get 'sam') or a named one.")
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.DEFINE_integer('seed', 0, 'Seed of the random choice of examples.')
flags.DEFINE_enum('split', 'train', ['train', 'val', 'test'], 'Split to draw the examples from.')

PROG = 'diagnostics_figures'
FEATURES = ('label', 'attribute')


# ----------------------------------------------------------------------------
# Small pure helpers.
# ----------------------------------------------------------------------------


def resolve_perturbation(optimizer_name: str, requested: str = 'run') -> str:
  """The phantom to form: the named one, or the run's optimizer ('sgd' -> 'sam')."""
  if requested != 'run':
    return requested
  return 'sam' if optimizer_name == 'sgd' else optimizer_name


def resolve_rho(config_rho: float, optimizer_name: str, requested: Optional[float]) -> float:
  """``--rho`` if given, else the run's ``optimizer.rho``; a run without a radius needs ``--rho``."""
  rho = config_rho if requested is None else requested
  if not (rho >= 0 and rho < float('inf')):
    raise ValueError(f'--rho must be a finite number >= 0, got {rho}.')
  if requested is None and rho == 0:
    raise ValueError(f'the run (optimizer {optimizer_name}) has optimizer.rho = 0, so its phantom '
                     'is the real parameter; pass --rho (e.g. --rho=0.05).')
  return float(rho)


def choose_examples(num_available: int, num_examples: int, seed: int):
  """Sorted indices of ``min(num_examples, num_available)`` examples drawn without replacement."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if num_examples <= 0:
    raise ValueError(f'--num_examples must be positive, got {num_examples}.')
  if num_available == 0:
    raise ValueError('the split holds no examples.')
  if num_examples >= num_available:
    return np.arange(num_available)
  return np.sort(np.random.default_rng(seed).choice(num_available, num_examples, replace=False))


def probe_targets(classes, values, feature: str):
  """Indices of ``values`` in a probe's sorted ``classes`` (the encoding its logits use)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  values = np.asarray(values)
  index = np.clip(np.searchsorted(classes, values), 0, len(classes) - 1)
  if not np.all(classes[index] == values):
    missing = np.setdiff1d(np.unique(values), classes)
    raise ValueError(f'the {feature} probe never saw values {missing.tolist()} in probe_train.')
  return index.astype(np.int32)


def nan_to_none(array) -> Any:
  """Nested lists of floats with NaN as ``None`` (strict JSON)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  array = np.asarray(array, dtype=np.float64)
  if array.ndim == 0:
    return None if np.isnan(array) else float(array)
  return [nan_to_none(a) for a in array]


def save_figure(fig, path: str) -> None:
  """Saves ``fig`` as PNG at ``path`` atomically."""
  from samjax.io_utils import atomic_save_figure  # pylint: disable=g-import-not-at-top
  atomic_save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------
# Orchestration.
# ----------------------------------------------------------------------------


def _phantom_fn(model, perturbation: str, opt_config):
  """Jitted ``(variables, images, labels, rho) -> (PhantomDiagnostics, features)``."""
  import jax  # pylint: disable=g-import-not-at-top
  from samjax import diagnostics  # pylint: disable=g-import-not-at-top
  from samjax.config import get_field  # pylint: disable=g-import-not-at-top
  from samjax.optimizers import sam_options  # pylint: disable=g-import-not-at-top

  kwargs = sam_options(perturbation, adaptive_eta=get_field(opt_config, 'optimizer.adaptive_eta'),
                       head=get_field(opt_config, 'optimizer.head'))

  def fn(variables, images, labels, rho):
    rest = {k: v for k, v in variables.items() if k != 'params'}

    def logits_fn(params, x):
      return model.apply({'params': params, **rest}, x, train=False)

    result = diagnostics.phantom_diagnostics(
        logits_fn, variables['params'], images, labels, rho,
        compute_feature_grad_norms=False, **kwargs)
    _, features = model.apply(variables, images, train=False, return_features=True)
    return result, features

  return jax.jit(fn)


def compute(workdir: str, *, num_examples: int = 512, rho: Optional[float] = None,
            num_bins: int = 8, perturbation: str = 'run', step: Optional[int] = None,
            seed: int = 0, split: str = 'train') -> dict:
  """Everything behind Figs. 3 and 5 for one checkpoint, as a JSON-ready dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from samjax import diagnostics, probe, train  # pylint: disable=g-import-not-at-top
  from samjax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  if not epath.Path(workdir).is_dir():  # a local directory or a URL (gs://...)
    raise ValueError(f'--workdir {workdir} does not exist.')
  if num_bins < 1:
    raise ValueError(f'--num_bins must be positive, got {num_bins}.')
  if num_examples <= 0:
    raise ValueError(f'--num_examples must be positive, got {num_examples}.')
  if rho is not None:
    resolve_rho(rho, 'given', rho)  # fail before loading anything
  if step is not None:
    checkpoints = epath.Path(workdir) / 'checkpoints'
    saved = sorted(int(p.name) for p in checkpoints.iterdir()
                   if p.name.isdigit()) if checkpoints.is_dir() else []
    if step not in saved:
      raise ValueError(f'--step={step}: {workdir} has checkpoints at steps {saved}.')
  try:
    config, dataset, model, variables, step = train.load_run(workdir, step)
  except FileNotFoundError as e:  # e.g. --step names a checkpoint that is not there
    raise ValueError(f'{workdir}: cannot restore the checkpoint ({e}).') from e
  opt = config.optimizer
  perturbation = resolve_perturbation(opt.name, perturbation)
  rho = resolve_rho(float(opt.get('rho', 0.0)), opt.name, rho)

  examples = getattr(dataset, split)
  indices = choose_examples(len(examples.labels), num_examples, seed)
  images = np.asarray(dataset.normalize(examples.images[indices]), np.float32)
  labels = np.asarray(examples.labels[indices], np.int32)
  # One device: the mean-loss gradient over the chosen examples is the phantom's direction, so
  # they cannot be padded to a multiple of the device count to shard them, and replicated
  # variables would make every device repeat the whole computation.
  device = jax.local_devices()[0]
  result, features = _phantom_fn(model, perturbation, opt)(
      jax.device_put(variables, device), jax.device_put(images, device),
      jax.device_put(labels, device), jnp.float32(rho))
  result = jax.tree.map(lambda x: None if x is None else np.asarray(x), result)
  features = np.asarray(features, np.float64)
  if not (np.all(np.isfinite(result.weights)) and np.all(np.isfinite(result.phantom_weights))):
    raise ValueError(f'non-finite importance weights at step {step}: the checkpoint diverged.')

  # Linear probes for each feature on the group-balanced probe_train split.
  mesh = step_lib.make_mesh()
  batch_size = int(config.get('eval_batch_size', config.batch_size))
  probe_features, _ = train.compute_features(model, variables, dataset.probe_train, dataset,
                                             batch_size, mesh)
  easy = dataset.easy_feature
  if easy not in FEATURES:
    raise ValueError(f'dataset.easy_feature must be one of {FEATURES}, got {easy!r}.')
  hard = FEATURES[1 - FEATURES.index(easy)]
  contributions, probes = {}, {}
  for role, feature in (('easy', easy), ('hard', hard)):
    train_targets = np.asarray(getattr(dataset.probe_train, f'{feature}s'))
    if len(np.unique(train_targets)) < 2:
      raise ValueError(f'probe_train holds a single value of the {feature} ({role}) feature; '
                       'Fig. 5 needs a probe for both features.')
    fitted = probe.fit_probe(probe_features, train_targets, l2=float(config.get('probe_l2', 1e-3)))
    values = np.asarray(getattr(examples, f'{feature}s')[indices])
    contributions[role] = np.asarray(jax.jit(diagnostics.signed_contributions)(
        features, probe_targets(fitted.classes, values, feature), fitted.weights, fitted.bias),
                                     np.float64)
    probe_train_error = float(np.mean(probe.probe_predict(fitted, probe_features) != train_targets))
    probes[role] = {'feature': feature, 'classes': fitted.classes.tolist(),
                    'probe_train_error': probe_train_error,
                    'fraction_positive_contribution': float(np.mean(contributions[role] > 0))}

  # Jitted: eagerly, every primitive of these would compile on its own (seconds on a CPU).
  bin_fn = jax.jit(diagnostics.binned_medians_2d, static_argnames='num_bins')
  bins = {}
  for name, values in (('real', result.weights), ('phantom', result.phantom_weights),
                       ('log_ratio', result.log_weight_ratio)):
    binned = bin_fn(contributions['easy'], contributions['hard'], values, num_bins=num_bins)
    counts = np.asarray(binned.counts)
    bins[name] = np.where(counts > 0, np.asarray(binned.medians, np.float64), np.nan)
  lorenz_fn = jax.jit(diagnostics.lorenz_curve)
  lorenz_x, lorenz_real = lorenz_fn(result.weights)
  _, lorenz_phantom = lorenz_fn(result.phantom_weights)

  n = len(indices)
  return {
      'workdir': _absolute(workdir),
      'step': int(step),
      'dataset': config.data.name,
      'optimizer': opt.name,
      'perturbation': perturbation,
      'rho': rho,
      'split': split,
      'seed': seed,
      'num_examples': n,
      'example_indices': indices.tolist(),
      'easy_feature': easy,
      'hard_feature': hard,
      'easy_feature_name': getattr(dataset, f'{easy}_feature'),
      'hard_feature_name': getattr(dataset, f'{hard}_feature'),
      'gini': {'real': float(result.gini), 'phantom': float(result.phantom_gini)},
      'perturbation_norm': float(result.perturbation_norm),
      'mean_weight': {'real': float(np.mean(result.weights)),
                      'phantom': float(np.mean(result.phantom_weights))},
      'lorenz': {'x': np.asarray(lorenz_x).tolist(), 'real': np.asarray(lorenz_real).tolist(),
                 'phantom': np.asarray(lorenz_phantom).tolist()},
      'probes': probes,
      'examples': {
          'label': labels.tolist(),
          'easy_contribution': contributions['easy'].tolist(),
          'hard_contribution': contributions['hard'].tolist(),
          'weight_real': result.weights.astype(np.float64).tolist(),
          'weight_phantom': result.phantom_weights.astype(np.float64).tolist(),
          'log_weight_ratio': result.log_weight_ratio.astype(np.float64).tolist(),
      },
      'bins': {
          'num_bins': num_bins,
          'x': 'easy signed contribution', 'y': 'hard signed contribution',
          'x_edges': np.asarray(binned.x_edges, np.float64).tolist(),
          'y_edges': np.asarray(binned.y_edges, np.float64).tolist(),
          'counts': counts.tolist(),  # [x bin][y bin]
          'median_real': nan_to_none(bins['real']),
          'median_phantom': nan_to_none(bins['phantom']),
          'median_log_ratio': nan_to_none(bins['log_ratio']),
      },
  }


# ----------------------------------------------------------------------------
# Plotting.
# ----------------------------------------------------------------------------


def _title(r: dict) -> str:
  return (f"{r['dataset']} ({r['optimizer']}, step {r['step']}): {r['perturbation']} phantom, "
          f"rho={r['rho']:g}, n={r['num_examples']}")


def plot_lorenz(r: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  # Left: the paper's linear axes. Right: the same curves against log(fraction), which resolves
  # the head of the curve when a few examples carry nearly all the weight (a well-fit model).
  fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.4))
  x = np.asarray(r['lorenz']['x'])
  for ax, log_x in zip(axes, (False, True)):
    start = 1 if log_x else 0  # x = 0 has no logarithm
    ax.plot(x[start:], x[start:], ':', color='gray', lw=1, label='uniform')
    ax.plot(x[start:], r['lorenz']['real'][start:], '-', color='C0',
            label=f"real $\\lambda$ (Gini {r['gini']['real']:.4f})")
    ax.plot(x[start:], r['lorenz']['phantom'][start:], '--', color='C3',
            label=f"phantom $\\tilde\\lambda$ (Gini {r['gini']['phantom']:.4f})")
    if log_x:
      ax.set_xscale('log')
      ax.set_xlim(x[1], 1)
    else:
      ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel('fraction of examples (heaviest first)' + (', log scale' if log_x else ''))
    ax.set_ylabel('cumulative fraction of importance')
    ax.legend(loc='lower right', fontsize=8)
  fig.suptitle(_title(r), fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def plot_bins(r: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.colors as mcolors  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  b = r['bins']
  xe, ye = np.asarray(b['x_edges']), np.asarray(b['y_edges'])
  grids = {k: np.asarray(b[k], dtype=np.float64) for k in
           ('median_real', 'median_phantom', 'median_log_ratio')}  # None -> nan
  weights = np.concatenate([grids['median_real'].ravel(), grids['median_phantom'].ravel()])
  positive = weights[np.isfinite(weights) & (weights > 0)]
  if positive.size and positive.max() > positive.min():
    norm = mcolors.LogNorm(vmin=positive.min(), vmax=positive.max())
  else:
    norm = mcolors.Normalize(vmin=0.0, vmax=max(float(np.nanmax(weights)), 1e-12))
  bound = float(np.nanmax(np.abs(grids['median_log_ratio']))) if np.any(
      np.isfinite(grids['median_log_ratio'])) else 1.0
  ratio_norm = mcolors.Normalize(vmin=-max(bound, 1e-6), vmax=max(bound, 1e-6))

  fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2))
  panels = (('median_real', 'median real weight $\\lambda$', norm, 'viridis'),
            ('median_phantom', 'median phantom weight $\\tilde\\lambda$', norm, 'viridis'),
            ('median_log_ratio', 'median $\\log(\\tilde\\lambda / \\lambda)$', ratio_norm, 'RdBu_r'))
  for ax, (key, title, panel_norm, cmap) in zip(axes, panels):
    values = grids[key]
    empty = ~np.isfinite(values)
    if isinstance(panel_norm, mcolors.LogNorm):
      empty |= np.nan_to_num(values) <= 0  # weights that underflowed to 0 have no log colour
    grid = np.ma.masked_where(empty, values)
    mesh = ax.pcolormesh(xe, ye, grid.T, norm=panel_norm, cmap=cmap)  # rows of .T: hard bins
    fig.colorbar(mesh, ax=ax)
    ax.axvline(0.0, color='k', lw=0.6, ls=':')
    ax.axhline(0.0, color='k', lw=0.6, ls=':')
    ax.set_xlabel(f"easy feature ({r['easy_feature_name']}): signed contribution")
    ax.set_ylabel(f"hard feature ({r['hard_feature_name']}): signed contribution")
    ax.set_title(title, fontsize=9)
  fig.suptitle(_title(r), fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def _absolute(path: str) -> str:
  """A local path made absolute; a URL (gs://...) as given (abspath would mangle it)."""
  from samjax.io_utils import is_local  # pylint: disable=g-import-not-at-top
  return os.path.abspath(path) if is_local(path) else path


def output_paths(out: str, step: int) -> dict:
  """``out`` is a local directory or a URL (gs://...): the files are written through epath."""
  out = epath.Path(out)
  return {'json': str(out / f'diagnostics_step{step}.json'),
          'fig3': str(out / f'fig3_lorenz_step{step}.png'),
          'fig5': str(out / f'fig5_importance_bins_step{step}.png')}


def run(workdir: str, out: Optional[str] = None, **kwargs) -> dict:
  """Computes the diagnostics of ``workdir``, writes JSON and figures; returns their paths."""
  from samjax.io_utils import atomic_write_json  # pylint: disable=g-import-not-at-top
  result = compute(workdir, **kwargs)
  paths = output_paths(out or str(epath.Path(workdir) / 'diagnostics'), result['step'])
  atomic_write_json(paths['json'], result)
  plot_lorenz(result, paths['fig3'])
  plot_bins(result, paths['fig5'])
  return paths


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def main(argv) -> None:
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  cli_lib.no_extra_arguments(PROG, argv)
  if not FLAGS.workdir:
    cli_lib.fail(PROG, '--workdir is required, e.g. --workdir=runs/digits')
  with cli_lib.one_line_errors(PROG, catch=(ValueError,)):
    paths = run(FLAGS.workdir, FLAGS.out, num_examples=FLAGS.num_examples, rho=FLAGS.rho,
                num_bins=FLAGS.num_bins, perturbation=FLAGS.perturbation, step=FLAGS.step,
                seed=FLAGS.seed, split=FLAGS.split)
  for path in paths.values():
    print(path)


def cli(argv=None) -> None:
  """Runs the command; a bad flag is one line and exit code 2, not a usage dump."""
  FLAGS.unparse_flags()  # a second in-process call starts from the defaults again
  app.run(main, argv=sys.argv if argv is None else argv,
          flags_parser=lambda a: cli_lib.parse_flags(PROG, a))


if __name__ == '__main__':
  cli()

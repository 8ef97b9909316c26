"""The toy study's figures (matplotlib, Agg), one function per figure of the paper.

Every function takes ``(config, outputs, records, workdir)`` and returns the
PNG's path, or ``None`` when the study has no runs for that figure (e.g. no
interventions in a noise sweep). Means and standard deviations are over seeds.
Figures 1-6 use the clean data at the first batch size of the sweep.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.colors  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from samjax import diagnostics  # noqa: E402
from samjax.io_utils import atomic_save_figure  # noqa: E402
from samjax.toy import metrics as toy_metrics  # noqa: E402
from samjax.toy import model as toy_model  # noqa: E402

INTERVENTION_TITLES = {'iw_only': 'importance weight only (Eq. 8)',
                       'lr_only': 'feature learning rates only (Eq. 9)',
                       'iw_lr': 'both (Eq. 10)'}


# ----------------------------------------------------------------------------- selection

def main_batch_size(config) -> int:
  sizes = tuple(config.batch_sizes) if len(config.batch_sizes) else (config.batch_size,)
  return int(sizes[0])


def select(records: Sequence[dict], **criteria) -> list[dict]:
  return [r for r in records if all(r[k] == v for k, v in criteria.items())]


def clean(records: Sequence[dict], batch_size: int) -> list[dict]:
  """Runs on clean data at ``batch_size``, at the config's own constants (the
  sensitivity study's other variants are reported apart), of the main stage and of the
  sweep's first head (the figures show one head; report.json judges both)."""
  return [r for r in records if r['batch_size'] == batch_size and not r['label_noise']
          and not r['gaussian_noise'] and not r['dropout']
          and r.get('variant', 'default') == 'default' and r.get('stage', 'main') == 'main'
          and r.get('head', 'constant') == records[0].get('head', 'constant')]


def mean_std(records: Sequence[dict], field: str) -> tuple[float, float]:
  values = np.array([r[field] for r in records if r[field] is not None], np.float64)
  if values.size == 0:
    return float('nan'), float('nan')
  return float(values.mean()), float(values.std())


def curve(records: Sequence[dict], knob: str, field: str):
  """``(knob values, means, stds)`` of ``field`` over seeds, sorted by the knob."""
  knobs = sorted({r[knob] for r in records})
  stats = [mean_std([r for r in records if r[knob] == k], field) for k in knobs]
  means, stds = (np.array([s[k] for s in stats]) for k in (0, 1))
  return np.array(knobs, np.float64), means, stds


def rho_curve(records: Sequence[dict], method: str, complexity: float, field: str):
  """Like :func:`curve` over ``rho`` for ``method``, with SGD as ``rho = 0``."""
  runs = select(records, method=method, complexity=complexity) + [
      dict(r, rho=0.0) for r in select(records, method='sgd', complexity=complexity)]
  return curve(runs, 'rho', field)


def nearest(values: Sequence[float], target: float) -> float:
  values = sorted(set(values))
  return values[int(np.argmin([abs(v - target) for v in values]))]


# Radii at which LSAM no longer fits the training set are excluded from "best":
# the paper's LSAM fits the labels, and a practitioner would reject such a rho.
MAX_TRAIN_ERROR = 0.01


def best_setting(records: Sequence[dict], knob: str, field: str = 'hard_probe_error',
                 max_train_error: Optional[float] = MAX_TRAIN_ERROR):
  """``(knob value, its runs)`` of least mean ``field`` over seeds; ``(None, [])`` if none.

  Only values whose every run has ``train_error <= max_train_error`` compete
  (all values if none qualifies, or with ``max_train_error=None``). The choice
  is made on the same test metric it is compared on, an optimistic pick, as
  in reading the paper's Fig. 2A.
  """
  if not records:
    return None, []
  values = sorted({r[knob] for r in records})
  if max_train_error is not None:
    fitting = [v for v in values if all(r['train_error'] <= max_train_error
                                        for r in records if r[knob] == v)]
    values = fitting or values
  means = [mean_std([r for r in records if r[knob] == v], field)[0] for v in values]
  best = values[int(np.nanargmin(means))]
  return best, [r for r in records if r[knob] == best]


def fitting_values(records: Sequence[dict], knob: str,
                   max_train_error: float = MAX_TRAIN_ERROR) -> list:
  """The values of ``knob`` whose every run fits the training set."""
  return sorted(v for v in {r[knob] for r in records}
                if all(r['train_error'] is not None and r['train_error'] <= max_train_error
                       for r in records if r[knob] == v))


def unflipped_radii(records: Sequence[dict]) -> list:
  """The radii at which no run's phantom ever flipped the sign of ``v~_easy``."""
  return sorted(v for v in {r['rho'] for r in records}
                if all(r['easy_flip_fraction'] == 0 for r in records if r['rho'] == v))


def largest_gain(records: Sequence[dict], method: str = 'lsam'):
  """``(complexity, rho)`` of ``method``'s largest mean gain in hard-probe error over
  SGD among the radii that fit the training set; ``(None, None)`` if there is none."""
  best = (None, None, -np.inf)
  for c in sorted({r['complexity'] for r in select(records, method=method)}):
    sgd = mean_std(select(records, method='sgd', complexity=c), 'hard_probe_error')[0]
    rho, runs = best_setting(select(records, method=method, complexity=c), 'rho')
    gain = sgd - mean_std(runs, 'hard_probe_error')[0]
    if np.isfinite(gain) and gain > best[2]:
      best = (c, rho, gain)
  return best[:2]


def _configured_complexity(config, runs: Sequence[dict]) -> float:
  """``config.figure_complexity`` (nearest swept), or where LSAM gains most when None."""
  complexities = [r['complexity'] for r in runs]
  if config.figure_complexity is not None:
    return nearest(complexities, float(config.figure_complexity))
  clean_runs = [r for r in runs if not (r['label_noise'] or r['gaussian_noise'] or r['dropout'])]
  complexity, _ = largest_gain(clean_runs)
  return complexity if complexity is not None else min(complexities)


def figure_runs(config, outputs, records):
  """Indices of the runs shown in Figs. 1, 3, 5: SGD, the LSAM run and its no-flip twin.

  The complexity is ``config.figure_complexity`` (its best fitting radius), or, when
  that is None, the complexity and fitting radius of LSAM's largest gain over SGD.
  ``noflip`` is LSAM-noflip at the same radius when the study ran it, else the
  LSAM run at the largest radius whose phantom never flipped ``v~_easy``; None if neither.
  """
  runs = [r for r in clean(records, main_batch_size(config)) if r.get('variant', 'default')
          == 'default']
  lsam = select(runs, method='lsam')
  if not lsam or not select(runs, method='sgd'):
    return None
  if config.figure_complexity is None:
    complexity, rho = largest_gain(runs)
  else:
    complexity = nearest([r['complexity'] for r in lsam], float(config.figure_complexity))
    rho, _ = best_setting(select(runs, method='lsam', complexity=complexity), 'rho')
  seed = min(r['seed'] for r in lsam)
  common = dict(complexity=complexity, seed=seed, batch_size=main_batch_size(config),
                label_noise=0.0, gaussian_noise=0.0, dropout=0.0, noise_hard_only=False,
                variant='default')
  sgd = outputs.select(method='sgd', **common)
  best = outputs.select(method='lsam', rho=rho, **common)
  if not sgd or not best:
    return None
  noflip = outputs.select(method='lsam_noflip', rho=rho, **common)
  noflip_label = f'LSAM-noflip rho={rho:g}'
  if not noflip:
    unflipped = unflipped_radii(select(runs, method='lsam', complexity=complexity))
    if unflipped:
      noflip = outputs.select(method='lsam', rho=max(unflipped), **common)
      noflip_label = f'LSAM rho={max(unflipped):g} (no flip)'
  return dict(sgd=sgd[0], lsam=best[0], complexity=complexity, rho=rho, seed=seed,
              noflip=noflip[0] if noflip else None, noflip_label=noflip_label,
              automatic=config.figure_complexity is None)


def _rho_axis(ax, config, runs: Sequence[dict], zero: str = '0 = SGD') -> None:
  """Labels a radius axis in the config's unit, on a symlog scale (the flip-free radii are
  small), and shades the radii at which some seed's phantom flipped a feature's sign (the
  flip regime; report.json judges the regimes apart)."""
  unit = 'rho / ||v0||' if config.get('rho_unit') == 'initial_head' else 'rho'
  flips = sorted({r['rho'] for r in select(runs, method='lsam')
                  if r['easy_flip_fraction'] > 0 or r['hard_flip_fraction'] > 0})
  if flips:
    ax.axvspan(flips[0], flips[-1], color='tab:orange', alpha=0.12, lw=0)
  ax.set_xscale('symlog', linthresh=0.05)
  ax.set_xlabel(f'{unit} ({zero}; shaded: flip regime)')


def _save(fig, workdir: str, name: str) -> str:
  """Writes a figure laid out by ``tight_layout`` (not ``bbox_inches='tight'``, which
  lays every figure out a second time: a third of the figures' cost).

  ``tight_layout`` leaves a placeholder layout engine on the figure, and
  ``savefig`` draws a figure that has one twice (a dry run first, for the
  engine's sake); dropping the engine once laid out skips that draw and leaves
  the PNG unchanged.
  """
  fig.set_layout_engine(None)
  path = epath.Path(workdir) / name  # a local path or a URL (gs://)
  atomic_save_figure(fig, path, dpi=110)
  plt.close(fig)
  return str(path)


@jax.jit
def _lorenz_and_gini(weights):
  """``diagnostics.lorenz_curve`` and ``diagnostics.gini`` of ``weights [n]``, under one
  jit: eagerly they are a dozen small ops, each compiled on first use (Figs. 3, G)."""
  fraction, share = diagnostics.lorenz_curve(weights)
  return fraction, share, diagnostics.gini(weights)


def _lorenz(weights) -> tuple[np.ndarray, np.ndarray, float]:
  """``(fraction, share, gini)`` of ``weights`` on the host, for plotting."""
  fraction, share, gini = jax.device_get(_lorenz_and_gini(weights))
  return fraction, share, float(gini)


def _complexity_colors(complexities):
  cmap = plt.get_cmap('viridis')
  n = max(len(complexities) - 1, 1)
  return {c: cmap(0.9 * i / n) for i, c in enumerate(sorted(complexities))}


# ----------------------------------------------------------------------------- figures

def fig1_contours(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 1: phi_easy on the easy plane and phi_hard on the hard plane: SGD, LSAM and
  the no-flip regime (LSAM-noflip at the same radius), where LSAM gains most."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  model = toy_model.DisentangledModel(hidden=int(config.hidden))
  extent = {0: 1.25 * float(config.data.easy_scale),
            1: 1.2 * float(config.data.hard_scale) + float(config.data.hard_noise)}
  panels = [('SGD', chosen['sgd']), (f'LSAM rho={chosen["rho"]:g}', chosen['lsam'])]
  if chosen['noflip'] is not None:
    panels.append((chosen['noflip_label'], chosen['noflip']))
  # One compiled program for every panel (eagerly: one compilation per op of the MLP).
  features_of = jax.jit(
      lambda params, x: model.apply({'params': params}, x, return_features=True)[1])
  fig, axes = plt.subplots(len(panels), 2, figsize=(9, 4.25 * len(panels)), squeeze=False)
  for row, (label, index) in enumerate(panels):
    evaluation = outputs.evaluations
    for k, name in enumerate(('easy', 'hard')):
      ax = axes[row, k]
      lim = extent[k]
      grid = np.linspace(-lim, lim, 161)
      gx, gy = np.meshgrid(grid, grid)
      x = np.zeros((gx.size, 4), np.float32)
      x[:, 2 * k], x[:, 2 * k + 1] = gx.ravel(), gy.ravel()
      phi = np.asarray(features_of(outputs.params[index], x))[:, k].reshape(gx.shape)
      scale = np.max(np.abs(phi)) or 1.0
      ax.contourf(gx, gy, phi, levels=21, cmap='RdBu_r', vmin=-scale, vmax=scale)
      ax.contour(gx, gy, phi, levels=[0.0], colors='k', linewidths=1.2)
      points = outputs.train_x[index][:, 2 * k:2 * k + 2]
      labels = outputs.train_y[index]
      ax.scatter(points[:, 0], points[:, 1], c=np.where(labels > 0, 'tab:red', 'tab:blue'),
                 s=7, edgecolors='white', linewidths=0.3)
      error = getattr(evaluation, f'{name}_probe_error')[index, -1]
      ax.set_title(f'{label}: phi_{name} (probe error {error:.3f})', fontsize=10)
      ax.set_aspect('equal')
      ax.set_xlabel(f'x[{2 * k}]')
      ax.set_ylabel(f'x[{2 * k + 1}]')
  where = ('where LSAM gains most over SGD' if chosen['automatic'] else 'as configured')
  fig.suptitle(f'Fig. 1: learned features at complexity {chosen["complexity"]:g} deg and '
               f'rho={chosen["rho"]:g} ({where}),\nseed {chosen["seed"]} (black: phi = 0)')
  fig.tight_layout()
  return _save(fig, workdir, 'fig1_feature_contours.png')


def fig2a_probe_vs_rho(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 2A: hard-feature probe error against rho, one line per complexity (rho=0: SGD)."""
  runs = clean(records, main_batch_size(config))
  methods = [m for m in ('lsam', 'lsam_noflip', 'sam') if select(runs, method=m)]
  if not methods or not select(runs, method='sgd'):
    return None
  complexities = sorted({r['complexity'] for r in select(runs, method='sgd')})
  colors = _complexity_colors(complexities)
  fig, axes = plt.subplots(3, len(methods), figsize=(5.5 * len(methods), 10.5), squeeze=False)
  panels = (('hard_probe_error', 'hard-feature probe error'),
            ('easy_probe_error', 'easy-feature probe error'),
            ('train_error', 'training error of f'))
  for col, method in enumerate(methods):
    for row, (field, name) in enumerate(panels):
      ax = axes[row, col]
      for c in complexities:
        rhos, means, stds = rho_curve(runs, method, c, field)
        ax.errorbar(rhos, means, yerr=stds, marker='o', capsize=3, color=colors[c],
                    label=f'{c:g} deg')
      _rho_axis(ax, config, runs)
      ax.set_ylabel(name)
      ax.set_title(f'{method.upper()}: {name}', fontsize=10)
      ax.grid(alpha=0.3)
  axes[0, 0].legend(title='complexity', fontsize=8)
  fig.suptitle('Fig. 2A: probe error vs perturbation radius (mean +- std over seeds)')
  fig.tight_layout()
  return _save(fig, workdir, 'fig2a_probe_error_vs_rho.png')


def fig2b_ratio_vs_rho(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 2B: phantom ratio v~_hard/v~_easy vs rho (solid), real ratio v_hard/v_easy
  (dashed), over LSAM's radii; SGD's end point apart (stars at rho = 0). Filled
  markers: every seed fits the training set; hollow: some seed does not; a cross
  marks radii where some seed's v~_easy changed sign (flip) during training."""
  runs = clean(records, main_batch_size(config))
  if not select(runs, method='lsam') or not select(runs, method='sgd'):
    return None
  complexities = sorted({r['complexity'] for r in select(runs, method='lsam')})
  colors = _complexity_colors(complexities)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  for c in complexities:
    lsam = select(runs, method='lsam', complexity=c)
    fitting = set(fitting_values(lsam, 'rho'))
    flipped = {r['rho'] for r in lsam if r['easy_flip_fraction'] > 0}
    sgd = select(runs, method='sgd', complexity=c)
    for ax, suffix in zip(axes, ('_of_means', '_median')):
      for kind, style, marker in (('phantom', '-', 'o'), ('real', '--', 's')):
        field = f'{kind}_ratio{suffix}'
        rhos, means, stds = curve(lsam, 'rho', field)
        ax.plot(rhos, means, style, color=colors[c],
                label=f'{kind}, {c:g} deg')
        ax.errorbar(rhos, means, yerr=stds, fmt='none', color=colors[c], capsize=3)
        for rho, mean in zip(rhos, means):
          ax.plot([rho], [mean], marker, color=colors[c],
                  mfc=colors[c] if rho in fitting else 'white')
          if kind == 'phantom' and rho in flipped:
            ax.plot([rho], [mean], 'x', color='k', ms=9)
      ax.plot([0.0], [mean_std(sgd, f'real_ratio{suffix}')[0]], '*', color=colors[c], ms=11)
  axes[0].set_title('ratio of the time-averaged heads')
  axes[1].set_title('median over training steps (defined when v~_easy crosses 0)')
  for ax in axes:
    _rho_axis(ax, config, runs, zero='star at 0: SGD, apart from the LSAM curve')
    ax.set_ylabel('v_hard / v_easy')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle('Fig. 2B: LSAM phantom ratio (solid) and real ratio (dashed); filled = all seeds '
               f'fit (train error <= {MAX_TRAIN_ERROR:g}), hollow = some do not; x = v~_easy flips')
  fig.tight_layout()
  return _save(fig, workdir, 'fig2b_ratio_vs_rho.png')


def fig3_lorenz(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 3: Lorenz curves of real vs phantom importance weights (training set)."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  middle = len(outputs.eval_steps) // 2
  snap = lambda i, field: getattr(outputs.snapshots, field)[i, middle]
  step = int(outputs.eval_steps[middle])
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
  lsam, sgd = chosen['lsam'], chosen['sgd']
  panels = [
      ('same LSAM-trained model',
       [('real lambda (SGD step)', snap(lsam, 'weight_real'), '-'),
        ('phantom lambda~ (LSAM step)', snap(lsam, 'weight_phantom'), '--')]),
      ('each trained by its method',
       [('SGD model, real lambda', snap(sgd, 'weight_real'), '-'),
        ('LSAM model, phantom lambda~', snap(lsam, 'weight_phantom'), '--')]),
  ]
  for ax, (title, curves) in zip(axes, panels):
    for label, weights, style in curves:
      fraction, share, gini = _lorenz(weights)
      ax.plot(fraction, share, style, label=f'{label} (Gini {gini:.2f})')
    ax.plot([0, 1], [0, 1], color='gray', lw=0.8)
    ax.set_xlabel('fraction of training points (heaviest first)')
    ax.set_ylabel('fraction of total importance weight held')
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  fig.suptitle(f'Fig. 3: Lorenz curves at step {step}, complexity {chosen["complexity"]:g}, '
               f'LSAM rho={chosen["rho"]:g} (diagonal = uniform)')
  fig.tight_layout()
  return _save(fig, workdir, 'fig3_lorenz.png')


def fig4_lr_scale(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 4: learning-rate scales vs rho, literal (v~_k/v_k, top) and scale-free
  ((v~_k/||v~||)/(v_k/||v||), bottom)."""
  runs = clean(records, main_batch_size(config))
  if not select(runs, method='lsam') or not select(runs, method='sgd'):
    return None
  complexities = sorted({r['complexity'] for r in select(runs, method='lsam')})
  colors = _complexity_colors(complexities)
  fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
  for row, (suffix, how) in enumerate((('', 'v~_{k} / v_{k}'),
                                       ('_normalised', '(v~_{k}/||v~||) / (v_{k}/||v||)'))):
    for col, name in enumerate(('easy', 'hard')):
      ax = axes[row, col]
      for c in complexities:
        rhos, means, stds = rho_curve(runs, 'lsam', c, f'lr_scale_{name}{suffix}_median')
        ax.errorbar(rhos, means, yerr=stds, marker='o', capsize=3, color=colors[c],
                    label=f'{c:g} deg')
      ax.axhline(1.0, color='gray', lw=0.8)
      _rho_axis(ax, config, runs)
      ax.set_ylabel(how.format(k=name))
      ax.set_title(f'{name} feature, {"literal" if not suffix else "scale-free"}')
      ax.grid(alpha=0.3)
  axes[0, 0].legend(title='complexity', fontsize=8)
  fig.suptitle('Fig. 4: learning-rate scaling, literal (top) and scale-free (bottom: the weight '
               'relative to the other feature)\nmedian over steps; mean +- std over seeds')
  fig.tight_layout()
  return _save(fig, workdir, 'fig4_lr_scale.png')


def _moving_average(values, width: int):
  width = max(1, min(width, values.shape[-1]))
  kernel = np.ones(width) / width
  return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode='valid'), -1, values)


def fig_importance_spread(config, outputs, records, workdir) -> Optional[str]:
  """The importance weights over training (explains Eq. 8's effect): the batch mean
  of lambda = sigma(-y v.Phi) and of the intervened or phantom weight, and the share
  of the batch's weight held by its heaviest point, for SGD, LSAM and iw_only."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  complexity = chosen['complexity']
  runs = clean(records, main_batch_size(config))
  curves = [('SGD, real', 'sgd', None, 'weight_real', 'k', '-'),
            (f'LSAM rho={chosen["rho"]:g}, real', 'lsam', chosen['rho'], 'weight_real',
             'tab:red', '-'),
            (f'LSAM rho={chosen["rho"]:g}, phantom', 'lsam', chosen['rho'], 'weight_phantom',
             'tab:red', '--')]
  iw_complexities = {r['complexity'] for r in select(runs, method='iw_only')}
  if iw_complexities:
    iw_complexity = nearest(iw_complexities, complexity)
    ratio, _ = best_setting(select(runs, method='iw_only', complexity=iw_complexity),
                            'fixed_ratio')
    curves.append((f'iw_only c={ratio:g} ({iw_complexity:g} deg), weight with v^', 'iw_only',
                   ratio, 'weight_phantom', 'tab:blue', '--'))
  else:
    iw_complexity = ratio = None
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
  width = min(20, outputs.stats.weight_real.shape[1])
  for label, method, knob, field, color, style in curves:
    criteria = dict(method=method, complexity=iw_complexity if method == 'iw_only'
                    else complexity, batch_size=main_batch_size(config), label_noise=0.0,
                    gaussian_noise=0.0, dropout=0.0, variant='default')
    if method == 'iw_only':
      criteria['fixed_ratio'] = knob
    elif method == 'lsam':
      criteria['rho'] = knob
    indices = outputs.select(**criteria)
    if not indices:
      continue
    steps = np.arange(outputs.stats.weight_real.shape[1])[width - 1:] + 1
    mean = _moving_average(getattr(outputs.stats, field)[indices].mean(0), width)
    axes[0].plot(steps, mean, style, color=color, label=label)
    if field == 'weight_real':
      share = _moving_average(outputs.stats.weight_max_share[indices].mean(0), width)
      axes[1].plot(steps, share, style, color=color, label=label)
  axes[0].set_yscale('log')
  axes[0].set_ylabel(f'batch mean importance weight ({width}-step average)')
  axes[1].axhline(1.0 / main_batch_size(config), color='gray', lw=0.8,
                  label='uniform (1 / batch size)')
  axes[1].set_ylabel('share of the batch weight on its heaviest point')
  for ax in axes:
    ax.set_xscale('log')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  fig.suptitle(f'Importance weights over training, complexity {complexity:g} deg, mean over '
               'seeds: once the real weights have collapsed, Eq. 8 re-weights almost nothing')
  fig.tight_layout()
  return _save(fig, workdir, 'fig_importance_spread.png')


def importance_by_contribution(outputs, indices: Sequence[int], num_bins: int = 10,
                               snapshots=None):
  """Median real and phantom weight per equal-count bin of each signed contribution,
  pooled over the runs ``indices`` and the snapshots ``snapshots`` (an index or
  slice into the snapshot axis; default: the second half of training, once both
  features are in use; early on LSAM can hold the easy one back)."""
  snaps = outputs.snapshots
  late = slice(len(outputs.eval_steps) // 2, None) if snapshots is None else snapshots
  pool = lambda field: np.concatenate([getattr(snaps, field)[i, late].ravel() for i in indices])
  real, phantom = pool('weight_real'), pool('weight_phantom')
  result = {}
  for name in ('easy', 'hard'):
    contribution = pool(f'contribution_{name}')
    centres, real_medians = toy_metrics.equal_count_binned_medians(contribution, real, num_bins)
    _, phantom_medians = toy_metrics.equal_count_binned_medians(contribution, phantom, num_bins)
    result[name] = (centres, real_medians, phantom_medians)
  return result


def seed_group(outputs, index: int) -> list[int]:
  """Indices of the clean runs that differ from run ``index`` only in the seed."""
  row = outputs.rows[index]
  return [i for i, r in enumerate(outputs.rows) if r.method == row.method and r.rho == row.rho
          and r.complexity == row.complexity and r.batch_size == row.batch_size and not r.noisy
          and r.variant == row.variant]


def checkpoints(outputs, count: int = 4) -> list[int]:
  """Up to ``count`` evenly spaced snapshot indices, the last snapshot included."""
  last = len(outputs.eval_steps) - 1
  return sorted({int(round(k)) for k in np.linspace(0, last, count)})


def fig5_importance_bins(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 5: median importance weight per bin of y v_easy phi_easy and y v_hard phi_hard."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  binned = importance_by_contribution(outputs, seed_group(outputs, chosen['lsam']))
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, name in zip(axes, ('easy', 'hard')):
    centres, real, phantom = binned[name]
    ax.semilogy(centres, real, 'o-', label='real lambda = sigma(-y v.Phi)')
    ax.semilogy(centres, phantom, 's--', label='phantom lambda~ = sigma(-y v~.Phi)')
    ax.set_xlabel(f'signed contribution y v_{name} phi_{name} (bin median)')
    ax.set_ylabel('median importance weight')
    ax.set_title(f'bins of the {name} contribution')
    ax.grid(alpha=0.3, which='both')
  axes[0].legend(fontsize=8)
  fig.suptitle(f'Fig. 5: LSAM rho={chosen["rho"]:g}, complexity {chosen["complexity"]:g}, '
               f'all seeds, snapshots of the second half of training\n(the paper\'s 1-D '
               'picture: each bin mixes the other feature\'s contribution; report.md\'s verdict '
               'comes from a regression on both)')
  fig.tight_layout()
  return _save(fig, workdir, 'fig5_importance_by_contribution.png')


def importance_2d(outputs, indices: Sequence[int], num_bins: int = 12, snapshots=None,
                  quantile: float = 0.01):
  """Median real and phantom weight over a 2-D grid of (easy, hard) signed contributions.

  Pooled like :func:`importance_by_contribution`; each axis spans the
  ``[quantile, 1 - quantile]`` range of its contribution (points outside are
  left out) so a few extreme points do not empty most cells. Returns
  ``(x_edges, y_edges, real medians, phantom medians, counts)``, the medians
  ``[num_bins, num_bins]`` with empty cells NaN.
  """
  snaps = outputs.snapshots
  late = slice(len(outputs.eval_steps) // 2, None) if snapshots is None else snapshots
  pool = lambda field: np.concatenate([getattr(snaps, field)[i, late].ravel() for i in indices])
  easy, hard = pool('contribution_easy'), pool('contribution_hard')
  ranges = [np.quantile(v, [quantile, 1 - quantile]) for v in (easy, hard)]
  medians = []
  for field in ('weight_real', 'weight_phantom'):
    binned = jax.device_get(_binned_medians_2d(easy, hard, pool(field), *ranges, num_bins=num_bins))
    counts = np.asarray(binned.counts)
    medians.append(np.where(counts > 0, np.asarray(binned.medians, np.float64), np.nan))
  return (np.asarray(binned.x_edges), np.asarray(binned.y_edges), medians[0], medians[1],
          counts)


def _binned_medians_2d(x, y, weights, x_range, y_range, *, num_bins: int):
  """``diagnostics.binned_medians_2d`` under one jit (eagerly: some fifty compilations).

  Its NaN/inf check needs concrete inputs, so it is made here on the host, before the jit.
  """
  for name, v in (('x', x), ('y', y), ('weights', weights)):
    diagnostics._check_finite(name, 'importance_2d', v)  # pylint: disable=protected-access
  return _jitted_binned_medians_2d(x, y, weights, x_range, y_range, num_bins=num_bins)


@functools.partial(jax.jit, static_argnames='num_bins')
def _jitted_binned_medians_2d(x, y, weights, x_range, y_range, *, num_bins: int):
  return diagnostics.binned_medians_2d(x, y, weights, num_bins, x_range=x_range, y_range=y_range)


def fig5_importance_2d(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 5 as in the paper: median real and phantom weight over a 2-D grid of
  (y v_easy phi_easy, y v_hard phi_hard), empty cells masked (white)."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  x_edges, y_edges, real, phantom, counts = importance_2d(
      outputs, seed_group(outputs, chosen['lsam']))
  finite = np.concatenate([real[np.isfinite(real)], phantom[np.isfinite(phantom)]])
  positive = finite[finite > 0]
  norm = (matplotlib.colors.LogNorm(vmin=positive.min(), vmax=positive.max())
          if positive.size and positive.max() > positive.min() else None)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
  panels = (('real lambda = sigma(-y v.Phi)', real, norm, 'viridis'),
            ('phantom lambda~ = sigma(-y v~.Phi)', phantom, norm, 'viridis'))
  for ax, (title, medians, n, cmap) in zip(axes, panels):
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(medians).T, norm=n, cmap=cmap)
    fig.colorbar(mesh, ax=ax, label='median importance weight')
    ax.set_title(title, fontsize=10)
  with np.errstate(divide='ignore', invalid='ignore'):
    log_ratio = np.log10(phantom / real)
  log_ratio[~np.isfinite(log_ratio)] = np.nan
  bound = np.nanmax(np.abs(log_ratio)) if np.isfinite(log_ratio).any() else 1.0
  mesh = axes[2].pcolormesh(x_edges, y_edges, np.ma.masked_invalid(log_ratio).T, cmap='RdBu_r',
                            vmin=-bound, vmax=bound)
  fig.colorbar(mesh, ax=axes[2], label='log10(median phantom / median real)')
  axes[2].set_title('phantom / real (red: LSAM up-weights)', fontsize=10)
  for ax in axes:
    ax.set_xlabel('y v_easy phi_easy')
    ax.set_ylabel('y v_hard phi_hard')
    if x_edges[0] < 0 < x_edges[-1]:  # zero lines only where they do not widen the axes
      ax.axvline(0, color='gray', lw=0.6)
    if y_edges[0] < 0 < y_edges[-1]:
      ax.axhline(0, color='gray', lw=0.6)
  fig.suptitle(f'Fig. 5 (2-D): LSAM rho={chosen["rho"]:g}, complexity '
               f'{chosen["complexity"]:g}, all seeds, second half of training, '
               f'{int(counts.sum())} points in {int((counts > 0).sum())} non-empty cells')
  fig.tight_layout()
  return _save(fig, workdir, 'fig5_importance_2d.png')


def figG_lorenz_over_time(config, outputs, records, workdir) -> Optional[str]:
  """Appendix G: Fig. 3's Lorenz curves at several checkpoints during training."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  points = checkpoints(outputs)
  lsam, sgd = chosen['lsam'], chosen['sgd']
  snap = lambda i, field, k: getattr(outputs.snapshots, field)[i, k]
  fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4.2), squeeze=False,
                           sharey=True)
  for ax, k in zip(axes[0], points):
    for label, weights, style in (
        ('SGD model, real', snap(sgd, 'weight_real', k), '-'),
        ('LSAM model, real', snap(lsam, 'weight_real', k), ':'),
        ('LSAM model, phantom', snap(lsam, 'weight_phantom', k), '--')):
      fraction, share, gini = _lorenz(weights)
      ax.plot(fraction, share, style, label=f'{label} (Gini {gini:.2f})')
    ax.plot([0, 1], [0, 1], color='gray', lw=0.8)
    ax.set_title(f'step {int(outputs.eval_steps[k])}', fontsize=10)
    ax.set_xlabel('fraction of training points (heaviest first)')
    ax.legend(fontsize=7, loc='lower right')
  axes[0, 0].set_ylabel('fraction of total importance weight held')
  fig.suptitle(f'Appendix G: Lorenz curves over training, complexity {chosen["complexity"]:g}, '
               f'LSAM rho={chosen["rho"]:g}, seed {chosen["seed"]} (diagonal = uniform)')
  fig.tight_layout()
  return _save(fig, workdir, 'figG_lorenz_over_time.png')


def figG_importance_over_time(config, outputs, records, workdir) -> Optional[str]:
  """Appendix G: Fig. 5's median weight per contribution bin at several checkpoints."""
  chosen = figure_runs(config, outputs, records)
  if chosen is None:
    return None
  points = checkpoints(outputs)
  indices = seed_group(outputs, chosen['lsam'])
  fig, axes = plt.subplots(2, len(points), figsize=(4.2 * len(points), 7.5), squeeze=False)
  for col, k in enumerate(points):
    binned = importance_by_contribution(outputs, indices, snapshots=k)
    for row, name in enumerate(('easy', 'hard')):
      ax = axes[row, col]
      centres, real, phantom = binned[name]
      ax.semilogy(centres, real, 'o-', ms=4, label='real lambda')
      ax.semilogy(centres, phantom, 's--', ms=4, label='phantom lambda~')
      ax.set_xlabel(f'y v_{name} phi_{name} (bin median)')
      ax.set_title(f'step {int(outputs.eval_steps[k])}: {name} contribution', fontsize=9)
      ax.grid(alpha=0.3, which='both')
      if col == 0:
        ax.set_ylabel('median importance weight')
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f'Appendix G: Fig. 5 over training, LSAM rho={chosen["rho"]:g}, complexity '
               f'{chosen["complexity"]:g}, all seeds')
  fig.tight_layout()
  return _save(fig, workdir, 'figG_importance_over_time.png')


def fig6_interventions(config, outputs, records, workdir) -> Optional[str]:
  """Fig. 6: hard probe error vs the fixed ratio c for each intervention, LSAM overlaid
  at its (phantom ratio of means, error) points, SGD as a band."""
  runs = clean(records, main_batch_size(config))
  methods = [m for m in INTERVENTION_TITLES if select(runs, method=m)]
  if not methods:
    return None
  complexities = sorted({r['complexity'] for m in methods for r in select(runs, method=m)})
  fig, axes = plt.subplots(len(complexities), len(methods), figsize=(4.6 * len(methods),
                                                                      3.8 * len(complexities)),
                           squeeze=False, sharey=True)
  for row, c in enumerate(complexities):
    sgd_mean, sgd_std = mean_std(select(runs, method='sgd', complexity=c), 'hard_probe_error')
    lsam = select(runs, method='lsam', complexity=c)
    for col, method in enumerate(methods):
      ax = axes[row, col]
      ratios, means, stds = curve(select(runs, method=method, complexity=c), 'fixed_ratio',
                                  'hard_probe_error')
      ax.errorbar(ratios, means, yerr=stds, marker='o', capsize=3, label=method)
      if np.isfinite(sgd_mean):
        ax.axhline(sgd_mean, color='k', lw=1, label='SGD')
        ax.axhspan(sgd_mean - sgd_std, sgd_mean + sgd_std, color='k', alpha=0.08)
      for rho in sorted({r['rho'] for r in lsam}):
        at_rho = [r for r in lsam if r['rho'] == rho]
        x, _ = mean_std(at_rho, 'phantom_ratio_learning')
        y, _ = mean_std(at_rho, 'hard_probe_error')
        ax.plot([x], [y], 'r*', ms=9, label='LSAM (phantom ratio, feature-learning phase)'
                if rho == min(r['rho'] for r in lsam) else None)
        ax.annotate(f'{rho:g}', (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7,
                    color='r')
      # symlog: LSAM's phantom ratio can be <= 0 where v~_easy changes sign on average.
      ax.set_xscale('symlog', linthresh=0.5)
      ax.set_xticks(ratios)
      ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.set_xlabel('ratio c = v^_hard / v^_easy')
      ax.set_title(f'{INTERVENTION_TITLES[method]}\ncomplexity {c:g} deg', fontsize=9)
      ax.grid(alpha=0.3, which='both')
      if col == 0:
        ax.set_ylabel('hard-feature probe error')
  axes[0, 0].legend(fontsize=7)
  fig.suptitle('Fig. 6: interventions that fix the ratio, trained with SGD (red: LSAM, by rho)')
  fig.tight_layout()
  return _save(fig, workdir, 'fig6_interventions.png')


def figH_noise(config, outputs, records, workdir) -> Optional[str]:
  """Appendix H.1 (Fig. 9): hard probe error vs noise level, per noise kind, rho as lines."""
  batch_size = main_batch_size(config)
  runs = [r for r in records if r['batch_size'] == batch_size and r['method'] in ('sgd', 'lsam')]
  if not any(r['label_noise'] or r['gaussian_noise'] or r['dropout'] for r in runs):
    return None
  complexity = _configured_complexity(config, runs)
  runs = [dict(r, rho=0.0) if r['method'] == 'sgd' else r
          for r in runs if r['complexity'] == complexity]
  rhos = sorted({r['rho'] for r in runs})
  cmap = plt.get_cmap('plasma')
  colors = {rho: cmap(0.85 * i / max(len(rhos) - 1, 1)) for i, rho in enumerate(rhos)}
  kinds = (('label_noise', 'feature label noise'), ('gaussian_noise', 'Gaussian noise std'),
           ('dropout', 'feature dropout'))
  fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharey=True)
  for row, hard_only in enumerate((False, True)):
    for col, (kind, title) in enumerate(kinds):
      ax = axes[row, col]
      others = [k for k, _ in kinds if k != kind]
      for rho in rhos:
        pts = [r for r in runs if r['rho'] == rho and not any(r[o] for o in others)
               and (r[kind] == 0 or r['noise_hard_only'] == hard_only)]
        levels, means, stds = curve(pts, kind, 'hard_probe_error')
        ax.errorbar(levels, means, yerr=stds, marker='o', capsize=3, color=colors[rho],
                    label='SGD' if rho == 0 else f'LSAM rho={rho:g}')
      ax.set_xlabel(title)
      ax.set_title(f'{title}, {"hard feature only" if hard_only else "both features"}', fontsize=9)
      ax.grid(alpha=0.3)
      if col == 0:
        ax.set_ylabel('hard-feature probe error')
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f'Appendix H.1: noisy training features, complexity {complexity:g} deg')
  fig.tight_layout()
  return _save(fig, workdir, 'figH_noise.png')


def figH_batch_size(config, outputs, records, workdir) -> Optional[str]:
  """Appendix H.2 (Fig. 10): hard probe error vs rho, one line per batch size."""
  sizes = sorted({r['batch_size'] for r in records})
  if len(sizes) < 2:
    return None
  runs = [r for r in records if not (r['label_noise'] or r['gaussian_noise'] or r['dropout'])]
  complexity = _configured_complexity(config, runs)
  cmap = plt.get_cmap('cividis')
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, b in enumerate(sizes):
    rhos, means, stds = rho_curve([r for r in runs if r['batch_size'] == b], 'lsam', complexity,
                                  'hard_probe_error')
    ax.errorbar(rhos, means, yerr=stds, marker='o', capsize=3,
                color=cmap(0.9 * i / max(len(sizes) - 1, 1)), label=f'batch {b}')
  ax.set_xlabel('rho (0 = SGD)')
  ax.set_ylabel('hard-feature probe error')
  ax.set_title(f'Appendix H.2: batch size, complexity {complexity:g} deg')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, workdir, 'figH_batch_size.png')


def fig_learning_curves(config, outputs, records, workdir) -> Optional[str]:
  """Hard probe error during training, SGD and every LSAM radius (not in the paper)."""
  runs = clean(records, main_batch_size(config))
  if not select(runs, method='sgd'):
    return None
  complexities = sorted({r['complexity'] for r in select(runs, method='sgd')})
  steps = outputs.eval_steps
  fig, axes = plt.subplots(1, len(complexities), figsize=(4.2 * len(complexities), 3.8),
                           squeeze=False, sharey=True)
  lsam_rhos = sorted({r['rho'] for r in select(runs, method='lsam')})
  cmap = plt.get_cmap('plasma')
  for ax, c in zip(axes[0], complexities):
    for k, (method, rho) in enumerate([('sgd', 0.0)] + [('lsam', r) for r in lsam_rhos]):
      pts = [r for r in select(runs, method=method, complexity=c) if r['rho'] == rho]
      values = np.array([r['hard_probe_error_curve'] for r in pts], np.float64)
      ax.plot(steps, values.mean(0), color='k' if method == 'sgd' else
              cmap(0.85 * (k - 1) / max(len(lsam_rhos) - 1, 1)),
              label='SGD' if method == 'sgd' else f'LSAM {rho:g}')
    ax.set_title(f'complexity {c:g} deg')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel('hard-feature probe error (mean over seeds)')
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, workdir, 'fig_learning_curves.png')


FIGURES: tuple[Callable, ...] = (fig1_contours, fig2a_probe_vs_rho, fig2b_ratio_vs_rho,
                                 fig3_lorenz, fig4_lr_scale, fig_importance_spread,
                                 fig5_importance_bins,
                                 fig5_importance_2d, figG_lorenz_over_time,
                                 figG_importance_over_time, fig6_interventions, figH_noise, figH_batch_size,
                                 fig_learning_curves)


def make_figures(config, outputs, records, workdir: str) -> list[str]:
  """Draws every figure the study has runs for; returns the PNG paths."""
  paths = []
  for draw in FIGURES:
    path = draw(config, outputs, records, workdir)
    if path is not None:
      paths.append(path)
  return paths

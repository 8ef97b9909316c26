"""The embedded real-data study (issue 15, item 6): SGD vs SAM vs LSAM on ``digits_textures``.

Nothing is downloaded: the easy half is a scikit-learn digit, the hard half a patch of a
photograph shipped with scikit-image / scikit-learn (:mod:`samjax.data.builders.digits_textures`). The
grid is the paper's for the stacked data sets (PAPER.md): learning rate {0.01, 0.05, 0.1} x rho
{0.01, 0.03, 0.05, 0.07, 0.1, 0.2} for SAM and for LSAM, the learning rates alone for SGD, every
setting for every seed. Each point is trained by :mod:`grid_train` (one point at a time, or the
grid of one method as one vmapped program with ``vmap=True``; the results agree to float
tolerance), then evaluated: validation / test error of the trained classifier (the easy digit is
the training label) and the linear-probe errors of both features (probe fit on ``probe_train``,
error on ``probe_test``, :func:`samjax.probe.probe_error`).

Per method the setting with the lowest mean validation error is selected; its per-seed
differences to SGD's selected setting (same seeds: same initial parameters and example order)
give the paired table (:mod:`paired`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath

from experiments import grid_train, paired

DATASET = 'digits_textures'
LEARNING_RATES = (0.01, 0.05, 0.1)
RHOS = (0.01, 0.03, 0.05, 0.07, 0.1, 0.2)
METHODS = ('sgd', 'sam', 'lsam')
NUM_SEEDS = 8
# The paper's recipe (batch 100, momentum 0.9, cosine, no augmentation) at a CPU-sized model and
# length, so that 8 seeds x the whole grid fit in 30 minutes on 2 cores: a conv net of width 8
# (the paper's layers, a quarter of the channels) for 5 epochs of the 2,000-example training
# split (SGD fits it: final training error <= 0.007 at every seed and learning rate).
RECIPE = dict(num_steps=100, batch_size=100, momentum=0.9, width=8)


@dataclasses.dataclass(frozen=True)
class Data:
  """Normalised float32 images and both features of every split."""
  images: dict
  easy: dict
  hard: dict


def load_data(data_dir: Optional[str] = None, max_train_examples: Optional[int] = None) -> Data:
  """Builds (first use) and reads the ``digits_textures`` TFDS data set; mean-pixel normalised."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from samjax.data.builders import digits_textures  # pylint: disable=g-import-not-at-top,unused-import
  from samjax.data.dataset import normalization_constants  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(DATASET, data_dir=data_dir)
  builder.download_and_prepare()
  raw = {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
         for split in digits_textures.SPLITS}
  if max_train_examples:
    raw['train'] = {k: v[:max_train_examples] for k, v in raw['train'].items()}
  mean, std = normalization_constants('mean_pixel', raw['train']['image'])
  images = {s: ((r['image'].astype(np.float32) - mean) / std).astype(np.float32)
            for s, r in raw.items()}
  return Data(images=images,
              easy={s: r['easy_digit'].astype(np.int32) for s, r in raw.items()},
              hard={s: r['texture'].astype(np.int32) for s, r in raw.items()})


def grid_points(num_seeds: int = NUM_SEEDS, learning_rates: Sequence[float] = LEARNING_RATES,
                rhos: Sequence[float] = RHOS, methods: Sequence[str] = METHODS) -> list[dict]:
  """Every ``{method, learning_rate, rho, seed}`` of the study, in a fixed order."""
  points = []
  for method in methods:
    for lr in learning_rates:
      for rho in ((0.0,) if method == 'sgd' else rhos):
        for seed in range(num_seeds):
          points.append({'method': method, 'learning_rate': float(lr), 'rho': float(rho),
                         'seed': seed})
  return points


def evaluate(recipe: grid_train.Recipe, params, data: Data) -> list[dict]:
  """Metrics of every grid point in ``params`` (leading axis ``G``)."""
  from samjax.probe import probe_error  # pylint: disable=g-import-not-at-top
  outputs = {s: grid_train.grid_features(recipe, params, data.images[s])
             for s in ('train', 'validation', 'test', 'probe_train', 'probe_test')}
  results = []
  for g in range(jax.tree.leaves(params)[0].shape[0]):
    error = lambda s: float(np.mean(outputs[s][0][g].argmax(-1) != data.easy[s]))
    val_logits = outputs['validation'][0][g].astype(np.float64)
    val_log_probs = val_logits - np.logaddexp.reduce(val_logits, axis=-1, keepdims=True)
    result = {'train_error': error('train'), 'val_error': error('validation'),
              'test_error': error('test'),
              'val_loss': float(-np.mean(val_log_probs[np.arange(len(val_logits)),
                                                       data.easy['validation']]))}
    for name, feature in (('easy', data.easy), ('hard', data.hard)):
      result[f'{name}_probe_error'] = probe_error(
          outputs['probe_train'][1][g], feature['probe_train'],
          outputs['probe_test'][1][g], feature['probe_test'])
    results.append(result)
  return results


def run_points(points: Sequence[dict], data: Data, recipe_kwargs: Optional[dict] = None,
               vmap: bool = False, log=print, label: str = 'easy') -> list[dict]:
  """Trains and evaluates ``points``; returns them with their metrics.

  ``vmap=True`` trains all points of a method as one vmapped program; otherwise one at a time
  with one compiled program per method (faster on a CPU: ``measure_grid_throughput``).
  """
  recipe_kwargs = {**RECIPE, **(recipe_kwargs or {})}
  images, labels = data.images['train'], getattr(data, label)['train']
  records = []
  for method in METHODS:
    mine = [p for p in points if p['method'] == method]
    if not mine:
      continue
    recipe = grid_train.Recipe(method=method, **recipe_kwargs)
    start = time.perf_counter()
    if vmap:
      params, losses = grid_train.train_grid(
          recipe, images, labels, [p['learning_rate'] for p in mine], [p['rho'] for p in mine],
          [p['seed'] for p in mine])
    else:
      trainer = grid_train.compiled_point_trainer(recipe)
      trained = [grid_train.train_point(recipe, images, labels, p['learning_rate'], p['rho'],
                                        p['seed'], trainer=trainer) for p in mine]
      params = jax.tree.map(lambda *xs: np.stack(xs), *[t[0] for t in trained])
      losses = np.stack([t[1] for t in trained])
    jax.block_until_ready(params)
    trained_s = time.perf_counter() - start
    metrics = evaluate(recipe, params, data)
    losses = np.asarray(losses)
    for point, result, loss in zip(mine, metrics, losses):
      records.append({**point, **result, 'final_train_loss': float(np.mean(loss[-10:]))})
    log(f'{method}: {len(mine)} points trained in {trained_s:.0f} s, evaluated in '
        f'{time.perf_counter() - start - trained_s:.0f} s')
  return records


def room_on_the_hard_feature(data: Data, recipe_kwargs: Optional[dict] = None,
                             num_steps: int = 300, seed: int = 0) -> dict:
  """How learnable the hard feature is, beside what SGD learns of it (seed ``seed``).

  ``trained_on_texture_error``: the same conv net trained (SGD) on the texture label of the
  group-balanced ``probe_train`` (the digit does not predict it there), its classification
  error on ``probe_test``. ``random_init_probe_error``: the hard probe on untrained features.
  SGD's hard-probe error far above the first shows room for a method to learn more.
  """
  from samjax.probe import probe_error  # pylint: disable=g-import-not-at-top
  recipe = grid_train.Recipe(method='sgd', **{**RECIPE, **(recipe_kwargs or {}),
                                              'num_steps': num_steps})
  params, _ = grid_train.train_point(recipe, data.images['probe_train'], data.hard['probe_train'],
                                     0.05, 0.0, seed)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], params)
  logits, _ = grid_train.grid_features(recipe, stacked, data.images['probe_test'])
  init = grid_train.make_model(recipe).init(jax.random.key(seed), data.images['train'][:1])
  init = jax.tree.map(lambda x: np.asarray(x)[None], init['params'])
  _, train_features = grid_train.grid_features(recipe, init, data.images['probe_train'])
  _, test_features = grid_train.grid_features(recipe, init, data.images['probe_test'])
  return {
      'trained_on_texture_error': float(np.mean(logits[0].argmax(-1) != data.hard['probe_test'])),
      'random_init_probe_error': probe_error(train_features[0], data.hard['probe_train'],
                                             test_features[0], data.hard['probe_test']),
      'num_steps': num_steps, 'seed': seed}


def summarise(points: Sequence[dict], methods: Sequence[str] = ('sam', 'lsam')) -> dict:
  """``{'paired': [...], 'selected': {...}, 'sgd': {...}}`` from every point of the grid."""
  records = paired.paired_differences(points, DATASET, methods)
  selected = {}
  for method in METHODS:
    if any(p['method'] == method for p in points):
      setting = paired.select(points, method)
      chosen = list(paired.points_at(points, method, setting).values())
      selected[method] = {
          'learning_rate': setting[0], 'rho': setting[1], 'num_seeds': len(chosen),
          **{f'{m}_mean': float(np.mean([p[m] for p in chosen]))
             for m in ('train_error', 'val_error', 'test_error', 'easy_probe_error',
                       'hard_probe_error')},
          'hard_probe_error_std': float(np.std([p['hard_probe_error'] for p in chosen], ddof=1))
          if len(chosen) > 1 else float('nan')}
  return {'paired': records, 'selected': selected}


def report(summary: dict, figure_name: str, wall_s: Optional[float] = None) -> str:
  """Markdown: the selected settings, the paired differences with their intervals, a verdict."""
  lines = [f'# Embedded real-data study: {DATASET}', '',
           'Easy feature: scikit-learn digit 0/1 (the training label); hard feature: texture '
           'class of a 16x16 patch of real photographs (scikit-image: grass+gravel vs brick+moon), '
           'train and probe patches from disjoint tiles. Selection on validation error only.', '',
           '## Selected settings (mean over seeds)', '',
           '| method | lr | rho | seeds | train err | val err | test err | easy probe | '
           'hard probe |', '|---|---|---|---|---|---|---|---|---|']
  for method, s in summary['selected'].items():
    lines.append(f"| {method} | {s['learning_rate']:g} | {s['rho']:g} | {s['num_seeds']} | "
                 f"{s['train_error_mean']:.3f} | {s['val_error_mean']:.3f} | "
                 f"{s['test_error_mean']:.3f} | {s['easy_probe_error_mean']:.3f} | "
                 f"{s['hard_probe_error_mean']:.3f} |")
  room = summary.get('room_on_the_hard_feature')
  if room:
    lines += ['', f"Room on the hard feature: the same net trained on the texture label alone "
              f"(group-balanced data, {room['num_steps']} steps) errs on "
              f"{room['trained_on_texture_error']:.3f} of held-out patches; a hard probe on "
              f"untrained features errs on {room['random_init_probe_error']:.3f}."]
  lines += ['', '## Paired by seed: method minus SGD (Student-t 95 % interval of the mean)', '',
            '| method | metric | mean difference | 95 % CI | verdict |', '|---|---|---|---|---|']
  for r in summary['paired']:
    low, high = r['ci95']
    verdict = ('lower than SGD' if high < 0 else 'higher than SGD' if low > 0
               else 'no difference resolved')
    lines.append(f"| {r['method']} | {r['metric']} | {r['mean']:+.4f} | "
                 f"[{low:+.4f}, {high:+.4f}] | {verdict} |")
  points = summary.get('points', [])
  if points:
    lines += ['', '## Every setting (descriptive: selection never sees the probes)', '',
              'Mean hard-probe error over seeds, and in brackets its mean paired difference to '
              "SGD's selected setting.", '',
              '| method | lr | ' + ' | '.join(f'rho {r:g}' for r in RHOS) + ' |',
              '|---|---|' + '---|' * len(RHOS)]
    sgd = summary['selected'].get('sgd')
    base = ({p['seed']: p['hard_probe_error'] for p in points if p['method'] == 'sgd'
             and p['learning_rate'] == sgd['learning_rate']} if sgd else {})
    for method in METHODS:
      for lr in sorted({p['learning_rate'] for p in points if p['method'] == method}):
        cells = []
        for rho in ((0.0,) if method == 'sgd' else RHOS):
          mine = [p for p in points if (p['method'], p['learning_rate'], p['rho']) ==
                  (method, lr, rho)]
          if not mine:
            cells.append('')
            continue
          hard = np.mean([p['hard_probe_error'] for p in mine])
          diff = np.mean([p['hard_probe_error'] - base[p['seed']] for p in mine
                          if p['seed'] in base]) if base else float('nan')
          cells.append(f'{hard:.3f} ({diff:+.3f})')
        lines.append(f'| {method} | {lr:g} | ' + ' | '.join(cells) + ' |')
  lines += ['', f'![paired differences]({figure_name})']
  if wall_s is not None:
    lines += ['', f'Training and evaluation time, summed over the slices: {wall_s:.0f} s.']
  return '\n'.join(lines) + '\n'


def plot(summary: dict, path: str) -> None:
  """Per metric: every seed's difference (dots) and the mean with its 95 % interval."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from samjax.io_utils import atomic_save_figure  # pylint: disable=g-import-not-at-top
  metrics = list(dict.fromkeys(r['metric'] for r in summary['paired']))
  methods = list(dict.fromkeys(r['method'] for r in summary['paired']))
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for i, method in enumerate(methods):
      r = next(r for r in summary['paired'] if r['method'] == method and r['metric'] == metric)
      ax.plot(np.full(len(r['per_seed_differences']), i) + 0.08, r['per_seed_differences'],
              'o', alpha=0.4, color='grey')
      ax.errorbar([i - 0.08], [r['mean']], yerr=[[r['mean'] - r['ci95'][0]],
                                                   [r['ci95'][1] - r['mean']]],
                  fmt='s', capsize=4, color='C0' if method == 'sam' else 'C1')
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([f'{m.upper()} - SGD' for m in methods])
    ax.set_title(metric.replace('_', ' '))
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)


TINY = dict(learning_rates=(0.05,), rhos=(0.05,), num_seeds=2,
            recipe=dict(num_steps=4, batch_size=50))


def shard_path(out: str, index: int, count: int) -> str:
  """``out`` is a local directory or a URL (gs://...)."""
  return str(epath.Path(out) / 'embedded_points' / f'shard-{index}-of-{count}.json')


def run_study(out: str, shard: tuple[int, int] = (0, 1), merge_only: bool = False,
              budget: str = 'paper', num_seeds: Optional[int] = None,
              data_dir: Optional[str] = None, vmap: bool = False, log=print) -> Optional[dict]:
  """Trains this shard's slice of the grid; merges when every slice's points are in ``out``.

  Each slice writes ``out/embedded_points/shard-i-of-n.json`` (its points and metrics); the
  slice that completes the set (or ``--merge``) writes ``table1.json``, ``table1_embedded.md``
  and ``table1_embedded.png``. Returns the summary when written, else None.
  """
  from samjax.io_utils import atomic_write_text, read_json  # pylint: disable=g-import-not-at-top
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  index, count = shard
  tiny = budget == 'tiny'
  seeds = num_seeds or (TINY['num_seeds'] if tiny else NUM_SEEDS)
  points = grid_points(seeds, TINY['learning_rates'] if tiny else LEARNING_RATES,
                       TINY['rhos'] if tiny else RHOS)
  recipe = TINY['recipe'] if tiny else {}
  if not merge_only:
    mine = sweep.shard_slice(points, index, count)
    path = shard_path(out, index, count)
    if not epath.Path(path).exists():  # a finished slice is not trained again
      data = load_data(data_dir)
      records = run_points(mine, data, recipe, vmap=vmap, log=log)
      room = (room_on_the_hard_feature(data, recipe, num_steps=4 if tiny else 300)
              if index == 0 else None)
      atomic_write_text(path, json.dumps({
          'room_on_the_hard_feature': room,
          'shard': [index, count], 'budget': budget, 'vmap': vmap,
          'recipe': {**RECIPE, **recipe}, 'wall_s': time.perf_counter() - start,
          'points': records}, indent=1))
  slices = [shard_path(out, i, count) for i in range(count)]
  missing = [p for p in slices if not epath.Path(p).exists()]
  if missing:
    if merge_only:
      sweep.usage_error(f'--merge: {len(missing)} of {count} slices are missing, e.g. '
                        f'{missing[0]}; run those shards first.')
    log(f'shard {index}/{count} done; {len(missing)} of {count} slices missing: the table is '
        'written when the last one finishes (or with --merge).')
    return None
  loaded = [read_json(p) for p in slices]
  all_points = [point for part in loaded for point in part['points']]
  summary = summarise(all_points)
  summary.update({'room_on_the_hard_feature': loaded[0].get('room_on_the_hard_feature'),
                  'budget': budget, 'num_seeds': seeds, 'recipe': loaded[0]['recipe'],
                  'slices': count, 'slice_wall_s': [part['wall_s'] for part in loaded],
                  'points': all_points})
  out = epath.Path(out)
  plot(summary, out / 'table1_embedded.png')
  atomic_write_text(out / 'table1.json', json.dumps(summary, indent=1))
  text = report(summary, 'table1_embedded.png', wall_s=sum(summary['slice_wall_s']))
  atomic_write_text(out / 'table1_embedded.md', text)
  log(text)
  return summary

"""The embedded real-data study (issue 22): SGD vs SAM (and LSAM) on ``digits_textures``.

Nothing is downloaded: the easy half is a scikit-learn digit, the hard half a standardised patch
of scikit-image's grass or gravel photograph (:mod:`samjax.data.builders.digits_textures`).
The study's grids, budgets, seeds and its **pre-registered primary endpoint** live in
``configs/digits_textures_study.py``; docs/real_data.md states the design and the result.

* Every grid point ``{method, learning_rate, rho, seed}`` is trained by :mod:`grid_train`
  (seed = initial parameters and example order, shared by every method) and evaluated: the
  trained classifier's validation / test error (the easy digit is the training label), and the
  linear-probe errors of both features (probe fit on ``probe_train``, scored on ``probe_test``,
  :func:`samjax.probe.probe_error`). SGD points also store the hard probe of the *untrained*
  net of their seed.
* Primary endpoint: per seed, the hard-probe error of SAM averaged over the rho grid at the
  pre-registered learning rate minus SGD's at the same learning rate; its 95 % Student-t interval,
  minimum detectable effect and verdict ("improves" / "no gain larger than X" / "cannot tell").
* Secondary rows (each at equal learning rate): every other method / learning rate averaged over
  rho, every single rho, and the rho selected on validation, naming the criterion that decided.
* Baselines (shard 0): hard-probe error of a probe on raw pixels, on the untrained net's
  features, on three hand-made statistics of the hard half, of the net trained on the hard
  feature alone, and of SGD. The study counts as a test only if SGD's probe beats the untrained
  features' (paired interval below 0) and the hand-made statistics do not solve the feature.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath

from experiments import grid_train, load_config, paired

DATASET = 'digits_textures'
BUDGETS = ('cpu', 'paper', 'tiny')
CONFIG_FILE = os.path.join('configs', 'digits_textures_study.py')
EVAL_SPLITS = ('train', 'validation', 'test', 'probe_train', 'probe_test')


def study_config(budget: str = 'cpu', **overrides):
  """The study's config (``configs/digits_textures_study.py:budget``), with ``overrides``."""
  config = load_config(CONFIG_FILE, budget)
  for key, value in overrides.items():
    if value is not None:
      setattr(config, key, tuple(value) if isinstance(value, list) else value)
  return config


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
  from samjax.data.prepare import prepare_once  # pylint: disable=g-import-not-at-top
  builder = prepare_once(DATASET, data_dir)  # shards started at once prepare it once
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


def grid_points(config) -> list[dict]:
  """Every ``{method, learning_rate, rho, seed}`` of the study, in a fixed order."""
  points = []
  for method in config.methods:
    for lr in config.learning_rates:
      for rho in ((0.0,) if method == 'sgd' else config.rhos):
        for seed in range(config.num_seeds):
          points.append({'method': method, 'learning_rate': float(lr), 'rho': float(rho),
                         'seed': seed})
  return points


def recipe_of(config, method: str = 'sgd', num_steps: Optional[int] = None) -> grid_train.Recipe:
  return grid_train.Recipe(method=method, num_steps=num_steps or config.num_steps,
                           batch_size=config.batch_size, momentum=config.momentum,
                           width=config.width)


def easy_fit_step(losses: np.ndarray, window: int = 10, threshold: float = 0.1) -> Optional[int]:
  """First step whose ``window``-step mean batch loss is below ``threshold`` (the digit is fit)."""
  running = np.convolve(np.asarray(losses, np.float64), np.ones(window) / window, 'valid')
  below = np.nonzero(running < threshold)[0]
  return int(below[0] + window - 1) if below.size else None


def hard_probe(features: dict, data: Data, feature: str = 'hard') -> float:
  from samjax.probe import probe_error  # pylint: disable=g-import-not-at-top
  labels = getattr(data, feature)
  return probe_error(features['probe_train'], labels['probe_train'], features['probe_test'],
                     labels['probe_test'])


def evaluate(recipe: grid_train.Recipe, params, data: Data, seeds: Sequence[int]) -> list[dict]:
  """Metrics of every grid point in ``params`` (leading axis ``G``, seeds ``seeds``)."""
  outputs = {s: grid_train.grid_features(recipe, params, data.images[s]) for s in EVAL_SPLITS}
  results = []
  for g in range(len(seeds)):
    error = lambda s: float(np.mean(outputs[s][0][g].argmax(-1) != data.easy[s]))
    val_logits = outputs['validation'][0][g].astype(np.float64)
    val_log_probs = val_logits - np.logaddexp.reduce(val_logits, axis=-1, keepdims=True)
    result = {'train_error': error('train'), 'val_error': error('validation'),
              'test_error': error('test'),
              'val_loss': float(-np.mean(val_log_probs[np.arange(len(val_logits)),
                                                       data.easy['validation']]))}
    features = {s: outputs[s][1][g] for s in ('probe_train', 'probe_test')}
    for name in ('easy', 'hard'):
      result[f'{name}_probe_error'] = hard_probe(features, data, name)
    results.append(result)
  if recipe.method == 'sgd':  # the same seed's untrained net: what training added
    for result, error in zip(results, untrained_probe_errors(recipe, data, seeds)):
      result['untrained_hard_probe_error'] = error
  return results


def untrained_probe_errors(recipe: grid_train.Recipe, data: Data, seeds: Sequence[int]
                           ) -> list[float]:
  """Hard-probe error on the features of each seed's initial parameters."""
  inits = [grid_train.initial_params(recipe, data.images['train'][:1], seed) for seed in seeds]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *inits)
  features = {s: grid_train.grid_features(recipe, stacked, data.images[s])[1]
              for s in ('probe_train', 'probe_test')}
  return [hard_probe({s: f[g] for s, f in features.items()}, data) for g in range(len(seeds))]


def run_points(points: Sequence[dict], data: Data, config, vmap: bool = False,
               log=print) -> list[dict]:
  """Trains and evaluates ``points``; returns them with their metrics.

  ``vmap=True`` trains all points of a method as one vmapped program; otherwise one at a time
  with one compiled program per method (faster on a CPU: ``measure_grid_throughput``).
  """
  images, labels = data.images['train'], data.easy['train']
  records = []
  for method in config.methods:
    mine = [p for p in points if p['method'] == method]
    if not mine:
      continue
    recipe = recipe_of(config, method)
    start = time.perf_counter()
    if vmap:
      params, losses = grid_train.train_grid(
          recipe, images, labels, [p['learning_rate'] for p in mine], [p['rho'] for p in mine],
          [p['seed'] for p in mine])
    else:
      trainer = grid_train.compiled_point_trainer(recipe)
      trained = []
      for i, p in enumerate(mine):
        trained.append(grid_train.train_point(recipe, images, labels, p['learning_rate'],
                                              p['rho'], p['seed'], trainer=trainer))
        if (i + 1) % 8 == 0 and i + 1 < len(mine):
          log(f'{method}: {i + 1} of {len(mine)} points trained '
              f'({time.perf_counter() - start:.0f} s)')
      params = jax.tree.map(lambda *xs: np.stack(xs), *[t[0] for t in trained])
      losses = np.stack([t[1] for t in trained])
    jax.block_until_ready(params)
    trained_s = time.perf_counter() - start
    metrics = evaluate(recipe, params, data, [p['seed'] for p in mine])
    losses = np.asarray(losses)
    for point, result, loss in zip(mine, metrics, losses):
      records.append({**point, **result, 'final_train_loss': float(np.mean(loss[-10:])),
                      'easy_fit_step': easy_fit_step(loss)})
    log(f'{method}: {len(mine)} points trained in {trained_s:.0f} s, evaluated in '
        f'{time.perf_counter() - start - trained_s:.0f} s')
  return records


def hand_made_statistics(images: np.ndarray) -> np.ndarray:
  """``[N, 3]``: std, mean |dx| and mean |dy| of every image's hard (bottom) half."""
  from samjax.data.builders.digits_textures import CELL_SIZE  # pylint: disable=g-import-not-at-top
  hard = np.asarray(images, np.float64)[:, CELL_SIZE:, :, 0]
  return np.stack([hard.std(axis=(1, 2)), np.abs(np.diff(hard, axis=2)).mean(axis=(1, 2)),
                   np.abs(np.diff(hard, axis=1)).mean(axis=(1, 2))], axis=1)


def fixed_baselines(data: Data, config, seed: int = 0) -> dict:
  """The baselines that do not depend on the grid (computed once, by shard 0).

  ``raw_pixels``: a hard probe on the normalised pixels; ``hand_made_statistics``: on
  :func:`hand_made_statistics`; ``trained_on_hard_alone``: the study's net and recipe (SGD at the
  primary learning rate) trained on the texture label of the group-balanced ``probe_train`` (the
  digit does not predict it there), its error on ``probe_test``.
  """
  flat = {s: data.images[s].reshape(len(data.images[s]), -1) for s in ('probe_train', 'probe_test')}
  stats_features = {s: hand_made_statistics(data.images[s]) for s in ('probe_train', 'probe_test')}
  recipe = recipe_of(config, 'sgd')
  params, _ = grid_train.train_point(recipe, data.images['probe_train'], data.hard['probe_train'],
                                     config.primary.learning_rate, 0.0, seed)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], params)
  logits, _ = grid_train.grid_features(recipe, stacked, data.images['probe_test'])
  return {'raw_pixels': hard_probe(flat, data),
          'hand_made_statistics': hard_probe(stats_features, data),
          'trained_on_hard_alone': float(np.mean(logits[0].argmax(-1) != data.hard['probe_test'])),
          'trained_on_hard_alone_seed': seed}


def budget_of(config) -> dict:
  return {'name': config.budget, 'steps': int(config.num_steps), 'width': int(config.width),
          'batch_size': int(config.batch_size), 'num_seeds': int(config.num_seeds)}


def room_check(points: Sequence[dict], fixed: dict, config) -> tuple[dict, dict]:
  """``(baselines, room)``: the five hard-probe errors, and whether the study counts as a test.

  ``room`` holds the paired SGD - untrained interval and the reason when it does not count.
  """
  lr = config.primary.learning_rate
  sgd = {p['seed']: p for p in points
         if p['method'] == 'sgd' and p['learning_rate'] == lr}
  sgd_hard = {s: p['hard_probe_error'] for s, p in sgd.items()}
  untrained = {s: p['untrained_hard_probe_error'] for s, p in sgd.items()}
  learned = paired.paired_record(sgd_hard, untrained, metric='hard_probe_error',
                                 method='sgd', baseline='untrained', lr=lr)
  baselines = {
      'raw_pixels': fixed['raw_pixels'],
      'untrained_features': float(np.mean(list(untrained.values()))),
      'hand_made_statistics': fixed['hand_made_statistics'],
      'trained_on_hard_alone': fixed['trained_on_hard_alone'],
      'sgd': float(np.mean(list(sgd_hard.values()))),
  }
  sgd_learns = learned['ci95'][1] < 0
  not_solved = fixed['hand_made_statistics'] > config.hand_made_solved_below
  reasons = []
  if not sgd_learns:
    reasons.append(f"SGD's hard probe does not beat the untrained features' (SGD - untrained "
                   f"{learned['mean']:+.4f} [{learned['ci95'][0]:+.4f}, "
                   f"{learned['ci95'][1]:+.4f}])")
  if not not_solved:
    reasons.append(f"the hand-made statistics solve the hard feature (error "
                   f"{fixed['hand_made_statistics']:.4f} <= {config.hand_made_solved_below})")
  room = {'sgd_minus_untrained': learned, 'counts_as_test': not reasons,
          'hand_made_solved_below': config.hand_made_solved_below,
          'not_a_test_because': '; '.join(reasons)}
  return baselines, room


def paired_records(points: Sequence[dict], config, counts_as_test: bool = True) -> list[dict]:
  """Every ``method - SGD`` record at equal learning rate; the pre-registered one is primary."""
  primary = config.primary
  budget = {'steps': int(config.num_steps), 'width': int(config.width)}
  methods = [m for m in config.methods if m != 'sgd']
  records = []

  def add(method, lr, rho, selection, method_points, metric, endpoint):
    sgd = {p['seed']: p[metric] for p in points if p['method'] == 'sgd'
           and p['learning_rate'] == lr}
    record = paired.paired_record(
        method_points, sgd, direction='less', paper_effect=config.paper_effect,
        dataset=DATASET, method=method, metric=metric, lr=lr, sgd_lr=lr, rho=rho,
        endpoint=endpoint, selection=selection, budget=budget)
    if endpoint == 'primary' and not counts_as_test:
      record['verdict'] = 'no verdict: the study does not count as a test'
    records.append(record)

  for method in methods:
    for lr in config.learning_rates:
      for metric in paired.PAIRED_METRICS:
        is_primary = (method, lr, metric) == (primary.method, primary.learning_rate,
                                              primary.metric)
        add(method, lr, 'mean over the rho grid', {'rule': 'none: mean over the rho grid'},
            paired.rho_averaged(points, method, lr, metric, config.rhos), metric,
            'primary' if is_primary else 'secondary')
      chosen = paired.select(points, method, learning_rate=lr)
      selection = {'rule': 'validation (val_error, then val_loss, then smaller setting)',
                   'decided_by': chosen['decided_by'], 'tied': chosen['tied'],
                   'tie': chosen['decided_by'] not in ('val_error', 'only setting')}
      for metric in paired.PAIRED_METRICS:
        at = paired.points_at(points, method, chosen['setting'])
        add(method, lr, chosen['setting'][1], selection,
            {s: p[metric] for s, p in at.items()}, metric, 'secondary')
      for rho in config.rhos:
        at = paired.points_at(points, method, (lr, rho))
        add(method, lr, rho, {'rule': f'fixed rho {rho:g}'},
            {s: p['hard_probe_error'] for s, p in at.items()}, 'hard_probe_error', 'secondary')
  return records


def summarise(points: Sequence[dict], fixed: dict, config) -> dict:
  """``table1.json``'s content from every point of the grid and the fixed baselines."""
  from samjax import stats  # pylint: disable=g-import-not-at-top
  baselines, room = room_check(points, fixed, config)
  records = paired_records(points, config, room['counts_as_test'])
  primary = next(r for r in records if r['endpoint'] == 'primary')
  fit_steps = [p['easy_fit_step'] for p in points if p['method'] == 'sgd'
               and p['learning_rate'] == config.primary.learning_rate]
  return {
      'dataset': DATASET, 'budget': budget_of(config),
      'primary_endpoint': config.primary.to_dict(), 'paper_effect': config.paper_effect,
      'paper_effect_name': config.paper_effect_name,
      'baselines': baselines, 'counts_as_test': room['counts_as_test'], 'room': room,
      'primary': primary,
      'power': {'sd': primary['sd'], 'n_seeds': primary['n_seeds'], 'mde': primary['mde'],
                'half_width': (primary['ci95'][1] - primary['ci95'][0]) / 2,
                'seeds_for_half_width_0.02': stats.seeds_for_half_width(primary['sd'], 0.02)
                if primary['sd'] > 0 else 2},
      'sgd_easy_fit_step': {'median': float(np.median([s for s in fit_steps if s is not None]))
                            if any(s is not None for s in fit_steps) else None,
                            'never_fit': sum(s is None for s in fit_steps)},
      'paired': records,
  }


def _fmt_ci(r: dict) -> str:
  return f"{r['mean']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"


def _fmt_mde(r: dict) -> str:
  return f"{r['mde']:.4f}"


def report(summary: dict, figure_name: str, wall_s: Optional[float] = None) -> str:
  """Markdown: the primary endpoint first, the room for the mechanism, then secondary rows."""
  b, p, room = summary['budget'], summary['primary'], summary['room']
  pe = summary['primary_endpoint']
  lines = [f'# Embedded real-data study: {DATASET} ({b["name"]} budget)', '',
           f"Easy feature: scikit-learn digit 0/1 (the training label); hard feature: grass vs "
           f"gravel (standardised 16x16 patches of scikit-image photographs). Conv net width "
           f"{b['width']}, {b['steps']} steps, batch {b['batch_size']}, {b['num_seeds']} seeds.",
           '', '## Primary endpoint (pre-registered in configs/digits_textures_study.py)', '',
           f"{pe['method'].upper()} - SGD hard-probe error, paired by seed at equal learning rate "
           f"{pe['learning_rate']:g}, SAM {pe['rho']}: **{_fmt_ci(p)}** (95 % t interval, "
           f"{p['n_seeds']} seeds, sd {p['sd']:.4f}, MDE at 80 % power {_fmt_mde(p)}).", '']
  if summary['counts_as_test']:
    lines.append(f"Verdict: **{p['verdict']}** (against {summary['paper_effect']:g}, the "
                 f"{summary['paper_effect_name']}).")
  else:
    lines.append(f"Not a test of the claim: {room['not_a_test_because']}. No verdict.")
  bl = summary['baselines']
  lines += ['', '## Room for the mechanism (hard-probe error on probe_test)', '',
            '| raw pixels | untrained features | hand-made statistics | trained on hard alone '
            '| SGD |', '|---|---|---|---|---|',
            f"| {bl['raw_pixels']:.4f} | {bl['untrained_features']:.4f} | "
            f"{bl['hand_made_statistics']:.4f} | {bl['trained_on_hard_alone']:.4f} | "
            f"{bl['sgd']:.4f} |", '',
            f"SGD - untrained features (paired by seed): {_fmt_ci(room['sgd_minus_untrained'])}; "
            f"hand-made statistics count as solving below {room['hand_made_solved_below']:g}. "
            f"counts_as_test: **{summary['counts_as_test']}**. SGD fits the digit at step "
            f"{summary['sgd_easy_fit_step']['median']} (median; 10-step mean batch loss < 0.1).",
            '', '## Secondary rows (method - SGD at equal learning rate)', '',
            '| method | metric | lr | rho | selection | mean [95 % CI] | MDE | verdict |',
            '|---|---|---|---|---|---|---|---|']
  for r in summary['paired']:
    if r['endpoint'] == 'primary':
      continue
    sel = r['selection']
    text = sel['rule'] if 'decided_by' not in sel else (
        f"validation, decided by {sel['decided_by']}" + (' (tie on val_error)' if sel['tie']
                                                         else ''))
    rho = r['rho'] if isinstance(r['rho'], str) else f"{r['rho']:g}"
    lines.append(f"| {r['method']} | {r['metric']} | {r['lr']:g} | {rho} | {text} | "
                 f"{_fmt_ci(r)} | {_fmt_mde(r)} | {r['verdict']} |")
  lines += ['', f'![paired differences]({figure_name})']
  if wall_s is not None:
    lines += ['', f'Training and evaluation time, summed over the slices: {wall_s:.0f} s.']
  return '\n'.join(lines) + '\n'


def plot(summary: dict, path: str) -> None:
  """Per hard-probe row at the primary learning rate: every seed's difference and the interval."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from samjax.io_utils import atomic_save_figure  # pylint: disable=g-import-not-at-top
  lr = summary['primary_endpoint']['learning_rate']
  rows = [r for r in summary['paired'] if r['metric'] == 'hard_probe_error' and r['lr'] == lr]
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.6))
  for i, r in enumerate(rows):
    ax.plot(np.full(len(r['per_seed_differences']), i) + 0.12, r['per_seed_differences'], 'o',
            alpha=0.35, color='grey', ms=3)
    ax.errorbar([i - 0.08], [r['mean']], yerr=[[r['mean'] - r['ci95'][0]],
                                                [r['ci95'][1] - r['mean']]],
                fmt='s', capsize=4, color='C3' if r['endpoint'] == 'primary' else 'C0')
  ax.axhline(0, color='k', lw=0.8)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([f"{r['method']}\n" + (r['rho'].split(' ')[0] if isinstance(r['rho'], str)
                                             else f"rho {r['rho']:g}") for r in rows], fontsize=7)
  ax.set_ylabel(f'hard-probe error, method - SGD (lr {lr:g})')
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)


def shard_path(out: str, index: int, count: int) -> str:
  """``out`` is a local directory or a URL (gs://...)."""
  return str(epath.Path(out) / 'embedded_points' / f'shard-{index}-of-{count}.json')


def run_study(out: str, shard: tuple[int, int] = (0, 1), merge_only: bool = False,
              budget: str = 'cpu', num_seeds: Optional[int] = None,
              data_dir: Optional[str] = None, vmap: bool = False, log=print,
              **overrides) -> Optional[dict]:
  """Trains this shard's slice of the grid; merges when every slice's points are in ``out``.

  Each slice writes ``out/embedded_points/shard-i-of-n.json`` (its points and metrics; slice 0
  also the fixed baselines); the slice that completes the set (or ``--merge``) writes
  ``table1.json``, ``table1_embedded.md`` and ``table1_embedded.png``. ``overrides`` replace
  config fields (tests: a tiny ``num_steps``, ``max_train_examples``, ...). Returns the summary
  when written, else None.
  """
  from samjax.io_utils import atomic_write_text, read_json  # pylint: disable=g-import-not-at-top
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  if budget not in BUDGETS:
    sweep.usage_error(f'--budget={budget}: the embedded study has budgets {", ".join(BUDGETS)}.')
  start = time.perf_counter()
  index, count = shard
  config = study_config(budget, num_seeds=num_seeds, **overrides)
  points = grid_points(config)
  if not merge_only:
    mine = sweep.shard_slice(points, index, count)
    path = shard_path(out, index, count)
    if not epath.Path(path).exists():  # a finished slice is not trained again
      data = load_data(data_dir, config.max_train_examples or None)
      records = run_points(mine, data, config, vmap=vmap, log=log)
      fixed = fixed_baselines(data, config) if index == 0 else None
      atomic_write_text(path, json.dumps({
          'fixed_baselines': fixed, 'shard': [index, count], 'budget': budget_of(config),
          'vmap': vmap, 'config': config.to_dict(), 'wall_s': time.perf_counter() - start,
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
  if any(part['budget'] != budget_of(config) for part in loaded):
    sweep.usage_error(f'{out}: its slices were run with another budget than {budget_of(config)}; '
                      'pass the same --budget/--num_seeds, or use a fresh --out.')
  all_points = [point for part in loaded for point in part['points']]
  summary = summarise(all_points, loaded[0]['fixed_baselines'], config)
  summary.update({'slices': count, 'slice_wall_s': [part['wall_s'] for part in loaded],
                  'points': all_points})
  out = epath.Path(out)
  plot(summary, out / 'table1_embedded.png')
  atomic_write_text(out / 'table1.json', json.dumps(summary, indent=1))
  text = report(summary, 'table1_embedded.png', wall_s=sum(summary['slice_wall_s']))
  atomic_write_text(out / 'table1_embedded.md', text)
  log(text)
  return summary

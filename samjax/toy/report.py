"""``report.json`` and ``report.md``: every toy claim with its interval and verdict.

``report.json`` holds the claims (``{"claims": [{id, figure, regime, head, verdict, n_seeds,
estimate, ci95, per_seed, test}]}``, computed by :mod:`samjax.toy.claims` with
:mod:`samjax.stats`), the regime of every radius, the chaos check and the run's wall time;
``report.md`` is generated from it (plus the figures and the descriptive tables). Appendix H's
studies (noise, batch size) and the sensitivity map keep their earlier rules, with gains
judged by the same paired t interval.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath

from samjax import stats
from samjax.io_utils import atomic_write_text
from samjax.toy import claims as toy_claims
from samjax.toy import metrics as toy_metrics
from samjax.toy import plots

HELD, PARTLY, NOT_HELD, UNTESTED = 'held', 'partly', 'did not hold', 'untestable here'
# Settings where SGD's hard-probe error is below this leave no room to improve on it.
SGD_ROOM = toy_claims.SGD_ROOM
# Fig. 2B: the real ratio counts as flat when its range over the fitting radii is
# within this fraction of its value at the smallest radius.
RATIO_TOLERANCE = 0.2
# The two regimes: LSAM's gain "survives without the flip" when LSAM-noflip keeps
# at least this fraction of it.
SURVIVES = 0.5


# ----------------------------------------------------------------------------- statistics

def paired_gain(baseline: Sequence[dict], treated: Sequence[dict],
                field: str = 'hard_probe_error') -> Optional[dict]:
  """``baseline - treated`` of ``field`` paired by seed: mean, n and ``significant`` (the
  paired 95% t interval excludes 0 on the gain's side, :func:`samjax.stats.paired`)."""
  by_seed = {r['seed']: r[field] for r in baseline if r[field] is not None}
  diffs = [by_seed[r['seed']] - r[field] for r in treated
           if r['seed'] in by_seed and r[field] is not None]
  if len(diffs) < 2:
    return None
  result = stats.paired(diffs, 'greater')
  return dict(mean=result['estimate'], ci95=result['ci95'], n=result['n_seeds'],
              significant=result['verdict'] == 'held')


def _fmt(mean: float, std: float) -> str:
  return f'{mean:.3f} +- {std:.3f}' if np.isfinite(mean) else 'n/a'


def _ms(records, field):
  return _fmt(*plots.mean_std(records, field))


def _best(records: Sequence[dict], knob: str, **kwargs):
  return plots.best_setting(records, knob, **kwargs)


def _gain_text(gain: Optional[dict]) -> str:
  if gain is None:
    return 'n/a'
  return f'{gain["mean"]:+.3f} (95% CI [{gain["ci95"][0]:+.3f}, {gain["ci95"][1]:+.3f}], n={gain["n"]})'


# ----------------------------------------------------------------------------- claims

class Claim:
  """A paper claim, the measured evidence and a verdict."""

  def __init__(self, claim: str, evidence: str, verdict: str):
    self.claim, self.evidence, self.verdict = claim, evidence, verdict


def claims_noise(config, records) -> list[Claim]:
  batch_size = plots.main_batch_size(config)
  noisy = [r for r in records if r['batch_size'] == batch_size
           and (r['label_noise'] or r['gaussian_noise'] or r['dropout'])]
  if not noisy:
    return []
  settings = sorted({(r['label_noise'], r['gaussian_noise'], r['dropout'], r['noise_hard_only'],
                      r['complexity']) for r in noisy})
  won, tested, parts, no_room = 0, 0, [], []
  for label, gauss, drop, hard_only, c in settings:
    same = [r for r in noisy if (r['label_noise'], r['gaussian_noise'], r['dropout'],
                                 r['noise_hard_only'], r['complexity']) ==
            (label, gauss, drop, hard_only, c)]
    sgd = plots.select(same, method='sgd')
    kind = ('label' if label else 'gauss' if gauss else 'dropout')
    name = f'{kind} {label or gauss or drop:g}{" (hard only)" if hard_only else ""}'
    sgd_error = plots.mean_std(sgd, 'hard_probe_error')[0]
    if sgd_error < SGD_ROOM:  # the noise already makes SGD learn the hard feature
      no_room.append(f'{name} (SGD {sgd_error:.3f})')
      continue
    rho, lsam = _best(plots.select(same, method='lsam'), 'rho')
    gain = paired_gain(sgd, lsam) if lsam else None
    tested += 1
    won += bool(gain and gain['significant'])
    parts.append(f'{name}: SGD {sgd_error:.3f}, gain {_gain_text(gain)}')
  evidence = (f'best-rho LSAM beats SGD significantly in {won}/{tested} noisy settings where SGD '
              f'leaves room (SGD error >= {SGD_ROOM:g}). Paired gain: ' + '; '.join(parts))
  if no_room:
    evidence += ('. Excluded, since the noise itself makes SGD learn the hard feature: '
                 + '; '.join(no_room))
  return [Claim('LSAM keeps its advantage under feature noise (App. H.1, Fig. 9)', evidence,
                UNTESTED if not tested else HELD if won == tested else PARTLY if won
                else NOT_HELD)]


def claims_batch_size(config, records) -> list[Claim]:
  sizes = sorted({r['batch_size'] for r in records})
  if len(sizes) < 2:
    return []
  clean = [r for r in records if not (r['label_noise'] or r['gaussian_noise'] or r['dropout'])]
  parts, gains = [], []
  for b in sizes:
    runs = [r for r in clean if r['batch_size'] == b]
    for c in sorted({r['complexity'] for r in runs}):
      sgd = plots.select(runs, method='sgd', complexity=c)
      rho, lsam = _best(plots.select(runs, method='lsam', complexity=c), 'rho')
      gain = paired_gain(sgd, lsam) if lsam else None
      gains.append((b, gain))
      parts.append(f'batch {b}, {c:g} deg: SGD {_ms(sgd, "hard_probe_error")}, best LSAM '
                   f'rho={rho:g} {_ms(lsam, "hard_probe_error")}')
  significant = [b for b, g in gains if g and g['significant']]
  claims = [Claim('LSAM beats SGD across batch sizes (App. H.2, Fig. 10)', '; '.join(parts),
                  HELD if len(significant) == len(gains) else PARTLY if significant else NOT_HELD)]
  first, last = gains[0][1], gains[-1][1]
  if first and last:
    claims.append(Claim('LSAM\'s improvement shrinks at very large batch sizes (App. H.2)',
                        f'gain at batch {sizes[0]}: {first["mean"]:+.3f}; at batch {sizes[-1]}: '
                        f'{last["mean"]:+.3f}',
                        HELD if last['mean'] < first['mean'] else NOT_HELD))
  return claims


# ----------------------------------------------------------------------------- tables

def _probe_table(config, records) -> list[str]:
  runs = plots.clean(records, plots.main_batch_size(config))
  complexities = sorted({r['complexity'] for r in runs
                         if r['method'] in ('sgd', 'lsam', 'lsam_noflip', 'sam')})
  if not complexities:
    return []
  lines = ['| method | rho | ' + ' | '.join(f'hard @ {c:g} deg' for c in complexities)
           + ' | easy (all) | train error (max) |',
           '|---|---|' + '---|' * len(complexities) + '---|---|']
  for method in ('sgd', 'lsam', 'lsam_noflip', 'sam'):
    for rho in sorted({r['rho'] for r in plots.select(runs, method=method)}):
      at = [r for r in plots.select(runs, method=method) if r['rho'] == rho]
      cells = [_ms(plots.select(at, complexity=c), 'hard_probe_error') for c in complexities]
      worst_fit = max(r['train_error'] for r in at)
      lines.append(f'| {method} | {rho:g} | ' + ' | '.join(cells)
                   + f' | {_ms(at, "easy_probe_error")} | {worst_fit:.3f} |')
  return lines


def _diagnostics_table(config, records) -> list[str]:
  runs = plots.clean(records, plots.main_batch_size(config))
  methods = [m for m in ('sgd', 'lsam', 'lsam_noflip') if plots.select(runs, method=m)]
  if not methods:
    return []
  fields = ('phantom_ratio_median', 'phantom_ratio_of_means', 'phantom_ratio_learning',
            'real_ratio_median', 'lr_scale_easy', 'lr_scale_hard', 'lr_scale_easy_normalised',
            'lr_scale_hard_normalised', 'easy_flip_fraction', 'gini_real', 'gini_phantom')
  lines = ['| method | rho | complexity | phantom ratio (median) | phantom ratio (of means) '
           '| phantom ratio (learning phase) | real ratio (median) | v~e/ve | v~h/vh '
           '| scale-free easy | scale-free hard | easy flip fraction | Gini real | Gini phantom '
           '| easy fit step | train error (max) |',
           '|---' * (len(fields) + 5) + '|']
  for method in methods:
    for c in sorted({r['complexity'] for r in runs if r['method'] in methods}):
      for rho in sorted({r['rho'] for r in plots.select(runs, method=method)}):
        at = [r for r in plots.select(runs, method=method, complexity=c) if r['rho'] == rho]
        if not at:
          continue
        cells = [_ms(at, f) for f in fields]
        steps = [r['easy_fit_step'] for r in at]
        cells.append('never' if any(s is None for s in steps) else f'{np.mean(steps):.0f}')
        cells.append(f'{max(r["train_error"] for r in at):.3f}')
        lines.append(f'| {method} | {rho:g} | {c:g} | ' + ' | '.join(cells) + ' |')
  return lines


def _intervention_table(config, records) -> list[str]:
  runs = plots.clean(records, plots.main_batch_size(config))
  methods = [m for m in ('iw_only', 'lr_only', 'iw_lr') if plots.select(runs, method=m)]
  if not methods:
    return []
  lines = ['| complexity | c | ' + ' | '.join(methods) + ' |', '|---|---|' + '---|' * len(methods)]
  for c in sorted({r['complexity'] for m in methods for r in plots.select(runs, method=m)}):
    for ratio in sorted({r['fixed_ratio'] for m in methods for r in plots.select(runs, method=m)}):
      cells = [_ms([r for r in plots.select(runs, method=m, complexity=c)
                    if r['fixed_ratio'] == ratio], 'hard_probe_error') for m in methods]
      lines.append(f'| {c:g} | {ratio:g} | ' + ' | '.join(cells) + ' |')
  return lines


# ----------------------------------------------------------------------------- sensitivity

def _at_length(records: Sequence[dict], index: int) -> list[dict]:
  """The records as they stood after evaluation ``index`` (probe and training error)."""
  return [dict(r, hard_probe_error=r['hard_probe_error_curve'][index],
               train_error=r['train_error_curve'][index]) for r in records]


def sensitivity_cells(config, records) -> list[dict]:
  """Per variant, complexity and training length: the claims of the map.

  ``sgd_fails``: SGD's hard-probe error >= 0.2; ``lsam_gains``: the best radius that fits
  the training set (at that length) beats SGD by more than two standard errors (paired
  by seed); ``survives``: LSAM-noflip at that radius keeps >= SURVIVES of the gain. At the
  full length also ``phantom_rises`` (Spearman >= 0.7 over >= 3 fitting radii, median
  ratios), ``real_flat`` (range <= RATIO_TOLERANCE) and ``hard_up`` (scale-free
  v~_hard/v_hard > 1 in every LSAM run at a fitting radius).
  """
  batch_size = plots.main_batch_size(config)
  runs = [r for r in records if r['batch_size'] == batch_size and not r['label_noise']
          and not r['gaussian_noise'] and not r['dropout']]
  eval_every, num_steps = int(config.eval_every), int(config.num_steps)
  lengths = tuple(config.sensitivity_steps) or (num_steps,)
  cells = []
  variant_names = list(dict.fromkeys(r['variant'] for r in runs))
  for variant in variant_names:
    for c in sorted({r['complexity'] for r in runs if r['variant'] == variant}):
      at_c = [r for r in runs if r['variant'] == variant and r['complexity'] == c]
      for length in lengths:
        now = _at_length(at_c, length // eval_every - 1)
        sgd = plots.select(now, method='sgd')
        lsam = plots.select(now, method='lsam')
        rho, best = _best(lsam, 'rho')
        gain = paired_gain(sgd, best) if best else None
        noflip = [r for r in plots.select(now, method='lsam_noflip') if r['rho'] == rho]
        gain_noflip = paired_gain(sgd, noflip) if noflip else None
        fitting = plots.fitting_values(lsam, 'rho')
        cell = dict(variant=variant, complexity=c, steps=length, rho=rho,
                    sgd_error=plots.mean_std(sgd, 'hard_probe_error')[0],
                    lsam_error=plots.mean_std(best, 'hard_probe_error')[0],
                    gain=gain, gain_noflip=gain_noflip, fitting=fitting,
                    sgd_fails=plots.mean_std(sgd, 'hard_probe_error')[0] >= 0.2,
                    lsam_gains=bool(gain and gain['significant'] and rho in fitting))
        cell['share'] = (gain_noflip['mean'] / gain['mean']
                         if cell['lsam_gains'] and gain_noflip else None)
        cell['survives'] = cell['share'] is not None and cell['share'] >= SURVIVES
        if length == num_steps:
          fit_runs = [r for r in at_c if r['method'] == 'lsam' and r['rho'] in fitting]
          if len(fitting) >= 3:
            rhos, phantom, _ = plots.curve(fit_runs, 'rho', 'phantom_ratio_median')
            _, real, _ = plots.curve(fit_runs, 'rho', 'real_ratio_median')
            cell['phantom_rises'] = toy_metrics.spearman(rhos, phantom) >= 0.7
            cell['real_flat'] = (real.max() - real.min()) / abs(real[0]) <= RATIO_TOLERANCE
          cell['hard_up'] = bool(fit_runs) and all(
              (r['lr_scale_hard_normalised'] or 0) > 1 for r in fit_runs)
        cells.append(cell)
  return cells


SENSITIVITY_CLAIMS = (
    ('sgd_fails', 'SGD fails on the spiral (hard-probe error >= 0.2)'),
    ('lsam_gains', 'LSAM at a fitting radius beats SGD (paired 95% t interval > 0)'),
    ('survives', f'LSAM-noflip keeps >= {SURVIVES:.0%} of that gain'),
    ('phantom_rises', 'phantom ratio rises with rho over >= 3 fitting radii (Spearman >= 0.7)'),
    ('real_flat', f'real ratio flat over the fitting radii (range <= {RATIO_TOLERANCE:.0%})'),
    ('hard_up', 'scale-free v~_hard/v_hard > 1 in every fitting LSAM run'),
)


def sensitivity_section(config, records) -> list[str]:
  """The map of where each claim holds, as markdown (empty without a sensitivity sweep)."""
  cells = sensitivity_cells(config, records)
  variant_names = list(dict.fromkeys(c['variant'] for c in cells))
  if len(variant_names) < 2:
    return []
  lengths = sorted({c['steps'] for c in cells})
  lines = ['## Sensitivity: where each claim holds', '',
           'One knob at a time moved away from the defaults (`default`); every claim judged '
           'by the rules above, per complexity and training length (probe and training errors '
           f'read off the curves at {", ".join(map(str, lengths))} steps; the ratio claims at '
           'the full length only). y = held, n = did not, - = not testable (fewer than 3 '
           'fitting radii, or no significant gain to share).', '',
           '| claim | ' + ' | '.join(variant_names) + ' |',
           '|---' * (len(variant_names) + 1) + '|']
  for key, name in SENSITIVITY_CLAIMS:
    row = []
    for variant in variant_names:
      marks = []
      for cell in (c for c in cells if c['variant'] == variant):
        if key not in cell or (key == 'survives' and not cell['lsam_gains']):
          continue
        marks.append(f'{cell["complexity"]:g}@{cell["steps"]}:{"y" if cell[key] else "n"}')
      held = sum(m.endswith('y') for m in marks)
      row.append(f'{held}/{len(marks)} ({", ".join(m for m in marks if m.endswith("y"))})'
                 if marks else '-')
    lines.append(f'| {name} | ' + ' | '.join(row) + ' |')
  lines += ['', 'Per cell: SGD hard-probe error, best fitting LSAM radius and its paired gain '
            '(* = significant), share kept by LSAM-noflip.', '',
            '| variant | complexity | ' + ' | '.join(f'{n} steps' for n in lengths) + ' |',
            '|---|---|' + '---|' * len(lengths)]
  for variant in variant_names:
    for complexity in sorted({c['complexity'] for c in cells if c['variant'] == variant}):
      row = []
      for length in lengths:
        cell = next(c for c in cells if c['variant'] == variant
                    and c['complexity'] == complexity and c['steps'] == length)
        gain = cell['gain']
        text = f'SGD {cell["sgd_error"]:.2f}; '
        text += (f'rho {cell["rho"]:g}: {gain["mean"]:+.3f}{"*" if cell["lsam_gains"] else ""}'
                 if gain else 'no LSAM')
        if cell['share'] is not None:
          text += f', noflip {cell["share"]:.0%}'
        row.append(text)
      lines.append(f'| {variant} | {complexity:g} | ' + ' | '.join(row) + ' |')
  return lines + ['']


# ----------------------------------------------------------------------------- the report

def _main_runs(config, records) -> list[dict]:
  """The main stage's runs on clean data at the first batch size, every head."""
  batch_size = plots.main_batch_size(config)
  return [r for r in records if r['batch_size'] == batch_size and r.get('stage', 'main') == 'main'
          and not (r['label_noise'] or r['gaussian_noise'] or r['dropout'])
          and r.get('variant', 'default') == 'default']


def _legacy(claim: Claim, id_: str, head: str) -> dict:
  """An Appendix H claim (earlier rules, gains by the paired t interval) as a record."""
  verdict = {'not tested': toy_claims.UNTESTABLE}.get(claim.verdict, claim.verdict)
  return toy_claims.claim(id_, 'H', 'all', head, verdict, f'{claim.claim}: {claim.evidence}')


def build_report(config, outputs, records, *, train_time_s: float, wall_time_s: float) -> dict:
  """The content of ``report.json``: claims, regimes, chaos check, run facts."""
  runs = _main_runs(config, records)
  heads = list(dict.fromkeys(r['head'] for r in runs))
  all_cells = toy_claims.cells(runs)
  rebatched = [r for r in records if r.get('stage') == 'rebatch']
  chaos = toy_claims.chaos_summary(runs, rebatched)
  flip_spreads = [c['spread'] for c in chaos if c['regime'] == 'flip' and c['spread'] is not None]
  spread = max(flip_spreads) if flip_spreads else None
  claims = []
  if all_cells and any(c.sgd for c in all_cells):
    gains = toy_claims.gain_claims(all_cells, spread)
    claims += gains
    claims += toy_claims.ratio_slope_claims(all_cells, heads)
    claims += toy_claims.scale_claims(all_cells, heads)
    main_records = records[:len(outputs.rows)]
    in_runs = {id(r) for r in runs}  # Fig. 5 indexes outputs by the main stage's clean runs
    fig5, fig5_table = toy_claims.fig5_claims(
        all_cells, heads, outputs,
        [r if id(r) in in_runs else dict(r, method='other') for r in main_records])
    claims += fig5
    claims += toy_claims.share_claims(all_cells, runs, gains)
    claims += toy_claims.intervention_claims(runs, heads)
    if any(r['method'] == 'iw_lr' for r in runs):
      claims += toy_claims.eq10_claims(gains, runs, [r for r in records
                                                     if r.get('stage') == 'eq10'])
  else:
    fig5_table = []
  head = heads[0] if heads else ('random' if config.head_random else 'constant')
  legacy = claims_noise(config, records) + claims_batch_size(config, records)
  claims += [_legacy(c, f'appH-{k}', head) for k, c in enumerate(legacy)]
  return {
      'claims': claims,
      'regimes': toy_claims.regimes_table(all_cells),
      'chaos': {'cells': chaos, 'flip_spread': spread},
      'fig5_cells': fig5_table,
      'rules': {'sgd_room': toy_claims.SGD_ROOM, 'max_train_error': toy_claims.MAX_TRAIN_ERROR,
                'match_margin': toy_claims.MATCH_MARGIN, 'share': toy_claims.SHARE,
                'interval': 'paired Student-t 95% over seeds (samjax.stats.paired)'},
      'run': {'command': 'python -m samjax.main --config=configs/toy.py'
                         + ('' if config.name == 'main' else f':{config.name}'),
              'runs': len(records), 'seeds': len(tuple(config.seeds)),
              'wall_time_s': wall_time_s, 'train_time_s': train_time_s,
              'machine': f'{os.cpu_count()} CPU cores, {jax.device_count()} '
                         f'{jax.default_backend()} device(s), {platform.machine()}'},
  }


def _num(x, digits: int = 3) -> str:
  return '-' if x is None else f'{x:+.{digits}f}'


def markdown(config, report: dict, figures: Sequence[str], records) -> str:
  """``report.md`` from the content of ``report.json`` (plus figures and tables)."""
  run = report['run']
  lines = [
      f'# Toy study ({config.name}): SAM balances feature learning',
      '',
      'Springer, Nagarajan, Raghunathan, *Sharpness-Aware Minimization Enhances Feature Quality '
      'via Balanced Learning*, ICLR 2024, Sections 5-6 and Appendix H, reproduced with '
      '`samjax.toy` (`docs/toy.md` gives the constants we chose and why). Generated from '
      '`report.json`.',
      '',
      f'- command: `{run["command"]}`; {run["runs"]} runs, {run["seeds"]} seeds; complexities '
      f'{tuple(config.complexities)} deg; LSAM radii {tuple(config.rhos)}'
      + (' in units of ||v0||' if config.rho_unit == 'initial_head' else '')
      + f'; heads {tuple(config.heads) or ("random" if config.head_random else "constant",)}',
      f'- training: {config.num_steps} steps, lr {config.learning_rate}, batch '
      f'{tuple(config.batch_sizes) or config.batch_size}, {config.num_train} points, width '
      f'{config.hidden}; probes fitted on {config.num_probe} fresh points, rho and c chosen on '
      f'another {config.num_probe} (validation), scored on a third {config.num_probe} (test)',
      f'- wall time: {run["wall_time_s"]:.0f} s ({run["train_time_s"]:.0f} s compiling and '
      f'training) on {run["machine"]}',
      '',
      '## Claims',
      '',
      'Each verdict is computed from per-seed values by `samjax.stats`: "held" = the paired 95% '
      'Student-t interval excludes 0 in the claimed direction; "did not hold" = it excludes the '
      'claimed direction; "cannot tell" = neither; "untestable here" = the premise is missing '
      f'(SGD validation error < {toy_claims.SGD_ROOM:g}, no radius of the regime fits, or '
      'LSAM did not beat SGD); "unresolved" = a flip-regime verdict within the re-batching '
      'spread. Regimes: flip_free = radii at which no step of any seed flips the sign of '
      'v~_easy or v~_hard; flip = the others.',
      '',
      '| id | regime | head | verdict | estimate | 95% CI | n | test |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for c in report['claims']:
    ci = '-' if c['ci95'] is None else f'[{c["ci95"][0]:+.4f}, {c["ci95"][1]:+.4f}]'
    lines.append(f'| {c["id"]} | {c["regime"]} | {c["head"]} | **{c["verdict"]}** | '
                 f'{_num(c["estimate"], 4)} | {ci} | {c["n_seeds"] or "-"} | '
                 f'{c["test"].replace("|", chr(92) + "|")} |')
  detailed = [c for c in report['claims'] if c.get('details')]
  if detailed:
    lines += ['', '### Per-cell numbers', '']
    for c in detailed:
      lines += [f'- **{c["id"]}**: ' + '; '.join(c['details'])]
  if report['regimes']:
    lines += ['', '## Regimes', '', 'Per head, complexity and radius (rho in units of ||v0||): '
              'the fraction of steps in which v~ flips a feature\'s sign (min-max over seeds).',
              '', '| head | complexity | rho | rho (absolute) | regime | easy flips | hard flips '
              '| every seed fits |', '|---|---|---|---|---|---|---|---|']
    for r in report['regimes']:
      lines.append(f'| {r["head"]} | {r["complexity"]:g} | {r["rho"]:g} | '
                   f'{r["rho_absolute"][0]:.3f}-{r["rho_absolute"][1]:.3f} | {r["regime"]} | '
                   f'{r["easy_flip_fraction"][0]:.3f}-{r["easy_flip_fraction"][1]:.3f} | '
                   f'{r["hard_flip_fraction"][0]:.3f}-{r["hard_flip_fraction"][1]:.3f} | '
                   f'{"yes" if r["fits"] else "no"} |')
  if report['chaos']['cells']:
    lines += ['', '## Chaos check', '', 'The same runs re-run as a vmapped batch of their own '
              '(another batch composition): the change of each seed\'s hard-probe test error.', '']
    for c in report['chaos']['cells']:
      lines.append(f'- {c["head"]} head, {c["complexity"]:g} deg, rho/||v0|| {c["rho"]:g} '
                   f'({c["regime"]}): largest change {c["spread"]:.4f}; per seed '
                   + ', '.join(f'{d:+.4f}' for d in c['per_seed']))
  if report['fig5_cells']:
    lines += ['', '## Fig. 5 per cell', '', 'OLS of log(lambda~/lambda) on the signed '
              'contributions (s_e, s_h) per seed, full-batch phantom; mean over seeds [95% CI]; '
              'the identity check 1 - r_k (r_k = v~_k / v_k of the same snapshots) is what the '
              'coefficients equal where the weights saturate.', '',
              '| head | regime | window | complexity | rho | beta_e | 1 - r_e | beta_h | 1 - r_h '
              '| contrast (s_e - s_h) | min R^2 |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in report['fig5_cells']:
      ci = lambda k: '' if r[k + '_ci95'] is None else (
          f' [{r[k + "_ci95"][0]:+.3f}, {r[k + "_ci95"][1]:+.3f}]')
      lines.append(f'| {r["head"]} | {r["regime"]} | {r["window"]} | {r["complexity"]:g} | '
                   f'{r["rho"]:g} | {r["easy"]:+.3f}{ci("easy")} | {r["identity_easy"]:+.3f} | '
                   f'{r["hard"]:+.3f}{ci("hard")} | {r["identity_hard"]:+.3f} | '
                   f'{r["contrast"]:+.3f}{ci("contrast")} | {r["r2_min"]:.3f} |')
  lines += ['', '## Figures', '', 'Figures show the first head of the sweep (constant) and the '
            'main stage; the claims above judge both heads.', '']
  for path in figures:
    name = epath.Path(path).name
    lines += [f'### {name}', '', f'![{name}]({name})', '']
  lines += sensitivity_section(config, records)
  for title, table in (('Probe errors (clean data, first head; test probe)',
                        _probe_table(config, records)),
                       ('Phantom diagnostics (first head)', _diagnostics_table(config, records)),
                       ('Interventions: hard-probe test error (first head)',
                        _intervention_table(config, records))):
    if table:
      lines += [f'## {title}', ''] + table + ['']
  return '\n'.join(lines) + '\n'


def write_report(config, outputs, records, figures: Sequence[str], workdir: str, *,
                 train_time_s: float, wall_time_s: float) -> str:
  """Writes ``report.json`` and, from it, ``report.md`` into ``workdir``; returns the
  path of ``report.md``."""
  report = build_report(config, outputs, records, train_time_s=train_time_s,
                        wall_time_s=wall_time_s)
  atomic_write_text(epath.Path(workdir) / 'report.json',
                    json.dumps(report, indent=1, allow_nan=False))
  path = epath.Path(workdir) / 'report.md'
  atomic_write_text(path, markdown(config, report, figures, records))
  return str(path)

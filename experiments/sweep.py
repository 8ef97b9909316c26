"""Grids of real-data runs: resumable, selected on validation error, aggregated over seeds.

Each run lives in its own workdir (``<root>/<tag>/<method>_lr<lr>_rho<rho>_seed<seed>``) and is
an ordinary :func:`samjax.train.train_and_evaluate` run, so an interrupted grid resumes: finished
runs (their ``probe.json`` exists) are read back, an interrupted run resumes from its checkpoint.
``rho = 0`` is SGD, ``rho > 0`` SAM. For each method the learning rate (and for SAM rho) with the
lowest validation error averaged over seeds is selected; the table reports mean +- std over seeds
of the selected setting.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import sys
from typing import Iterable, Optional, Sequence

import numpy as np
from etils import epath

from experiments import load_config
from samjax import cli
from samjax.io_utils import atomic_save_figure, atomic_write_text, read_json


@dataclasses.dataclass(frozen=True)
class Run:
  tag: str  # the table row, e.g. 'cifar_mnist' or 'pacs/sketch'
  config_file: str  # configs/NAME.py
  config_arg: Optional[str]
  learning_rate: float
  rho: float
  seed: int

  @property
  def method(self) -> str:
    return 'sgd' if self.rho == 0 else 'sam'

  def workdir(self, root: str) -> str:
    """``root`` is a local directory or a URL (gs://...): paths go through etils.epath."""
    return str(epath.Path(root) / self.tag.replace('/', '_') /
               f'{self.method}_lr{self.learning_rate:g}_rho{self.rho:g}_seed{self.seed}')


def grid(tag: str, config_file: str, config_arg: Optional[str], learning_rates: Sequence[float],
         rhos: Sequence[float], seeds: Sequence[int]) -> list[Run]:
  return [Run(tag, config_file, config_arg, lr, rho, seed)
          for lr, rho, seed in itertools.product(learning_rates, rhos, seeds)]


def run_config(run: Run, overrides: dict):
  return load_config(run.config_file, run.config_arg, {
      'optimizer.name': run.method, 'optimizer.learning_rate': run.learning_rate,
      'optimizer.rho': run.rho, 'seed': run.seed, **overrides})


def parse_shard(text: str) -> tuple[int, int]:
  """``'i/n'`` -> ``(i, n)`` with ``0 <= i < n``; ValueError naming the flag otherwise."""
  parts = str(text).split('/')
  if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
    index, count = int(parts[0]), int(parts[1])
    if 0 <= index < count:
      return index, count
  raise ValueError(f'--shard={text}: expected i/n with integers 0 <= i < n (e.g. --shard=0/4).')


def shard_slice(items: Sequence, index: int, count: int) -> list:
  """The ``index``-th of ``count`` interleaved slices (``items[index::count]``).

  Interleaving spreads every method and setting over the slices, so slices take similar times.
  """
  return list(items)[index::count]


def usage_error(message: str) -> None:
  """Bad command-line input: one line on stderr, exit status 2, nothing written."""
  script = os.path.splitext(os.path.basename(sys.argv[0]))[0]  # table1, table2
  cli.fail(f'experiments.{script}', message)


def finished_records(runs: Iterable[Run], root: str) -> tuple[list[dict], int]:
  """``(records of the finished runs, number of unfinished runs)`` read from their workdirs."""
  records, missing = [], 0
  for run in runs:
    probe_path = epath.Path(run.workdir(root)) / 'probe.json'
    if not probe_path.exists():
      missing += 1
      continue
    result = read_json(probe_path)
    records.append({**dataclasses.asdict(run), 'method': run.method, **result})
  return records, missing


def run_grid(runs: Iterable[Run], root: str, overrides: Optional[dict] = None) -> list[dict]:
  """Runs every run not finished yet; returns one record per run (its probe.json plus keys)."""
  from samjax import train  # pylint: disable=g-import-not-at-top
  runs = list(runs)
  for run in runs:
    workdir = run.workdir(root)
    if not (epath.Path(workdir) / 'probe.json').exists():
      result = train.train_and_evaluate(run_config(run, overrides or {}), workdir)
      if 'preempted_at_step' in result:
        raise SystemExit(f'preempted in {workdir}; rerun the same command to resume the grid')
  return finished_records(runs, root)[0]


def run_shard_and_merge(runs: Sequence[Run], root: str, overrides: Optional[dict], shard: str,
                        merge_only: bool) -> Optional[list[dict]]:
  """Runs this shard's slice of ``runs`` (all of them unless ``--merge``).

  Returns every run's record when the whole grid is finished (whichever shard finishes last
  merges: the slices share ``root``), else None after saying how many runs are missing.
  """
  index, count = parse_shard(shard)
  if not merge_only:
    run_grid(shard_slice(runs, index, count), root, overrides)
  records, missing = finished_records(runs, root)
  if missing:
    if merge_only:
      usage_error(f'--merge: {missing} of {len(runs)} runs under {root} are not finished; '
                  'run the missing shards first.')
    print(f'shard {index}/{count} done; {missing} of {len(runs)} runs of the grid are not '
          'finished yet: the tables are written when the last shard finishes (or with --merge).')
    return None
  return records


def select_and_aggregate(records: list[dict], metrics: Sequence[str]) -> list[dict]:
  """Per (tag, method): the setting with the lowest mean validation error; mean/std over seeds."""
  rows = []
  for (tag, method) in sorted({(r['tag'], r['method']) for r in records}):
    mine = [r for r in records if r['tag'] == tag and r['method'] == method]
    settings = sorted({(r['learning_rate'], r['rho']) for r in mine})
    by_setting = {s: [r for r in mine if (r['learning_rate'], r['rho']) == s] for s in settings}
    best = min(settings, key=lambda s: (np.mean([r['val_error'] for r in by_setting[s]]), s))
    chosen = by_setting[best]
    row = {'tag': tag, 'method': method, 'learning_rate': best[0], 'rho': best[1],
           'num_seeds': len(chosen)}
    for metric in metrics:
      values = [r[metric] for r in chosen if metric in r]
      row[f'{metric}_mean'] = float(np.mean(values)) if values else float('nan')
      row[f'{metric}_std'] = float(np.std(values)) if values else float('nan')
    rows.append(row)
  return rows


def write_table(rows: list[dict], metrics: Sequence[str], out_dir: str, name: str,
                paper: Optional[dict] = None, scale: float = 1.0, title: str = '',
                footer: Sequence[str] = ()) -> str:
  """Writes ``<name>.md`` and ``<name>.csv``; ``paper`` maps (tag, method) -> {metric: value}."""
  out_dir = epath.Path(out_dir)  # local or gs://
  out_dir.mkdir(parents=True, exist_ok=True)
  fieldnames = list(rows[0].keys()) if rows else []
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fieldnames + (['paper'] if paper else []))
  writer.writeheader()
  for row in rows:
    extra = {'paper': json.dumps(paper.get((row['tag'], row['method']), {}))} if paper else {}
    writer.writerow({**row, **extra})
  atomic_write_text(out_dir / f'{name}.csv', buffer.getvalue())
  header = ['data', 'method', 'lr', 'rho', 'seeds'] + list(metrics)
  if paper:
    header += [f'paper {m}' for m in metrics]
  lines = [f'# {title or name}', '', '| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for row in rows:
    cells = [row['tag'], row['method'], f"{row['learning_rate']:g}", f"{row['rho']:g}",
             str(row['num_seeds'])]
    cells += [f"{scale * row[f'{m}_mean']:.3f} +- {scale * row[f'{m}_std']:.3f}" for m in metrics]
    if paper:
      reported = paper.get((row['tag'], row['method']), {})
      cells += [f'{reported[m]:.3f}' if m in reported else 'n/a' for m in metrics]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if footer:
    lines += [''] + list(footer)
  text = '\n'.join(lines) + '\n'
  atomic_write_text(out_dir / f'{name}.md', text)
  return text


def verdicts(rows: list[dict], metric: str, higher_is_better: bool = False) -> list[str]:
  """One line per data set: does SAM beat SGD on ``metric`` (the means of the selected runs)?"""
  lines = []
  for tag in sorted({r['tag'] for r in rows}):
    by = {r['method']: r for r in rows if r['tag'] == tag}
    if {'sgd', 'sam'} <= set(by):
      sgd, sam = by['sgd'][f'{metric}_mean'], by['sam'][f'{metric}_mean']
      better = sam > sgd if higher_is_better else sam < sgd
      held = 'holds' if better else 'does NOT hold'
      relation = '>' if higher_is_better else '<'
      lines.append(f'- {tag}: SAM {metric} {sam:.3f} vs SGD {sgd:.3f}: '
                   f'SAM {relation} SGD {held}.')
  return lines


def plot_table(rows: list[dict], metrics: Sequence[str], path: str, ylabel: str) -> None:
  """Grouped bars (mean +- std) per data set, SGD beside SAM, one panel per metric."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tags = sorted({r['tag'] for r in rows})
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for j, method in enumerate(('sgd', 'sam')):
      mine = {r['tag']: r for r in rows if r['method'] == method}
      xs = [i + (j - 0.5) * 0.38 for i, t in enumerate(tags) if t in mine]
      means = [mine[t][f'{metric}_mean'] for t in tags if t in mine]
      stds = [mine[t][f'{metric}_std'] for t in tags if t in mine]
      ax.bar(xs, means, width=0.38, yerr=stds, capsize=3, label=method.upper())
    ax.set_xticks(range(len(tags)))
    ax.set_xticklabels(tags, rotation=20, ha='right')
    ax.set_title(metric.replace('_', ' '))
    ax.set_ylabel(ylabel)
    ax.legend()
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)

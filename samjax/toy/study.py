"""The toy study (Springer et al., 2024, Sections 5-6, Appendix H) as whole vmapped sweeps.

``run(config, workdir)`` trains every run the config asks for and writes
``results.json``, the figures and ``report.md`` into ``workdir``:

1. :func:`samjax.config.validate_config` (the toy's fields, ranges and rules are declared in
   ``samjax/config.py``) rejects a bad config with a one-line ``ValueError`` before anything
   is compiled.
2. :func:`build_rows` expands the config into a flat list of runs
   (:class:`RunRow`): method x radius or fixed ratio x complexity x noise
   setting x batch size x seed.
3. :func:`run_sweep` groups the runs by what changes the compiled program
   (the method and the batch size), and runs each group as *one* vmapped,
   jitted program: radius, ratio, complexity, seed and noise levels are traced
   array inputs. Steps run in ``lax.scan`` chunks of ``config.eval_every``;
   between chunks the host updates a tqdm bar, so a group compiles its init
   and its chunk function once, whatever the number of runs or chunks.
4. :func:`summarize` reduces each run to the numbers of ``results.json``.

Results are a pure function of the config: every random draw comes from
``fold_in(key(config.seed), run seed)``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import threading
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from samjax import config as config_lib
from samjax import diagnostics
from samjax.io_utils import atomic_write_text, is_local
from samjax.toy import data as toy_data
from samjax.toy import metrics as toy_metrics
from samjax.toy import train as toy_train

METHODS = toy_train.METHODS
INTERVENTIONS = tuple(toy_train.INTERVENTIONS)


@dataclasses.dataclass(frozen=True)
class RunRow:
  """One run of the study; ``rho`` is None for interventions, ``fixed_ratio`` for the rest."""

  method: str
  rho: Optional[float]
  fixed_ratio: Optional[float]
  complexity: float
  seed: int
  batch_size: int
  label_noise: float = 0.0
  gaussian_noise: float = 0.0
  dropout: float = 0.0
  noise_hard_only: bool = False
  # The sensitivity study's knobs (their config values in the main study).
  variant: str = 'default'
  learning_rate: float = 0.05
  head_init: float = 1.0
  head_random: bool = False
  data: toy_data.ToyDataConstants = toy_data.ToyDataConstants()
  # rho in units of the initial head length ||v_0|| (config.rho_unit = 'initial_head').
  rho_relative: bool = False
  # 'main': the config's sweep; 'eq10': Eq. 10 at a seed's measured LSAM ratio;
  # 'rebatch': a cell re-run in another vmapped batch (the chaos check).
  stage: str = 'main'
  # Eq. 10 runs: the LSAM radius whose measured ratio set fixed_ratio.
  lsam_rho: Optional[float] = None

  @property
  def head(self) -> str:
    return 'random' if self.head_random else 'constant'

  @property
  def noisy(self) -> bool:
    return bool(self.label_noise or self.gaussian_noise or self.dropout)

  @property
  def program(self) -> str:
    return toy_train.PROGRAMS[self.method]


_tuple = config_lib.as_tuple


# ----------------------------------------------------------------------------- the sweep

def noise_settings(config) -> list[tuple[float, float, float, bool]]:
  """``(label_noise, gaussian_noise, dropout, hard_only)`` settings: clean data, then
  every non-zero level of each corruption alone, for each ``hard_only`` value."""
  settings = [(0.0, 0.0, 0.0, False)]
  for position, name in enumerate(('label_noise', 'gaussian_noise', 'dropout')):
    for hard_only in _tuple(config.noise.hard_only):
      for level in _tuple(config.noise[name]):
        if level > 0:
          setting = [0.0, 0.0, 0.0, bool(hard_only)]
          setting[position] = float(level)
          settings.append(tuple(setting))
  return settings


def data_constants(config, **overrides) -> toy_data.ToyDataConstants:
  values = {k: float(config.data[k]) for k in toy_data.ToyDataConstants._fields}
  values.update({k: float(v) for k, v in overrides.items()})
  return toy_data.ToyDataConstants(**values)


def variants(config) -> list[tuple[str, dict]]:
  """``(name, knob values)`` of every setting of the sweep: the config's own
  (``'default'``), then, for the sensitivity study, each value of each knob of
  ``config.sensitivity`` with every other knob at its default (one factor at a time)."""
  defaults = dict(learning_rate=float(config.learning_rate), head_init=float(config.head_init),
                  head_random=bool(config.head_random), data=data_constants(config))
  settings = [('default', defaults)]
  for knob, values in config.sensitivity.items():
    for value in _tuple(values):
      if knob in toy_data.ToyDataConstants._fields:
        changed = dict(defaults, data=data_constants(config, **{knob: value}))
      else:
        changed = dict(defaults, **{knob: type(defaults[knob])(value)})
      if changed != defaults:
        settings.append((f'{knob}={value:g}' if knob != 'head_random' else
                         f'head_random={bool(value)}', changed))
  return settings


def build_rows(config) -> list[RunRow]:
  """The flat list of runs, in a fixed order (a pure function of the config).

  Every method runs at the first batch size; further batch sizes (Appendix
  H.2 compares SGD and LSAM only) run SGD and LSAM alone, as the other methods'
  figures use the first batch size. Every method runs in every variant
  (:func:`variants`).
  """
  methods = _tuple(config.methods)
  batch_sizes = _tuple(config.batch_sizes) or (config.batch_size,)
  intervention_complexities = (_tuple(config.intervention_complexities)
                               or _tuple(config.complexities))
  noflip_rhos = _tuple(config.noflip_rhos) or _tuple(config.rhos)
  rho_relative = config.rho_unit == 'initial_head'
  settings = variants(config)
  if _tuple(config.heads):  # the main study: every head at the default knobs
    default = settings[0][1]
    settings = [('default', dict(default, head_random=head == 'random'))
                for head in _tuple(config.heads)] + settings[1:]
  rows = []
  for variant, knobs_of_variant in settings:
    for position, batch_size in enumerate(batch_sizes):
      for method in methods:
        if position > 0 and method not in ('sgd', 'lsam'):
          continue
        if method == 'sgd':
          knobs = [(0.0, None)]
        elif method == 'lsam':
          knobs = [(float(r), None) for r in _tuple(config.rhos)]
        elif method == 'lsam_noflip':
          knobs = [(float(r), None) for r in noflip_rhos]
        elif method == 'sam':
          knobs = [(float(r), None) for r in _tuple(config.sam_rhos)]
        else:
          knobs = [(None, float(c)) for c in _tuple(config.fixed_ratios)]
        complexities = (intervention_complexities if method in INTERVENTIONS
                        else _tuple(config.complexities))
        for label, gauss, drop, hard_only in noise_settings(config):
          for rho, ratio in knobs:
            for complexity in complexities:
              for seed in _tuple(config.seeds):
                rows.append(RunRow(method, rho, ratio, float(complexity), int(seed),
                                   int(batch_size), label, gauss, drop, hard_only,
                                   variant=variant, rho_relative=rho_relative,
                                   **knobs_of_variant))
  return rows


def train_setup(config, program: str, batch_size: int) -> toy_train.TrainSetup:
  return toy_train.TrainSetup(
      program=program, hidden=int(config.hidden), batch_size=int(batch_size),
      num_train=int(config.num_train), num_probe=int(config.num_probe),
      curve_probe=int(config.curve_probe), intervention_norm=str(config.intervention_norm), base_seed=int(config.seed))


def run_specs(rows: Sequence[RunRow]) -> toy_train.RunSpec:
  """The traced inputs of a group of runs, stacked along axis 0."""

  def column(get, dtype=np.float32):
    return jnp.asarray(np.array([get(r) for r in rows], dtype))

  return toy_train.RunSpec(
      seed=column(lambda r: r.seed, np.int32),
      rho=column(lambda r: r.rho or 0.0),
      rho_relative=column(lambda r: float(r.rho_relative)),
      fixed_ratio=column(lambda r: r.fixed_ratio or 1.0),
      complexity=column(lambda r: r.complexity),
      corruption=toy_data.Corruption(
          label_noise=column(lambda r: r.label_noise),
          gaussian_noise=column(lambda r: r.gaussian_noise),
          dropout=column(lambda r: r.dropout),
          hard_only=column(lambda r: float(r.noise_hard_only))),
      data=toy_data.ToyDataConstants(*[column(lambda r, k=k: getattr(r.data, k))
                                       for k in toy_data.ToyDataConstants._fields]),
      learning_rate=column(lambda r: r.learning_rate),
      head_init=column(lambda r: r.head_init),
      head_random=column(lambda r: float(r.head_random)),
      clip_phantom=column(lambda r: float(r.method == 'lsam_noflip')),
      fix_importance=column(lambda r: float(toy_train.INTERVENTIONS.get(r.method, (0, 0))[0])),
      fix_feature_lr=column(lambda r: float(toy_train.INTERVENTIONS.get(r.method, (0, 0))[1])))


@dataclasses.dataclass
class StudyOutputs:
  """Everything the runs produced, stacked over runs in ``rows`` order (numpy).

  Attributes:
    rows: the runs.
    eval_steps: ``[S]`` steps after which each evaluation and snapshot was taken.
    evaluations: :class:`~samjax.toy.train.Evaluation` of ``[R, S]`` arrays (the cheap
      per-chunk evaluation: the curves).
    final: :class:`~samjax.toy.train.FinalEvaluation` of ``[R]`` arrays (whole probe
      samples; every final number of a run).
    initial_heads: ``[R, 2]`` each run's ``v_0``.
    stats: :class:`~samjax.toy.train.StepStats` of ``[R, num_steps]`` arrays.
    snapshots: :class:`~samjax.toy.train.Snapshot` of ``[R, S, num_train]`` arrays.
    params: final parameters of each run.
    train_x, train_y: each run's training set, ``[R, num_train, 4]``, ``[R, num_train]``.
  """

  rows: list[RunRow]
  eval_steps: np.ndarray
  evaluations: toy_train.Evaluation
  final: toy_train.FinalEvaluation
  initial_heads: np.ndarray
  stats: toy_train.StepStats
  snapshots: toy_train.Snapshot
  params: list[Any]
  train_x: np.ndarray
  train_y: np.ndarray

  def select(self, **criteria) -> list[int]:
    """Indices of the runs whose fields equal ``criteria`` (e.g. ``method='sgd'``)."""
    return [i for i, r in enumerate(self.rows)
            if all(getattr(r, k) == v for k, v in criteria.items())]


def _group_rows(rows: Sequence[RunRow]) -> dict[tuple[str, int], list[int]]:
  """Run indices per compiled program: ``(program, batch_size)``."""
  groups: dict[tuple[str, int], list[int]] = {}
  for i, r in enumerate(rows):
    groups.setdefault((r.program, r.batch_size), []).append(i)
  return groups


def _balanced_parts(groups: dict[tuple[str, int], list[int]],
                    cores: int) -> list[tuple[tuple[str, int], list[int], int]]:
  """Each group split into equal parts of at most about ``total runs / cores`` runs:
  ``(group key, run indices, padded size)``. XLA:CPU runs one of these vmapped programs on
  about one core, so a group that holds most of the runs (LSAM's) would otherwise keep one
  core busy long after the others finished. Parts of one group have one size (the last one
  padded with its last run, whose copies are dropped), so they share one compilation."""
  total = sum(len(indices) for indices in groups.values())
  target = max(1, math.ceil(total / max(cores, 1)))
  parts = []
  for key, indices in groups.items():
    count = math.ceil(len(indices) / target)
    size = math.ceil(len(indices) / count)
    for k in range(count):
      parts.append((key, indices[k * size:(k + 1) * size], size))
  return parts


def _stack(trees: Sequence[Any], axis: int):
  return jax.tree.map(lambda *a: np.concatenate(a, axis=axis), *trees)


def enable_compilation_cache(directory: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in ``directory`` (``''``: leave it off).

  Every compiled program is written, however small or quick to compile (JAX's
  defaults skip programs compiled in under a second), so a second run of the
  same study loads all of them. A cache directory already configured (e.g. by
  ``JAX_COMPILATION_CACHE_DIR``) wins. Returns the directory in use, or None.
  """
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  if not directory:
    return None
  if is_local(directory):  # JAX's cache also takes a URL (gs://...), which abspath would mangle
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def run_sweep(config, rows: Optional[Sequence[RunRow]] = None, *,
              progress: bool = True) -> StudyOutputs:
  """Trains every run; one compiled (init, chunk) pair per (program, batch size).

  Data and initial parameters of every run are made first (one program); each
  group's initial optimiser state is then made, its chunk program compiled and
  its runs trained in a thread of its own (XLA compiles and runs without
  holding the GIL, and the groups are independent), so the groups share the
  host's cores.

  Args:
    config: a validated config.
    rows: the runs (default :func:`build_rows` of the config).
    progress: show a tqdm bar (updated after every chunk of every group).
  """
  rows = list(build_rows(config) if rows is None else rows)
  num_steps, eval_every = int(config.num_steps), int(config.eval_every)
  num_chunks = num_steps // eval_every
  # Data and initial parameters do not depend on the program or the batch size:
  # one call (one compilation) for every run.
  all_params, all_data = toy_train.compiled_params_and_data(
      train_setup(config, 'lsam', int(config.batch_size)))(run_specs(rows))
  parts = _balanced_parts(_group_rows(rows), os.cpu_count() or 1)
  per_run: list[Any] = [None] * len(rows)
  programs: dict[Any, concurrent.futures.Future] = {}
  programs_lock = threading.Lock()

  def compiled(setup, state, run_data, specs):
    """The chunk program of ``setup`` at this shape, compiled once for all parts that need it
    (the first part compiles, the others wait for it)."""
    key = (setup, int(specs.seed.shape[0]))
    with programs_lock:
      future, owner = programs.get(key), key not in programs
      if owner:
        future = programs[key] = concurrent.futures.Future()
    if owner:
      try:
        future.set_result(toy_train.compiled_chunk(setup, eval_every).lower(
            state, run_data, specs).compile())
      except BaseException as error:  # the waiting parts re-raise it too
        future.set_exception(error)
        raise
    return future.result()
  bar = tqdm(total=len(rows) * num_steps, unit='step', unit_scale=True, disable=not progress,
             desc='toy study', dynamic_ncols=True)

  def compile_and_train(part) -> None:
    """One part of a group, start to end, in its own thread: XLA:CPU runs each of these small
    vmapped programs on about one core, so parts running side by side use the machine's other
    cores (and one program's compilation overlaps another's training). A part's arithmetic is
    a pure function of its runs (and its padding): results do not depend on the threads."""
    (program, batch_size), indices, size = part
    padded = list(indices) + [indices[-1]] * (size - len(indices))
    setup = train_setup(config, program, batch_size)
    take = lambda tree, where=np.asarray(padded): jax.tree.map(lambda a: a[where], tree)
    specs = run_specs([rows[i] for i in padded])
    state, run_data = toy_train.init_state_batch(take(all_params), specs, setup), take(all_data)
    chunk = compiled(setup, state, run_data, specs)
    results = []
    for _ in range(num_chunks):
      state, result = chunk(state, run_data, specs)
      results.append(jax.device_get(result))
      bar.update(len(indices) * eval_every)
    stats = _stack([r.stats for r in results], axis=1)                  # [G, T]
    snapshots = jax.tree.map(lambda *a: np.stack(a, axis=1),
                             *[r.snapshot for r in results])            # [G, S, N]
    evaluations = jax.tree.map(lambda *a: np.stack(a, axis=1),
                               *[r.evaluation for r in results])        # [G, S]
    params = jax.device_get(state.params)
    train_x, train_y = np.asarray(run_data.train_x), np.asarray(run_data.train_y)
    for g, i in enumerate(indices):
      take = lambda tree, g=g: jax.tree.map(lambda a: a[g], tree)
      per_run[i] = (take(stats), take(snapshots), take(evaluations), take(params),
                    train_x[g], train_y[g])

  with bar, concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
    bar.set_postfix_str(', '.join(f'{program} batch {batch_size}: {len(indices)} runs'
                                  for (program, batch_size), indices, _ in parts))
    for future in [pool.submit(compile_and_train, p) for p in parts]:
      future.result()  # re-raises a part's error here
  stats, snapshots, evaluations, params, train_x, train_y = zip(*per_run)
  stack0 = lambda trees: jax.tree.map(lambda *a: np.stack(a), *trees)
  # The precise evaluation, once, for every run at once: one small program.
  final = jax.device_get(toy_train.compiled_final_evaluate(
      train_setup(config, 'lsam', int(config.batch_size)))(stack0(params), all_data))
  return StudyOutputs(rows=rows, eval_steps=eval_every * np.arange(1, num_chunks + 1),
                      evaluations=stack0(evaluations), final=final,
                      initial_heads=np.asarray(all_data.initial_head), stats=stack0(stats),
                      snapshots=stack0(snapshots), params=list(params),
                      train_x=np.stack(train_x), train_y=np.stack(train_y))


# ----------------------------------------------------------------------------- summaries

def _finite(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def summarize(config, outputs: StudyOutputs) -> list[dict]:
  """One ``results.json`` record per run.

  Step statistics are averaged over all training steps (docs/toy.md defines
  every key). ``phantom_ratio`` is
  the mean of ``v~_hard / v~_easy`` over steps (the paper's Fig. 2B / Fig. 6
  quantity); ``phantom_ratio_of_means`` is ``mean(v~_hard) / mean(v~_easy)``,
  the ratio of the time-averaged phantom head, which stays meaningful when
  ``v~_easy`` passes through zero (``rho`` close to ``v_easy``, where the mean
  of the ratio is dominated by a few steps). ``real_ratio`` and
  ``real_ratio_of_means`` are the same for ``v``. Gini coefficients are
  averaged over the snapshots (every ``eval_every`` steps).
  """
  records = []
  # [R, S]: the Gini coefficient of every snapshot, in one vmapped call
  gini_real, gini_phantom = (np.asarray(_batched_gini(getattr(outputs.snapshots, field)))
                             for field in ('weight_real', 'weight_phantom'))
  for i, row in enumerate(outputs.rows):
    with np.errstate(divide='ignore', invalid='ignore'):  # a clipped phantom can be 0
      records.append(_record(config, outputs, i, row, gini_real[i], gini_phantom[i]))
  return records


def _record(config, outputs: StudyOutputs, i: int, row: RunRow, gini_real, gini_phantom) -> dict:
  stats = jax.tree.map(lambda a: a[i], outputs.stats)
  final = jax.tree.map(lambda a: a[i], outputs.final)
  v0 = outputs.initial_heads[i]
  # Heads along the real head's orientation (docs/toy.md): a signed head's ratios then
  # compare across runs; for a positive head these are the plain coordinates.
  signs = np.where(np.stack([stats.real_easy, stats.real_hard]) >= 0, 1.0, -1.0)
  aligned_easy, aligned_hard = np.stack([stats.phantom_easy, stats.phantom_hard]) * signs
  real_easy, real_hard = np.abs(stats.real_easy), np.abs(stats.real_hard)
  normalised = toy_metrics.normalised_lr_scales(stats.real_easy, stats.real_hard,
                                                stats.phantom_easy, stats.phantom_hard)
  window_end = toy_metrics.learning_window_end(outputs.evaluations.hard_probe_error[i],
                                               outputs.eval_steps)
  return {
      'method': row.method,
      'variant': row.variant,
      'learning_rate': row.learning_rate,
      'head_init': row.head_init,
      'head_random': row.head_random,
      **{f'data_{k}': v for k, v in row.data._asdict().items()},
      'head': row.head,
      'stage': row.stage,
      'initial_head': [float(v) for v in v0],
      'rho': row.rho,
      'rho_relative': row.rho_relative,
      'rho_absolute': (None if row.rho is None else
                       float(row.rho * (np.hypot(*v0) if row.rho_relative else 1.0))),
      'fixed_ratio': row.fixed_ratio,
      'lsam_rho': row.lsam_rho,
      'complexity': row.complexity,
      'seed': row.seed,
      'steps': int(config.num_steps),
      'batch_size': row.batch_size,
      'label_noise': row.label_noise,
      'gaussian_noise': row.gaussian_noise,
      'dropout': row.dropout,
      'noise_hard_only': row.noise_hard_only,
      'hard_probe_error': _finite(final.hard_probe_error),
      'easy_probe_error': _finite(final.easy_probe_error),
      'hard_probe_error_val': _finite(final.hard_probe_error_val),
      'easy_probe_error_val': _finite(final.easy_probe_error_val),
      'train_error': _finite(final.train_error),
      'test_error': _finite(final.test_error),
      'phantom_ratio': _finite(np.mean(stats.phantom_ratio)),
      'phantom_ratio_of_means': _finite(np.mean(aligned_hard) / np.mean(aligned_easy)),
      'real_ratio': _finite(np.mean(stats.real_ratio)),
      'real_ratio_of_means': _finite(np.mean(real_hard) / np.mean(real_easy)),
      'phantom_ratio_median': _finite(np.median(stats.phantom_ratio)),
      'real_ratio_median': _finite(np.median(stats.real_ratio)),
      'lr_scale_easy': _finite(np.mean(stats.lr_scale_easy)),
      'lr_scale_hard': _finite(np.mean(stats.lr_scale_hard)),
      'lr_scale_easy_normalised': _finite(np.mean(normalised[0])),
      'lr_scale_hard_normalised': _finite(np.mean(normalised[1])),
      # Medians over steps: robust where a signed v_k passes near 0 (Fig. 4's verdicts).
      'lr_scale_easy_median': _finite(np.median(stats.lr_scale_easy)),
      'lr_scale_hard_median': _finite(np.median(stats.lr_scale_hard)),
      'lr_scale_easy_normalised_median': _finite(np.median(normalised[0])),
      'lr_scale_hard_normalised_median': _finite(np.median(normalised[1])),
      'easy_flip_fraction': toy_metrics.flip_fraction(stats.real_easy, stats.phantom_easy),
      'hard_flip_fraction': toy_metrics.flip_fraction(stats.real_hard, stats.phantom_hard),
      'learning_window_end': window_end,
      'phantom_ratio_learning': _finite(np.mean(aligned_hard[:window_end])
                                        / np.mean(aligned_easy[:window_end])),
      'gini_real': _finite(np.mean(gini_real)),
      'gini_phantom': _finite(np.mean(gini_phantom)),
      'hard_probe_error_curve': [_finite(e) for e in outputs.evaluations.hard_probe_error[i]],
      'train_error_curve': [_finite(e) for e in outputs.evaluations.train_error[i]],
      'easy_fit_step': easy_fit_step(outputs, i),
  }


def easy_fit_step(outputs: StudyOutputs, index: int, margin: float = 1.0) -> Optional[int]:
  """First snapshot step at which the easy feature alone fits most training points:
  the median of ``y v_easy phi_easy`` exceeds ``margin``. ``None`` if it never does.

  It shows *when* the easy feature is learned: LSAM with ``rho`` above the
  initial ``v_easy`` flips the sign of ``v~_easy`` early on, which holds the
  easy feature back while the hard one learns (see docs/toy.md).
  """
  medians = np.median(outputs.snapshots.contribution_easy[index], axis=-1)
  above = np.flatnonzero(medians > margin)
  return int(outputs.eval_steps[above[0]]) if above.size else None


@jax.jit
def _batched_gini(weights: jax.Array) -> jax.Array:
  """``diagnostics.gini`` over the last axis of ``weights [..., n]``."""
  flat = weights.reshape(-1, weights.shape[-1])
  return jax.vmap(diagnostics.gini)(flat).reshape(weights.shape[:-1])


# ----------------------------------------------------------------------------- entry point

def _json_config(config) -> dict:
  to_dict = getattr(config, 'to_dict', None)
  return json.loads(json.dumps(to_dict() if to_dict else dict(config), default=list))


def run(config, workdir: str) -> dict:
  """Runs the study of ``config`` and writes results.json, figures (PNG) and report.md.

  Returns:
    ``{'results': path, 'report': path, 'figures': [paths], 'num_runs': int,
    'wall_time_s': float}``.
  """
  config_lib.validate_config(config)
  from samjax.toy import plots, report  # matplotlib only once the config is valid

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or a URL (gs://)
  start = time.perf_counter()
  enable_compilation_cache(str(config.compilation_cache_dir))
  outputs = run_sweep(config)
  records = summarize(config, outputs)
  # Second stage: Eq. 10 at each seed's measured LSAM ratio where LSAM beats SGD, and
  # the chaos check (cells re-run in another vmapped batch).
  followups = followup_rows(config, outputs.rows, records)
  if followups:
    records += summarize(config, run_sweep(config, followups))
  train_time = time.perf_counter() - start
  results_path = str(epath.Path(workdir) / 'results.json')
  atomic_write_text(results_path, json.dumps({'config': _json_config(config), 'runs': records},
                                             indent=1, allow_nan=False))
  figures = plots.make_figures(config, outputs, records[:len(outputs.rows)], workdir)
  wall_time = time.perf_counter() - start
  report_path = report.write_report(config, outputs, records, figures, workdir,
                                    train_time_s=train_time, wall_time_s=wall_time)
  return {'results': results_path, 'report': report_path, 'figures': figures,
          'num_runs': len(records), 'wall_time_s': wall_time}


def followup_rows(config, rows: Sequence[RunRow], records: Sequence[dict]) -> list[RunRow]:
  """The second stage of the main study (empty for the other studies).

  * ``'eq10'``: Eq. 10 (``iw_lr``) with ``c`` set to each seed's measured LSAM phantom ratio,
    at every head, regime and complexity where LSAM's gain over SGD held (claims.py);
  * ``'rebatch'``: one flip-regime and one flip-free LSAM cell re-run as a vmapped batch of
    their own (the same runs, another batch composition), to measure how far the flip
    regime's chaos moves a result.
  """
  from samjax.toy import claims  # pylint: disable=g-import-not-at-top
  if not _tuple(config.heads):
    return []
  main = [(row, r) for row, r in zip(rows, records)
          if row.variant == 'default' and not row.noisy and row.stage == 'main']
  runs = [r for _, r in main]
  all_cells = claims.cells(runs)
  template = {(r['method'], r['head'], r['complexity'], r['rho'], r['seed']): row
              for row, r in main}
  out = []
  if 'iw_lr' in _tuple(config.methods):
    gains = claims.gain_claims(all_cells, spread=None)
    for head, complexity, rho, seed, ratio in claims.eq10_rows_spec(gains, runs):
      row = template[('lsam', head, complexity, rho, seed)]
      out.append(dataclasses.replace(row, method='iw_lr', rho=None, fixed_ratio=ratio,
                                     stage='eq10', lsam_rho=rho))
  for head, complexity, rho in claims.chaos_rows_spec(all_cells):
    out += [dataclasses.replace(row, stage='rebatch') for (m, h, c, r, _), row in template.items()
            if (m, h, c, r) == ('lsam', head, complexity, rho)]
  return out

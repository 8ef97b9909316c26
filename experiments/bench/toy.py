"""The toy study: the main job's wall time cold and warm, and its vmapped sweep vs one at a time.

* ``cold_s`` / ``warm_s``: ``python -m samjax.main --config=configs/toy.py`` in a subprocess, as a
  user runs it (import, data, compilation, training, probes, figures, report), first with an
  empty persistent compilation cache, then again with the cache that run filled.
* ``contenders``: ``samjax.toy.study.run_sweep`` on all runs at once vs on one run at a time,
  through the same functions; every cold sample starts from empty in-process compilation caches
  (and no persistent cache), so each contender pays its compilations; warm samples reuse them.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax

from experiments.bench import timing
from experiments import ROOT, load_config
from experiments.bench.sizes import Size
from samjax import config as config_lib


def toy_config(size: Size):
  """The paper's main toy sweep (``configs/toy.py``), cut to the size's methods and steps,
  and, for the one-at-a-time contender's sake, to the first three seeds and the first head
  (the main job itself, timed by :func:`time_main_job`, runs everything)."""
  config = load_config(os.path.join('configs', 'toy.py'))
  config.seeds = tuple(config.seeds)[:3]
  config.heads = tuple(config.heads)[:1]
  for key, value in size.toy_overrides:
    config[key] = value
  config.num_steps = size.toy_steps
  config.eval_every = size.toy_chunk
  config.compilation_cache_dir = ''  # in-process contenders: no persistent cache
  return config


def _main_job_env() -> dict[str, str]:
  """The environment of a user's shell: none of the benchmark's 8 host devices, and no cache
  directory from the environment (it would win over the config's)."""
  env = dict(os.environ)
  for key in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'JAX_COMPILATION_CACHE_DIR'):
    env.pop(key, None)
  return env


def time_main_job(overrides: tuple = ()) -> dict[str, Any]:
  """Wall seconds of the toy main job, cold (fresh empty cache directory) then warm (same cache)."""
  tmp = tempfile.mkdtemp(prefix='samjax_bench_toy_')
  cache = os.path.join(tmp, 'cache')
  flags = [f'--config.{k}={v}' for k, v in overrides]
  out = {'command': ' '.join(['python -m samjax.main --config=configs/toy.py --workdir=DIR',
                              f'--config.compilation_cache_dir={cache}', *flags]),
         'overrides': dict(overrides)}
  try:
    for label in ('cold', 'warm'):
      cmd = [sys.executable, '-m', 'samjax.main', '--config=configs/toy.py',
             f'--workdir={os.path.join(tmp, label)}', f'--config.compilation_cache_dir={cache}',
             *flags]
      load = os.getloadavg()[0]
      start = time.perf_counter()
      proc = subprocess.run(cmd, cwd=ROOT, env=_main_job_env(), capture_output=True, text=True,
                            timeout=1800)
      seconds = time.perf_counter() - start
      if proc.returncode != 0:
        raise RuntimeError(f'{label} main job exited {proc.returncode}: {proc.stderr[-2000:]}')
      out[f'{label}_s'] = seconds
      out[f'{label}_load_average_1min_before'] = load
      out[f'{label}_cache_entries'] = len(os.listdir(cache)) if os.path.isdir(cache) else 0
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def sweep_comparison(size: Size) -> dict[str, Any]:
  """``run_sweep`` on all runs at once vs one run per call, cold (compilation included) and warm.

  Compilation is the cold median minus the warm median (the sweep compiles inside ``run_sweep``,
  in threads, so it is not separable by a clock around one call).
  """
  from samjax.toy import study as toy_study  # pylint: disable=g-import-not-at-top
  from samjax.toy import train as toy_train  # pylint: disable=g-import-not-at-top
  config = toy_config(size)
  config_lib.validate_config(config)
  rows = toy_study.build_rows(config)
  if size.toy_runs:
    rows = rows[:size.toy_runs]
  steps = int(config.num_steps) // int(config.eval_every) * int(config.eval_every)

  def forget_compilations():
    toy_train.compiled_sweep_fns.cache_clear()
    jax.clear_caches()

  def vmapped(_, cold=True):
    if cold:
      forget_compilations()
    toy_study.run_sweep(config, rows, progress=False)

  def one_at_a_time(_, cold=True):
    if cold:
      forget_compilations()
    for row in rows:
      toy_study.run_sweep(config, [row], progress=False)

  methods = sorted({r.method for r in rows})
  timing.log(f'[toy] {len(rows)} runs ({", ".join(methods)}) x {steps} steps, vmapped vs one '
             'at a time, compilation included')
  samples = timing.interleaved({'vmapped': vmapped, 'one_at_a_time': one_at_a_time},
                               size.toy_reps, 1)
  # Warm: compile both contenders' programs once more first (which one the last cold sample
  # left compiled depends on the parity of toy_reps), so no warm sample pays a compilation.
  vmapped(None, cold=False)
  one_at_a_time(None, cold=False)
  warm = timing.interleaved({'vmapped': functools.partial(vmapped, cold=False),
                             'one_at_a_time': functools.partial(one_at_a_time, cold=False)},
                            max(size.toy_reps, 1), 1)
  work = len(rows) * steps
  contenders = {}
  for name in samples:
    cold_s, warm_s = statistics.median(samples[name]), statistics.median(warm[name])
    contenders[name] = dict(
        timing.summarize(samples[name]), run_steps_per_s=work / cold_s,
        compile_s=cold_s - warm_s, execute_s=warm_s,
        warm=dict(timing.summarize(warm[name]), run_steps_per_s=work / warm_s))
  ratio_of = lambda key: contenders['one_at_a_time'][key] / contenders['vmapped'][key]
  return {'runs': len(rows), 'methods': methods, 'steps_per_run': steps,
          'chunk_steps': int(config.eval_every), 'batch_size': int(config.batch_size),
          'method_groups': len({(r.method, r.batch_size) for r in rows}),
          'contenders': contenders, 'speedup': ratio_of('median_s'),
          'warm_speedup': ratio_of('execute_s'), 'compile_speedup': ratio_of('compile_s'),
          'api': 'samjax.toy.study.run_sweep(config, rows, progress=False)'}


def bench_toy(size: Size) -> dict[str, Any]:
  try:
    import samjax.toy.study  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return {'status': 'unavailable', 'reason': f'samjax.toy.study is not importable: {e!r}'}
  timing.log('[toy] the main job, cold then warm'
             + (f' (overrides {dict(size.toy_main_overrides)})' if size.toy_main_overrides else ''))
  main_job = time_main_job(size.toy_main_overrides)
  return {'status': 'ok', 'cold_s': main_job['cold_s'], 'warm_s': main_job['warm_s'],
          'main_job': main_job, **sweep_comparison(size)}


def goal_values(toy: dict) -> list[tuple[str, Any, str]]:
  toy = toy or {}
  job = 'toy main job' + (' (tiny override)' if (toy.get('main_job') or {}).get('overrides')
                          else '')
  return [('toy_vmap_speedup', toy.get('speedup'),
           f"{toy.get('runs')} runs x {toy.get('steps_per_run')} steps"),
          ('toy_cold_s', toy.get('cold_s'), job + ', empty compilation cache'),
          ('toy_warm_s', toy.get('warm_s'), job + ', cache filled')]


def report_lines(toy: dict) -> list[str]:
  toy = toy or {}
  if toy.get('status') != 'ok':
    return [f"\n[toy] {toy.get('status')}: {toy.get('reason')}"] if toy else []
  job = toy['main_job']
  lines = [f"\n[toy] main job: cold {toy['cold_s']:.1f} s, warm {toy['warm_s']:.1f} s "
           f"(load average before: {job['cold_load_average_1min_before']:.2f}, "
           f"{job['warm_load_average_1min_before']:.2f})",
           f"[toy] run_sweep, {toy['runs']} runs ({', '.join(toy['methods'])}) x "
           f"{toy['steps_per_run']} steps (compilation included; compile / execute)"]
  for name, c in toy['contenders'].items():
    lines.append(f"{name:<15}{c['median_s']:>9.2f} s {c['run_steps_per_s']:>12.0f} run-steps/s"
                 f"   [compile {c['compile_s']:.2f} s, execute {c['execute_s']:.3f} s]")
  lines.append(f"  speedup {toy['speedup']:.2f}x (execution {toy['warm_speedup']:.1f}x, "
               f"compilation {toy['compile_speedup']:.2f}x)")
  return lines

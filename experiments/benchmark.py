"""Performance benchmark of samjax: the thin CLI that runs the sections of ``experiments/bench/``.

One command, one process::

    python -m experiments.benchmark --size=small --out=bench.json

Sizes (``bench/sizes.py``): ``tiny`` (CI smoke test; tiny models, so its numbers measure dispatch
overhead more than arithmetic), ``small`` (the paper's conv net on CIFAR-MNIST-shaped batches, a
full-width ResNet-18 on 32x32 images, the real toy main job; minutes on 2 CPU cores) and ``full``
(ResNet-18 on CelebA's 64x64 images with batch 128; meant for an accelerator).

Sections (each a key of the JSON written to ``--out``; one module each, all timed by the one
method of ``bench/timing.py``): ``steps`` and ``scaling`` (``bench/steps.py``), ``toy``
(``bench/toy.py``), ``grids`` (``bench/grids.py``), ``per_example`` (``bench/per_example.py``),
``pipeline`` (the input pipeline, ``bench/input.py``). ``goals``: PASS / MISS of each goal of
:data:`GOALS`, computed here from the measured values.

On CPU the script asks XLA for 8 host devices (``--xla_force_host_platform_device_count=8``)
unless the environment already says otherwise; these "devices" share the machine's cores.
"""

from __future__ import annotations

import os
import sys


def _configure_environment() -> None:
  """8 host devices for the scaling section; must run before jax is imported."""
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = (flags + ' --xla_force_host_platform_device_count=8').strip()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


_configure_environment()

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Optional  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench import device_input, grids, per_example, steps, toy  # noqa: E402
from experiments.bench import input as input_section  # noqa: E402
from experiments.bench.sizes import SIZES  # noqa: E402
from samjax import cli  # noqa: E402

SECTIONS = ('steps', 'scaling', 'toy', 'grids', 'per_example', 'pipeline', 'input')
PROG = 'benchmark'

_SIZE = flags.DEFINE_enum('size', 'small', sorted(SIZES), 'Size of every section (bench/sizes.py).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of the models (parameters stay float32).')
_OUT = flags.DEFINE_string('out', '', 'Write the results as JSON to this path (local or gs://).')
_SECTIONS = flags.DEFINE_list('sections', [], f'Comma list of {", ".join(SECTIONS)}; default all.')
_REPS = flags.DEFINE_integer('reps', 0, 'Override the round-robin repetitions.', lower_bound=0)
_STRICT = flags.DEFINE_bool('strict', False, 'Raise on a failing section.')
_CONSUMERS_FROM = flags.DEFINE_string(
    'consumers_from', '', "Take the pipeline section's train-step timings from this JSON (the "
    'same size run elsewhere, e.g. on an accelerator).')

GOALS = {
    # name: (threshold, '<=' | '>=' | '<', description)
    'sam_vs_optax_sam': (1.05, '<=', 'samjax SAM step / optax.contrib.sam step'),
    'sam_vs_sgd': (2.05, '<=', 'samjax SAM step / SGD step'),
    'lsam_vs_sgd': (1.15, '<=', 'LSAM step / SGD step'),
    'diagnostics_overhead': (1.05, '<=', 'SAM step with in-step diagnostics / without'),
    'toy_vmap_speedup': (4.0, '>=', 'toy sweep one at a time / vmapped, compilation included'),
    'toy_cold_s': (15.0, '<=', 'toy main job wall seconds, empty compilation cache'),
    'toy_warm_s': (8.0, '<=', 'toy main job wall seconds, compilation cache filled'),
    'per_example_bounded_memory': (1.0, '<', 'chunked / unchunked peak bytes (XLA estimate)'),
    'pipeline_vs_step': (2.0, '>=', 'input pipeline images/s / train step images/s'),
    'device_over_preplaced': (1.05, '<=', 'step fed from the resident split / step on a '
                              'batch already on the device'),
}


def _verdict(name: str, value: Optional[float], where: str) -> dict[str, Any]:
  threshold, op, description = GOALS[name]
  row = {'goal': name, 'where': where, 'description': description, 'value': value,
         'threshold': f'{op} {threshold}'}
  if value is None or not math.isfinite(value):
    return dict(row, verdict='NOT MEASURED')
  ok = {'<=': value <= threshold, '>=': value >= threshold, '<': value < threshold}[op]
  return dict(row, verdict='PASS' if ok else 'MISS')


GOAL_VALUES = {'steps': steps.goal_values, 'toy': toy.goal_values, 'grids': grids.goal_values,
               'per_example': per_example.goal_values, 'pipeline': input_section.goal_values,
               'input': device_input.goal_values}


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Verdicts of the goals of the sections that ran (a failed section's: NOT MEASURED)."""
  return [_verdict(*v) for section, values in GOAL_VALUES.items() if section in results
          for v in values(results[section])]


def format_report(results: dict[str, Any]) -> str:
  meta = results['meta']
  lines = [f"samjax benchmark, size={meta['size']}, backend={meta['backend']} "
           f"({meta['device_kind']}), {meta['cpu_count']} host CPUs, jax {meta['jax']}, "
           f"load average at start {meta['load_average_start']}"]
  lines += steps.report_lines(results.get('steps'), results.get('scaling'), meta['reps'])
  lines += toy.report_lines(results.get('toy'))
  lines += grids.report_lines(results.get('grids'))
  lines += per_example.report_lines(results.get('per_example'))
  lines += input_section.report_lines(results.get('pipeline'))
  lines += device_input.report_lines(results.get('input'))
  lines.append('\n[goals]')
  for g in results.get('goals', []):
    value = g['value']
    shown = f'{value:.3f}' if isinstance(value, float) and math.isfinite(value) else str(value)
    lines.append(f"  {g['verdict']:<12} {g['goal']:<28} {shown:>9} {g['threshold']:<7} "
                 f"{g['where']}")
  return '\n'.join(lines)


def metadata(size_name: str, size) -> dict[str, Any]:
  device = jax.devices()[0]
  return {'size': size_name, 'dtype': size.dtype, 'backend': jax.default_backend(),
          'device_kind': getattr(device, 'device_kind', str(device)),
          'num_devices': len(jax.devices()), 'cpu_count': os.cpu_count(),
          'machine': platform.machine(), 'python': platform.python_version(),
          'jax': jax.__version__, 'optax': optax.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'reps': size.reps, 'iters': size.iters,
          'argv': sys.argv[1:], 'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
          # a shared machine's timings mean little without its load (1, 5, 15 min)
          'load_average_start': [round(x, 2) for x in os.getloadavg()]}


def run(size_name: str = 'small', dtype: str = 'float32', sections=(), reps: int = 0,
        strict: bool = False, consumers_from: str = '') -> dict[str, Any]:
  """The JSON of every section in ``sections`` (default all) at the named size."""
  size = dataclasses.replace(SIZES[size_name], dtype=dtype)
  if reps:
    size = dataclasses.replace(size, reps=reps)
  sections = list(sections) or list(SECTIONS)
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f'--sections: unknown {", ".join(unknown)}; choose from '
                     f'{", ".join(SECTIONS)}.')
  results: dict[str, Any] = {'meta': metadata(size_name, size)}
  start = time.perf_counter()
  builders = {
      'steps': lambda: steps.bench_steps(size),
      'scaling': lambda: steps.bench_scaling(size),
      'per_example': lambda: per_example.bench_per_example(size),
      'pipeline': lambda: input_section.bench_pipeline(size, results.get('steps'),
                                                       consumers_from),
      'input': lambda: device_input.bench_device_input(size),
      'grids': lambda: grids.bench_grids(size),
      'toy': lambda: toy.bench_toy(size),  # last: it clears JAX's compilation caches
  }
  for name in [s for s in builders if s in sections]:
    section_start = time.perf_counter()
    try:
      results[name] = builders[name]()
    except Exception as e:  # keep the other sections' numbers
      if strict:
        raise
      results[name] = {'status': 'error', 'reason': repr(e), 'traceback': traceback.format_exc()}
    results['meta'].setdefault('section_wall_s', {})[name] = time.perf_counter() - section_start
  results['goals'] = evaluate_goals(results)
  results['meta']['wall_s'] = time.perf_counter() - start
  results['meta']['load_average_end'] = [round(x, 2) for x in os.getloadavg()]
  return results


def main(argv) -> None:
  cli.no_extra_arguments(PROG, argv)
  with cli.one_line_errors(PROG, catch=(ValueError,)):
    results = run(_SIZE.value, _DTYPE.value, _SECTIONS.value, _REPS.value, _STRICT.value,
                  _CONSUMERS_FROM.value)
  print(format_report(results), flush=True)
  if _OUT.value:
    from samjax.io_utils import atomic_write_text  # pylint: disable=g-import-not-at-top
    # Local or gs://; atomic_write creates the parent folder.
    atomic_write_text(_OUT.value, json.dumps(results, indent=1, default=float))


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: cli.parse_flags(
      PROG, argv, usage=__doc__ + flags.FLAGS.main_module_help()))

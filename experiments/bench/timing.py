"""The one timing method of the benchmark (``python -m experiments.benchmark``).

Contenders are compiled ahead of time (:func:`compile_ahead`: ``jit(...).lower(...).compile()``,
compile time reported on its own), warmed up, then timed *round-robin* (:func:`interleaved`):
repetition ``r`` runs every contender once, in alternating order, so a shared machine's drifts
hit all contenders alike. A sample is ``iters`` calls and one ``block_until_ready``; a
contender's time is the median of its samples (:func:`summarize`) and a ratio is a ratio of
medians, with the median of per-repetition paired ratios beside it (:func:`ratio`).
"""

from __future__ import annotations

import math
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def interleaved(runners: dict[str, Callable[[int], None]], reps: int, iters: int,
                ) -> dict[str, list[float]]:
  """Seconds per call of every runner, ``reps`` samples each, taken round-robin.

  ``runners[name](n)`` makes ``n`` calls and blocks until their results are ready. The order of
  the contenders alternates between repetitions (forward, backward) so that no contender always
  runs right after the same other one.
  """
  names = list(runners)
  samples = {name: [] for name in names}
  for r in range(reps):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      runners[name](iters)
      samples[name].append((time.perf_counter() - start) / iters)
  return samples


def summarize(samples: Sequence[float]) -> dict[str, Any]:
  return {'median_s': statistics.median(samples), 'min_s': min(samples), 'max_s': max(samples),
          'samples_s': [float(s) for s in samples]}


def ratio(samples: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
  """Ratio of medians, and the median of the per-repetition ratios (same repetition paired)."""
  paired = [a / b for a, b in zip(samples[num], samples[den])]
  return {'ratio_of_medians': statistics.median(samples[num]) / statistics.median(samples[den]),
          'median_paired_ratio': statistics.median(paired)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """``(fn(), seconds)``, with the result's arrays ready: asynchronous dispatch would
  otherwise let the clock stop before the device finished."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def compile_ahead(fn, *args) -> tuple[Any, float]:
  """``(compiled, compile seconds)`` of a jitted ``fn`` for ``args``: compiled before any timing,
  so the timed calls never include a compilation."""
  return timed(lambda: fn.lower(*args).compile())


def repeat_runner(call: Callable[[], Any]) -> Callable[[int], None]:
  """A runner for :func:`interleaved`: ``n`` calls of ``call``, then one wait for the last."""
  def run(n: int) -> None:
    out = None
    for _ in range(n):
      out = call()
    jax.block_until_ready(out)
  return run


def safe_div(a, b) -> Optional[float]:
  if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
    return None
  return float(a) / float(b)


def max_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


# Structural facts of compiled programs.

_CONV_PATTERNS = (
    re.compile(r'=\s*\S+\s+convolution\('),          # XLA's own convolution (CPU)
    re.compile(r'custom_call_target="__cudnn\$conv'),  # cuDNN convolutions (GPU)
    re.compile(r'custom_call_target="__onednn\$conv'),  # oneDNN convolutions (CPU, if enabled)
)
_DOT_PATTERNS = (
    re.compile(r'=\s*\S+\s+dot\('),
    re.compile(r'custom_call_target="__cublas'),
)


def hlo_facts(compiled) -> dict[str, Any]:
  """Op counts and XLA's cost estimate of a compiled program.

  Counts run over every instruction of the optimised HLO text, fused computations included, so
  a convolution is counted once wherever XLA placed it.
  """
  text = compiled.as_text()
  facts = {
      'convolutions': sum(len(p.findall(text)) for p in _CONV_PATTERNS),
      'dots': sum(len(p.findall(text)) for p in _DOT_PATTERNS),
      'fusions': len(re.findall(r'=\s*\S+\s+fusion\(', text)),
      'hlo_lines': text.count('\n'),
  }
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    facts['flops'] = float(cost.get('flops', float('nan')))
    facts['bytes_accessed'] = float(cost.get('bytes accessed', float('nan')))
  except Exception as e:  # cost analysis is best effort on some backends
    facts['cost_analysis_error'] = repr(e)
  return facts


def memory_facts(compiled) -> dict[str, Any]:
  """XLA's compiled memory analysis: what the program's buffers need on the device."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {'available': False}
  out = {k: int(getattr(stats, k)) for k in (
      'argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
      'temp_size_in_bytes', 'generated_code_size_in_bytes') if hasattr(stats, k)}
  out['peak_estimate_bytes'] = (out['argument_size_in_bytes'] + out['output_size_in_bytes']
                                - out.get('alias_size_in_bytes', 0) + out['temp_size_in_bytes'])
  reported = int(getattr(stats, 'peak_memory_in_bytes', 0) or 0)
  if reported:
    out['peak_memory_in_bytes'] = reported
  out['available'] = True
  return out

"""Per-example gradient norms (:func:`samjax.diagnostics.per_example_grad_norms`), chunked vs not.

Examples / s and XLA's compiled memory analysis (argument, output, temp bytes): chunking should
bound the memory by the chunk instead of the batch.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samjax import diagnostics
from samjax.models import create_model, init_variables
from samjax.train import step as step_lib

from experiments.bench import timing
from experiments.bench.sizes import Size
from experiments.bench.steps import synthetic_batch


def bench_per_example(size: Size) -> dict[str, Any]:
  case = size.pex_model
  model = create_model({'name': case.name, 'width': case.width, 'dtype': size.dtype},
                       case.num_classes)
  variables = init_variables(model, jax.random.key(0), (1, *case.image_shape))
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})

  def loss_fn(p, batch):
    # Inference-mode BatchNorm: a batch of one has no training statistics.
    v = {'params': p, **({'batch_stats': batch_stats} if batch_stats else {})}
    logits = model.apply(v, batch['image'], train=False)
    return jnp.mean(step_lib.cross_entropy(logits, batch['label']))

  batch_np = synthetic_batch(case)
  batch = jax.device_put({'image': batch_np['image'], 'label': batch_np['label']})
  params = jax.device_put(params)
  functions = {
      'chunked': lambda p, b: diagnostics.per_example_grad_norms(
          loss_fn, p, b, chunk_size=size.pex_chunk),
      'unchunked': lambda p, b: diagnostics.per_example_grad_norms(loss_fn, p, b),
  }
  if size.pex_reference:  # the cost of one ordinary batch gradient, for scale
    functions['batch_gradient'] = lambda p, b: optax.tree.norm(jax.grad(loss_fn)(p, b))
  compiled, compile_s, memory, runners = {}, {}, {}, {}
  for name, fn in functions.items():
    timing.log(f'[per_example] {case.label}: compiling {name}')
    compiled[name], compile_s[name] = timing.compile_ahead(jax.jit(fn), params, batch)
    memory[name] = timing.memory_facts(compiled[name])
    runners[name] = timing.repeat_runner(lambda c=compiled[name]: c(params, batch))
    runners[name](1)  # warm-up
  norms = {name: np.asarray(compiled[name](params, batch)) for name in ('chunked', 'unchunked')}
  samples = timing.interleaved(runners, size.reps, 1)
  rows = {}
  for name in functions:
    median = statistics.median(samples[name])
    rows[name] = dict(timing.summarize(samples[name]), compile_s=compile_s[name],
                      memory=memory[name], examples_per_s=case.batch_size / median)
  peak = {k: memory[k].get('peak_estimate_bytes') for k in ('chunked', 'unchunked')}
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  diff = np.abs(norms['chunked'] - norms['unchunked'])
  return {
      'case': dataclasses.asdict(case), 'label': case.label, 'chunk_size': size.pex_chunk,
      'param_bytes': int(param_bytes), 'contenders': rows,
      'chunked_vs_unchunked_peak': timing.safe_div(peak['chunked'], peak['unchunked']),
      'chunked_vs_unchunked_time': timing.ratio(samples, 'chunked', 'unchunked'),
      'norms_max_abs_diff': float(np.max(diff)),
      'norms_max_rel_diff': float(np.max(diff / np.maximum(np.abs(norms['unchunked']), 1e-30))),
      'norms_median': float(np.median(norms['unchunked'])),
      'process_max_rss_bytes': timing.max_rss_bytes(),
      'memory_note': ('peak_estimate_bytes = argument + output - alias + temp bytes from '
                      "XLA's compiled memory analysis (CPU has no device memory statistics)"),
  }


def goal_values(pex: dict) -> list[tuple[str, Any, str]]:
  pex = pex or {}
  return [('per_example_bounded_memory', pex.get('chunked_vs_unchunked_peak'),
           f"{pex.get('label')} chunk {pex.get('chunk_size')}")]


def report_lines(pex: dict) -> list[str]:
  pex = pex or {}
  if 'contenders' not in pex:
    return []
  lines = [f"\n[per_example] grad norms, {pex['label']}, chunk {pex['chunk_size']}, "
           f"params {pex['param_bytes'] / 2**20:.1f} MiB",
           f"{'contender':<16}{'ms/batch':>10}{'ex/s':>9}{'temp MiB':>10}{'peak MiB':>10}"]
  for name, c in pex['contenders'].items():
    m = c['memory']
    lines.append(f"{name:<16}{c['median_s'] * 1e3:>10.1f}{c['examples_per_s']:>9.0f}"
                 f"{m.get('temp_size_in_bytes', 0) / 2**20:>10.1f}"
                 f"{m.get('peak_estimate_bytes', 0) / 2**20:>10.1f}")
  return lines

"""Train steps of every optimiser (``steps``) and the SAM step sharded over devices (``scaling``).

``steps``: the project's own jitted train step (:func:`samjax.train.step.make_train_step`) with
SGD, samjax SAM, ``optax.contrib.sam`` (opaque mode, passed as ``tx=``), LSAM, ASAM and SAM with
in-step diagnostics, per model, plus structural facts of every compiled step (convolution and dot
counts in the optimised HLO, XLA's flop estimate), which show whether XLA shares LSAM's body
forward pass and drops its unused backward pass. Batches are placed on the devices once, so step
times exclude host-to-device transfer (the input section has its own rows for that).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from samjax.models import create_model
from samjax.train import optim
from samjax.train import step as step_lib

from experiments.bench import timing
from experiments.bench.sizes import ModelCase, Size

RHO = 0.05
LEARNING_RATE = 0.05
MOMENTUM = 0.9
NUM_TRAIN_STEPS = 10_000


class _Config(dict):
  """The slice of ``ml_collections.ConfigDict`` that samjax.train.optim reads (``.get``,
  attributes)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def optimizer_config(name: str) -> _Config:
  return _Config(name=name, rho=RHO, learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                 nesterov=False, weight_decay=0.0, schedule='cosine', grad_clip_norm=0.0,
                 adaptive_eta=0.01, head='head')


def optax_contrib_sam(config) -> optax.GradientTransformation:
  """``optax.contrib.sam`` in opaque mode with the same schedule, momentum and radius."""
  schedule = optim.learning_rate_schedule(config, NUM_TRAIN_STEPS)
  return optax.contrib.sam(
      optax.sgd(schedule, momentum=config.momentum),
      optax.chain(optax.contrib.normalize(), optax.sgd(config.rho)),
      opaque_mode=True)


def synthetic_batch(case: ModelCase, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(case.batch_size, *case.image_shape)).astype(np.float32),
          'label': rng.integers(0, case.num_classes, case.batch_size).astype(np.int32),
          'attribute': rng.integers(0, 2, case.batch_size).astype(np.int32)}


@dataclasses.dataclass
class StepContender:
  compiled: Any
  state: Any
  batch: Any
  compile_s: float
  facts: dict

  def run(self, n: int) -> None:
    state, metrics = self.state, None
    for _ in range(n):
      state, metrics = self.compiled(state, self.batch)
    jax.block_until_ready((state, metrics))
    self.state = state  # the next sample continues training: no re-use of a donated state


def build_step(case: ModelCase, opt_name: str, devices, *, dtype: str = 'float32',
               log_diagnostics: bool = False, use_optax_sam: bool = False) -> StepContender:
  """The project's train step for ``case``, compiled ahead of time and warmed up once."""
  model = create_model({'name': case.name, 'width': case.width, 'dtype': dtype},
                       case.num_classes)
  mesh = step_lib.make_mesh(devices)
  config = optimizer_config(opt_name)
  tx = optax_contrib_sam(config) if use_optax_sam else None
  tx, step = step_lib.make_train_step(
      model, mesh, step_lib.StepSpec(config, NUM_TRAIN_STEPS, log_diagnostics=log_diagnostics),
      tx=tx)
  batch_np = synthetic_batch(case)
  state = step_lib.create_train_state(model, tx, jax.random.key(0), batch_np['image'][:1])
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(batch_np, NamedSharding(mesh, P(step_lib.DATA_AXIS)))
  compiled, compile_s = timing.compile_ahead(step, state, batch)
  contender = StepContender(compiled, state, batch, compile_s, timing.hlo_facts(compiled))
  contender.run(1)  # warm-up
  return contender


STEP_CONTENDERS = {
    # name: (optimizer name, build kwargs)
    'sgd': ('sgd', {}),
    'sam': ('sam', {}),
    'optax_sam': ('sam', {'use_optax_sam': True}),
    'lsam': ('lsam', {}),
    'asam': ('asam', {}),
    'sam_diagnostics': ('sam', {'log_diagnostics': True}),
}
STEP_GOALS = ('sam_vs_optax_sam', 'sam_vs_sgd', 'lsam_vs_sgd', 'diagnostics_overhead')


def bench_steps(size: Size) -> dict[str, Any]:
  results = {}
  device = jax.devices()[:1]
  for case in size.step_models:
    timing.log(f'[steps] {case.label}: compiling {len(STEP_CONTENDERS)} steps')
    contenders = {name: build_step(case, opt, device, dtype=size.dtype, **kw)
                  for name, (opt, kw) in STEP_CONTENDERS.items()}
    samples = timing.interleaved({k: c.run for k, c in contenders.items()}, size.reps,
                                 size.iters)
    rows = {}
    for name, c in contenders.items():
      rows[name] = dict(timing.summarize(samples[name]), compile_s=c.compile_s,
                        images_per_s=case.batch_size / statistics.median(samples[name]),
                        hlo=c.facts)
    ratios = {
        'sam_vs_sgd': timing.ratio(samples, 'sam', 'sgd'),
        'sam_vs_optax_sam': timing.ratio(samples, 'sam', 'optax_sam'),
        'optax_sam_vs_sgd': timing.ratio(samples, 'optax_sam', 'sgd'),
        'lsam_vs_sgd': timing.ratio(samples, 'lsam', 'sgd'),
        'asam_vs_sgd': timing.ratio(samples, 'asam', 'sgd'),
        'diagnostics_overhead': timing.ratio(samples, 'sam_diagnostics', 'sam'),
    }
    sgd_facts = contenders['sgd'].facts
    structure = {name: {'convolutions_vs_sgd': timing.safe_div(c.facts['convolutions'],
                                                               sgd_facts['convolutions']),
                        'flops_vs_sgd': timing.safe_div(c.facts.get('flops'),
                                                        sgd_facts.get('flops'))}
                 for name, c in contenders.items()}
    results[case.name] = {'case': dataclasses.asdict(case), 'label': case.label,
                          'contenders': rows, 'ratios': ratios, 'structure': structure}
    del contenders
  return results


def bench_scaling(size: Size) -> dict[str, Any]:
  """The SAM step with a fixed global batch sharded over 1, 2, 4, 8 devices."""
  case = size.scaling_model
  devices = jax.devices()
  if len(devices) < max(size.device_counts):
    devices = jax.devices('cpu')  # e.g. one GPU: scale over host devices instead
  counts = [n for n in size.device_counts if n <= len(devices)]
  timing.log(f'[scaling] {case.label} SAM over {counts} {devices[0].platform} devices')
  contenders = {}
  for n in counts:
    if case.batch_size % n:
      continue
    contenders[f'{n}'] = build_step(case, 'sam', devices[:n], dtype=size.dtype)
  samples = timing.interleaved({k: c.run for k, c in contenders.items()}, size.reps, size.iters)
  base = statistics.median(samples[str(counts[0])])
  rows = {}
  for name, c in contenders.items():
    median = statistics.median(samples[name])
    rows[name] = dict(timing.summarize(samples[name]), devices=int(name), compile_s=c.compile_s,
                      images_per_s=case.batch_size / median, speedup=base / median,
                      efficiency=base / median / int(name))
  return {'case': dataclasses.asdict(case), 'label': case.label, 'optimizer': 'sam',
          'platform': devices[0].platform, 'host_cpu_count': os.cpu_count(),
          'global_batch_fixed': True, 'devices': rows}


def goal_values(steps: dict) -> list[tuple[str, float, str]]:
  out = []
  for r in (steps or {}).values():
    if isinstance(r, dict) and 'ratios' in r:  # also skips an error section's fields
      out += [(g, r['ratios'][g]['ratio_of_medians'], r['label']) for g in STEP_GOALS]
  return out


def report_lines(steps: dict, scaling: dict, reps: int) -> list[str]:
  lines = []
  steps = steps or {}
  if steps.get('status'):
    lines.append(f"\n[steps] {steps.get('status')}: {steps.get('reason')}")
    steps = {}
  for r in steps.values():
    lines.append(f"\n[steps] {r['label']}  (median of {reps} interleaved samples)")
    lines.append(f"{'contender':<17}{'ms/step':>9}{'x SGD':>8}{'img/s':>9}{'compile s':>10}"
                 f"{'convs':>7}{'dots':>6}{'GFLOP':>9}")
    sgd = r['contenders']['sgd']['median_s']
    for name, c in r['contenders'].items():
      flops = c['hlo'].get('flops', float('nan')) / 1e9
      lines.append(f"{name:<17}{c['median_s'] * 1e3:>9.2f}{c['median_s'] / sgd:>8.3f}"
                   f"{c['images_per_s']:>9.0f}{c['compile_s']:>10.1f}"
                   f"{c['hlo']['convolutions']:>7d}{c['hlo']['dots']:>6d}{flops:>9.3f}")
    for k, v in r['ratios'].items():
      lines.append(f"  {k:<22} {v['ratio_of_medians']:.3f}  "
                   f"(paired {v['median_paired_ratio']:.3f})")
  sc = scaling or {}
  if 'devices' in sc:
    lines.append(f"\n[scaling] SAM, {sc['label']}, global batch fixed, {sc['platform']} devices "
                 f"on {sc['host_cpu_count']} host CPUs")
    lines.append(f"{'devices':<9}{'ms/step':>9}{'img/s':>9}{'speedup':>9}{'efficiency':>11}")
    for n, c in sc['devices'].items():
      lines.append(f"{n:<9}{c['median_s'] * 1e3:>9.2f}{c['images_per_s']:>9.0f}"
                   f"{c['speedup']:>9.2f}{c['efficiency']:>11.2f}")
  return lines

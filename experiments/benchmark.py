"""Performance benchmark of samjax: step times, overheads, scaling, sweeps, diagnostics, input.

One command, one process::

    python experiments/benchmark.py --size=small --out=bench.json

Sizes: ``tiny`` (CI smoke test, seconds; tiny models, so its numbers measure dispatch overhead
more than arithmetic), ``small`` (the paper's conv net on CIFAR-MNIST-shaped batches and a
full-width ResNet-18 on 32x32 images; minutes on 2 CPU cores) and ``full`` (ResNet-18 on CelebA's
64x64 images with batch 128; meant for an accelerator).

Method. Every section builds all its contenders first (compilation is timed separately, ahead of
time, with ``jit(...).lower(...).compile()``), runs each once to warm up, then times them
*round-robin*: repetition ``r`` runs every contender once (in alternating order), so slow drifts
of a shared machine hit all contenders alike. Each sample is ``iters`` calls followed by
``jax.block_until_ready``; the reported time of a contender is the median of its samples, and a
ratio is the ratio of two medians (the median of the per-repetition paired ratios is given too).
Batches are placed on the devices once, so step times exclude host-to-device transfer (the input
pipeline has its own section).

Sections (each a key of the JSON written to ``--out``):

* ``steps``: the project's own jitted train step (:func:`samjax.train.step.make_train_step`) with SGD,
  samjax SAM, ``optax.contrib.sam`` (opaque mode, passed as ``tx=``), LSAM, ASAM, and SAM with
  in-step diagnostics (``log_diagnostics=True``), per model; plus structural facts of every
  compiled step (convolution and dot counts in the optimised HLO, XLA's flop estimate), which
  show whether XLA shares LSAM's body forward pass and drops its unused backward pass.
* ``scaling``: the SAM step with a fixed global batch sharded over 1, 2, 4, 8 devices.
* ``toy``: the toy study's vmapped sweep against the same runs one at a time through the same
  compiled functions, compilation included, in (runs x steps) / s.
* ``per_example``: :func:`samjax.diagnostics.per_example_grad_norms` chunked and unchunked:
  examples / s and XLA's compiled memory analysis (argument, output, temp bytes).
* ``pipeline``: ``samjax.data`` ``TrainBatches.batch_at`` images / s per dataset (digits
  dominoes built for real, the catalog-based datasets under ``tfds.testing.mock_data``) against
  the images / s the dataset's own train step consumes. Where ``samjax.data`` cannot be imported
  (no TensorFlow, e.g. on an accelerator machine) only the consumer steps are timed; a later run
  with ``--consumers-from=that.json`` compares this host's pipeline with those steps.
* ``goals``: PASS / MISS of each performance goal with the measured value.

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

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import unittest.mock  # noqa: E402
from typing import Any, Callable, Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from samjax import diagnostics  # noqa: E402
from samjax.train import optim  # noqa: E402
from samjax.train import step as step_lib  # noqa: E402
from samjax.models import create_model, init_variables  # noqa: E402

SECTIONS = ('steps', 'scaling', 'toy', 'per_example', 'pipeline')


# ----------------------------------------------------------------------------
# Sizes.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelCase:
  """A model and the batch it trains on."""

  name: str                 # 'convnet' | 'resnet18'
  width: int
  image_shape: tuple        # (H, W, C)
  batch_size: int
  num_classes: int = 2

  @property
  def label(self) -> str:
    h, w, c = self.image_shape
    return f'{self.name}(w={self.width}) {h}x{w}x{c} b={self.batch_size}'


@dataclasses.dataclass(frozen=True)
class PipelineCase:
  """One dataset of the input-pipeline section.

  Attributes:
    config: the file under configs/ (without .py) whose data fields, batch size and model are used.
    source: 'real' (built for real), 'mock' (``tfds.testing.mock_data``) or 'mock_sources' (our
      stacked builders built for real from mocked catalog sources, as tests/test_data_builders.py
      does).
    mock_examples: examples per split of the mocked data.
    data_overrides, batch_size: smaller settings for the tiny size.
  """

  config: str
  source: str
  mock_examples: int = 0
  data_overrides: tuple = ()
  batch_size: int = 0


@dataclasses.dataclass(frozen=True)
class Size:
  reps: int                          # round-robin repetitions per timed comparison
  iters: int                         # calls per timed sample
  step_models: tuple                 # ModelCase per model of the steps section
  scaling_model: ModelCase
  device_counts: tuple
  toy_overrides: tuple               # (key, value) overrides of configs/toy.py's sweep
  toy_runs: int                      # keep the first runs of the sweep (0: all)
  toy_steps: int                     # steps per run
  toy_chunk: int                     # steps per compiled chunk (config.eval_every)
  toy_reps: int
  pex_model: ModelCase               # per-example-gradient model and batch
  pex_chunk: int
  pipeline_datasets: tuple           # PipelineCase per dataset
  pipeline_batches: int              # batch_at calls per timed sample
  pipeline_step_reps: int            # samples of a consumer step not timed in the steps section
  pipeline_consumer: Optional[ModelCase] = None  # tiny: stand-in model of every consumer
  pex_reference: bool = True         # also time one batch gradient of the same batch


COMPUTE_DTYPE = 'float32'  # --dtype: the models' activations and matmuls
CONVNET_TINY = ModelCase('convnet', 8, (32, 16, 1), 16)  # digits dominoes' shape
CONVNET_PAPER = ModelCase('convnet', 32, (64, 32, 3), 100)  # CIFAR-MNIST, batch 100 (App. B)

SIZES = {
    'tiny': Size(
        reps=3, iters=2,
        step_models=(CONVNET_TINY,),
        scaling_model=CONVNET_TINY, device_counts=(1, 2, 4, 8),
        toy_overrides=(('methods', ('lsam',)), ('seeds', (0, 1)), ('rhos', (1.0, 2.0)),
                       ('complexities', (360.0,))),
        toy_runs=0, toy_steps=20, toy_chunk=10, toy_reps=1,
        pex_model=CONVNET_TINY, pex_chunk=4, pex_reference=False,
        pipeline_datasets=(PipelineCase('digits_dominoes', 'real', batch_size=16),),
        pipeline_batches=3, pipeline_step_reps=3, pipeline_consumer=CONVNET_TINY),
    'small': Size(
        reps=5, iters=3,
        step_models=(CONVNET_PAPER, ModelCase('resnet18', 64, (32, 32, 3), 32)),
        scaling_model=ModelCase('convnet', 32, (64, 32, 3), 128), device_counts=(1, 2, 4, 8),
        toy_overrides=(('methods', ('sgd', 'lsam')),),  # 72 runs: 12 SGD, 60 LSAM
        toy_runs=0, toy_steps=200, toy_chunk=100, toy_reps=2,
        pex_model=ModelCase('resnet18', 64, (32, 32, 3), 32), pex_chunk=8,
        pipeline_datasets=(
            PipelineCase('digits_dominoes', 'real'),
            PipelineCase('cifar_mnist', 'mock_sources', 2000),
            PipelineCase('fmnist_mnist', 'mock_sources', 2000),
            PipelineCase('celeba', 'mock', 512, data_overrides=(('image_size', 32),),
                         batch_size=32)),  # = the steps section's ResNet-18 case
        pipeline_batches=10, pipeline_step_reps=3),
    'full': Size(
        reps=9, iters=10,
        step_models=(CONVNET_PAPER, ModelCase('resnet18', 64, (64, 64, 3), 128)),
        scaling_model=ModelCase('convnet', 32, (64, 32, 3), 256), device_counts=(1, 2, 4, 8),
        toy_overrides=(),  # the paper's whole main sweep: 234 runs in 6 method groups
        toy_runs=0, toy_steps=3000, toy_chunk=200, toy_reps=1,
        pex_model=ModelCase('resnet18', 64, (64, 64, 3), 128), pex_chunk=16,
        pipeline_datasets=(
            PipelineCase('digits_dominoes', 'real'),
            PipelineCase('cifar_mnist', 'mock_sources', 2000),
            PipelineCase('fmnist_mnist', 'mock_sources', 2000),
            PipelineCase('celeba', 'mock', 1024),
            PipelineCase('waterbirds', 'mock', 1024),
            PipelineCase('domainbed', 'mock', 512)),
        pipeline_batches=10, pipeline_step_reps=3),
}

GOALS = {
    # name: (threshold, '<=' | '>=', description)
    'sam_vs_optax_sam': (1.05, '<=', 'samjax SAM step / optax.contrib.sam step'),
    'sam_vs_sgd': (2.05, '<=', 'samjax SAM step / SGD step'),
    'lsam_vs_sgd': (1.15, '<=', 'LSAM step / SGD step'),
    'diagnostics_overhead': (1.05, '<=', 'SAM step with in-step diagnostics / without'),
    'toy_vmap_speedup': (30.0, '>=', 'toy sweep vmapped / one at a time, (runs x steps) per s'),
    'per_example_bounded_memory': (1.0, '<', 'chunked / unchunked peak bytes (XLA estimate)'),
    'pipeline_vs_step': (2.0, '>=', 'input pipeline images/s / train step images/s'),
}


# ----------------------------------------------------------------------------
# Timing helpers.
# ----------------------------------------------------------------------------


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
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Structural facts of compiled programs.
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# Train steps.
# ----------------------------------------------------------------------------

RHO = 0.05
LEARNING_RATE = 0.05
MOMENTUM = 0.9
NUM_TRAIN_STEPS = 10_000


class _Config(dict):
  """The slice of ``ml_collections.ConfigDict`` that samjax.train.optim reads (``.get``, attributes)."""

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
    self.state = state


def build_step(case: ModelCase, opt_name: str, devices, *, log_diagnostics: bool = False,
               use_optax_sam: bool = False) -> StepContender:
  """The project's train step for ``case``, compiled ahead of time and warmed up once."""
  model = create_model({'name': case.name, 'width': case.width, 'dtype': COMPUTE_DTYPE},
                       case.num_classes)
  mesh = step_lib.make_mesh(devices)
  config = optimizer_config(opt_name)
  tx = optax_contrib_sam(config) if use_optax_sam else None
  tx, step = step_lib.make_train_step(model, config, NUM_TRAIN_STEPS, mesh,
                                      log_diagnostics=log_diagnostics, tx=tx)
  batch_np = synthetic_batch(case)
  state = step_lib.create_train_state(model, tx, jax.random.key(0), batch_np['image'][:1])
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = jax.device_put(batch_np, NamedSharding(mesh, P(step_lib.DATA_AXIS)))
  compiled, compile_s = timed(lambda: step.lower(state, batch).compile())
  contender = StepContender(compiled, state, batch, compile_s, hlo_facts(compiled))
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


def bench_steps(size: Size) -> dict[str, Any]:
  results = {}
  device = jax.devices()[:1]
  for case in size.step_models:
    log(f'[steps] {case.label}: compiling {len(STEP_CONTENDERS)} steps')
    contenders = {name: build_step(case, opt, device, **kw)
                  for name, (opt, kw) in STEP_CONTENDERS.items()}
    samples = interleaved({k: c.run for k, c in contenders.items()}, size.reps, size.iters)
    rows = {}
    for name, c in contenders.items():
      rows[name] = dict(summarize(samples[name]), compile_s=c.compile_s,
                        images_per_s=case.batch_size / statistics.median(samples[name]),
                        hlo=c.facts)
    ratios = {
        'sam_vs_sgd': ratio(samples, 'sam', 'sgd'),
        'sam_vs_optax_sam': ratio(samples, 'sam', 'optax_sam'),
        'optax_sam_vs_sgd': ratio(samples, 'optax_sam', 'sgd'),
        'lsam_vs_sgd': ratio(samples, 'lsam', 'sgd'),
        'asam_vs_sgd': ratio(samples, 'asam', 'sgd'),
        'diagnostics_overhead': ratio(samples, 'sam_diagnostics', 'sam'),
    }
    sgd_facts = contenders['sgd'].facts
    structure = {name: {'convolutions_vs_sgd': _safe_div(c.facts['convolutions'],
                                                         sgd_facts['convolutions']),
                        'flops_vs_sgd': _safe_div(c.facts.get('flops'), sgd_facts.get('flops'))}
                 for name, c in contenders.items()}
    results[case.name] = {'case': dataclasses.asdict(case), 'label': case.label,
                          'contenders': rows, 'ratios': ratios, 'structure': structure}
    del contenders
  return results


def _safe_div(a, b) -> Optional[float]:
  if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
    return None
  return float(a) / float(b)


# ----------------------------------------------------------------------------
# Sharded scaling.
# ----------------------------------------------------------------------------


def bench_scaling(size: Size) -> dict[str, Any]:
  case = size.scaling_model
  devices = jax.devices()
  if len(devices) < max(size.device_counts):
    devices = jax.devices('cpu')  # e.g. one GPU: scale over host devices instead
  counts = [n for n in size.device_counts if n <= len(devices)]
  log(f'[scaling] {case.label} SAM over {counts} {devices[0].platform} devices')
  contenders = {}
  for n in counts:
    if case.batch_size % n:
      continue
    contenders[f'{n}'] = build_step(case, 'sam', devices[:n])
  samples = interleaved({k: c.run for k, c in contenders.items()}, size.reps, size.iters)
  base = statistics.median(samples[str(counts[0])])
  rows = {}
  for name, c in contenders.items():
    median = statistics.median(samples[name])
    rows[name] = dict(summarize(samples[name]), devices=int(name), compile_s=c.compile_s,
                      images_per_s=case.batch_size / median, speedup=base / median,
                      efficiency=base / median / int(name))
  return {'case': dataclasses.asdict(case), 'label': case.label, 'optimizer': 'sam',
          'platform': devices[0].platform, 'host_cpu_count': os.cpu_count(),
          'global_batch_fixed': True, 'devices': rows}


# ----------------------------------------------------------------------------
# Toy sweep.
# ----------------------------------------------------------------------------


def load_config_file(relative_path: str, arg: Optional[str] = None):
  """``get_config(arg)`` of a config file of the repository (``configs/*.py``)."""
  from samjax.config import load_config_file as load  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), relative_path)
  return load(path, arg)


def toy_config(size: Size):
  """The paper's main toy sweep (``configs/toy.py``), cut to the size's methods and steps."""
  config = load_config_file(os.path.join('configs', 'toy.py'))
  for key, value in size.toy_overrides:
    config[key] = value
  config.num_steps = size.toy_steps
  config.eval_every = size.toy_chunk
  return config


def bench_toy(size: Size) -> dict[str, Any]:
  """``samjax.toy.study.run_sweep`` on all runs at once vs on one run at a time.

  Both contenders call the study's own ``run_sweep`` (one vmapped, jitted program per method
  group, steps in ``lax.scan`` chunks, results fetched after every chunk); the second calls it
  with one run per call. Every timed sample starts from empty compilation caches, so each
  contender pays its compilations (one per method group and run count) inside its time.
  """
  try:
    from samjax.toy import study as toy_study
    from samjax.toy import train as toy_train
  except ImportError as e:
    return {'status': 'unavailable', 'reason': f'samjax.toy.study is not importable: {e!r}'}
  config = toy_config(size)
  toy_study.validate(config)
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
  log(f'[toy] {len(rows)} runs ({", ".join(methods)}) x {steps} steps, vmapped vs one at a '
      'time, compilation included')
  samples = interleaved({'vmapped': vmapped, 'one_at_a_time': one_at_a_time}, size.toy_reps, 1)
  # Warm (compilation excluded), to separate compile time from run time: the last cold sample
  # left the one-run programs compiled; compile the all-runs ones again once.
  vmapped(None, cold=False)
  warm = interleaved({'vmapped': functools.partial(vmapped, cold=False),
                      'one_at_a_time': functools.partial(one_at_a_time, cold=False)},
                     max(size.toy_reps, 1), 1)
  work = len(rows) * steps
  contenders = {}
  for name in samples:
    contenders[name] = dict(
        summarize(samples[name]), run_steps_per_s=work / statistics.median(samples[name]),
        warm=dict(summarize(warm[name]), run_steps_per_s=work / statistics.median(warm[name])))
  speedup = statistics.median(samples['one_at_a_time']) / statistics.median(samples['vmapped'])
  warm_speedup = statistics.median(warm['one_at_a_time']) / statistics.median(warm['vmapped'])
  return {'status': 'ok', 'runs': len(rows), 'methods': methods, 'steps_per_run': steps,
          'chunk_steps': int(config.eval_every), 'batch_size': int(config.batch_size),
          'method_groups': len({(r.method, r.batch_size) for r in rows}),
          'contenders': contenders, 'speedup': speedup, 'warm_speedup': warm_speedup,
          'api': 'samjax.toy.study.run_sweep(config, rows, progress=False)'}


# ----------------------------------------------------------------------------
# Per-example gradients.
# ----------------------------------------------------------------------------


def bench_per_example(size: Size) -> dict[str, Any]:
  case = size.pex_model
  model = create_model({'name': case.name, 'width': case.width, 'dtype': COMPUTE_DTYPE},
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
    log(f'[per_example] {case.label}: compiling {name}')
    compiled[name], compile_s[name] = timed(lambda: jax.jit(fn).lower(params, batch).compile())
    memory[name] = memory_facts(compiled[name])

    def run(n, c=compiled[name]):
      out = None
      for _ in range(n):
        out = c(params, batch)
      jax.block_until_ready(out)

    run(1)
    runners[name] = run
  norms = {name: np.asarray(compiled[name](params, batch)) for name in ('chunked', 'unchunked')}
  samples = interleaved(runners, size.reps, 1)
  rows = {}
  for name in functions:
    median = statistics.median(samples[name])
    rows[name] = dict(summarize(samples[name]), compile_s=compile_s[name], memory=memory[name],
                      examples_per_s=case.batch_size / median)
  peak = {k: memory[k].get('peak_estimate_bytes') for k in ('chunked', 'unchunked')}
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return {
      'case': dataclasses.asdict(case), 'label': case.label, 'chunk_size': size.pex_chunk,
      'param_bytes': int(param_bytes), 'contenders': rows,
      'chunked_vs_unchunked_peak': _safe_div(peak['chunked'], peak['unchunked']),
      'chunked_vs_unchunked_time': ratio(samples, 'chunked', 'unchunked'),
      'norms_max_abs_diff': float(np.max(np.abs(norms['chunked'] - norms['unchunked']))),
      'norms_max_rel_diff': float(np.max(np.abs(norms['chunked'] - norms['unchunked'])
                                         / np.maximum(np.abs(norms['unchunked']), 1e-30))),
      'norms_median': float(np.median(norms['unchunked'])),
      'process_max_rss_bytes': _max_rss_bytes(),
      'memory_note': ('peak_estimate_bytes = argument + output - alias + temp bytes from '
                      "XLA's compiled memory analysis (CPU has no device memory statistics)"),
  }


def _max_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


# ----------------------------------------------------------------------------
# Input pipeline.
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _mock_catalog_sources(num_examples: int, data_dir: str):
  """Mocked catalog datasets (mnist, cifar10, fashion_mnist) under our real stacked builders."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import dataset_builder
  from samjax.data.builders import stacked as stacked_builders
  real = {name: dataset_builder.DatasetBuilder.__dict__[name]
          for name in ('download_and_prepare', 'as_dataset', 'as_data_source')}
  real['_as_dataset'] = dataset_builder.FileReaderBuilder.__dict__['_as_dataset']
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir), \
      contextlib.ExitStack() as stack:
    for cls in (stacked_builders.CifarMnist, stacked_builders.FmnistMnist):
      for name, method in real.items():
        stack.enter_context(unittest.mock.patch.object(cls, name, method))
    yield


def _load_pipeline_dataset(case: PipelineCase, data_config, data_dir: str):
  import tensorflow_datasets as tfds
  from samjax import data as data_lib
  data_config = dict(data_config)
  data_config['data_dir'] = data_dir
  data_config['download'] = case.source != 'real'  # mocked sources: no network either way
  if case.source == 'real':
    return data_lib.load_dataset(data_config)
  if case.source == 'mock':
    with tfds.testing.mock_data(num_examples=case.mock_examples):
      return data_lib.load_dataset(data_config)
  if case.source == 'mock_sources':
    with _mock_catalog_sources(case.mock_examples, data_dir):
      return data_lib.load_dataset(data_config)
  raise ValueError(f'unknown source {case.source!r}')


# Image shape and number of classes of every dataset as load_dataset returns it, so that the
# consumer step can be timed where samjax.data cannot be imported (e.g. an accelerator machine
# without TensorFlow). None: (image_size, image_size, 3) from the data config.
DATASET_SHAPES = {
    'digits_dominoes': ((32, 16, 1), 2),
    'cifar_mnist': ((64, 32, 3), 2),
    'fmnist_mnist': ((56, 28, 1), 5),
    'celeb_a': (None, 2),
    'waterbirds': (None, 2),
    'domainbed': (None, 7),  # PACS: 7 classes
}


def _consumer_case(size: Size, config, data_config: dict, batch_size: int) -> ModelCase:
  shape, num_classes = DATASET_SHAPES[data_config['name']]
  if shape is None:
    shape = (int(data_config['image_size']), int(data_config['image_size']), 3)
  name = size.pipeline_consumer.name if size.pipeline_consumer else config.model.name
  width = (size.pipeline_consumer.width if size.pipeline_consumer
           else (32 if name == 'convnet' else 64))
  return ModelCase(name, width, tuple(shape), batch_size, num_classes)


def _steps_by_case(steps_results: Optional[dict]) -> dict:
  found = {}
  for r in (steps_results or {}).values():
    if isinstance(r, dict) and 'case' in r:
      c = r['case']
      key = ModelCase(c['name'], c['width'], tuple(c['image_shape']), c['batch_size'],
                      c['num_classes'])
      found[key] = {k: r['contenders'][k]['median_s'] for k in ('sgd', 'sam')}
  return found


def bench_pipeline(size: Size, steps_results: Optional[dict],
                   consumers_from: str = '') -> dict[str, Any]:
  """``TrainBatches.batch_at`` throughput per dataset against the train step's consumption.

  The pipeline runs on the host (numpy: gather, optional crop + flip, normalisation). The
  consumer is the dataset config's own model, image shape and batch size; its SGD step (the
  fastest, so the most demanding consumer) and SAM step are timed as in the steps section, taken
  from it when the case is the same, or taken from another run's JSON (``consumers_from``, e.g.
  the same benchmark on an accelerator, whose host may lack TensorFlow).
  """
  try:
    import tensorflow_datasets as tfds
    from samjax import data as data_lib
    tfds.disable_progress_bar()
    data_error = None
  except ImportError as e:
    data_lib, data_error = None, repr(e)
  known_steps = _steps_by_case(steps_results)
  foreign = {}
  if consumers_from:
    other = json.loads(epath.Path(consumers_from).read_text())  # local or gs://
    label = f"{consumers_from} ({other['meta']['backend']}: {other['meta']['device_kind']})"
    for ds, r in ((other.get('pipeline') or {}).get('datasets') or {}).items():
      if 'step_s' in r:
        foreign[ds] = (r['step_s'], label, r.get('consumer'))
  data_dir = tempfile.mkdtemp(prefix='samjax_bench_tfds_')
  datasets = {}
  try:
    for case in size.pipeline_datasets:
      name = case.config
      try:
        config = load_config_file(os.path.join('configs', f'{case.config}.py'))
        data_config = config.data.to_dict()
        data_config.update(dict(case.data_overrides))
        batch_size = case.batch_size or int(config.batch_size)
        augment = bool(data_config.get('augment', False))
        consumer = _consumer_case(size, config, data_config, batch_size)
        row = {'source': case.source, 'batch_size': batch_size, 'augment': augment,
               'consumer': consumer.label}
        # The consumer: the train step at this dataset's shapes.
        if name in foreign:
          row['step_s'], row['consumer_source'], foreign_label = foreign[name]
          if foreign_label != consumer.label:
            raise ValueError(f'{consumers_from} timed {foreign_label}, not {consumer.label}')
        elif consumer in known_steps:
          row['step_s'], row['consumer_source'] = known_steps[consumer], 'steps section'
        else:
          log(f'[pipeline] {name}: timing the consumer step {consumer.label}')
          contenders = {k: build_step(consumer, k, jax.devices()[:1]) for k in ('sgd', 'sam')}
          step_samples = interleaved({k: c.run for k, c in contenders.items()},
                                     size.pipeline_step_reps, 1)
          row['step_s'] = {k: statistics.median(v) for k, v in step_samples.items()}
          row['consumer_source'] = 'timed here'
          del contenders
        row['step_images_per_s'] = batch_size / row['step_s']['sgd']
        row['sam_step_images_per_s'] = batch_size / row['step_s']['sam']
        # The pipeline.
        if data_lib is None:
          row['pipeline_status'] = f'samjax.data is not importable here: {data_error}'
          datasets[name] = row
          continue
        log(f'[pipeline] {name}: loading ({case.source})')
        dataset, row['load_s'] = timed(lambda: _load_pipeline_dataset(case, data_config, data_dir))
        if tuple(dataset.image_shape) != consumer.image_shape:
          raise ValueError(f'{name}: loaded images {dataset.image_shape}, expected '
                           f'{consumer.image_shape} (update DATASET_SHAPES)')
        batches = data_lib.TrainBatches(dataset.train, dataset, batch_size, seed=0,
                                        augment=augment)

        def pipeline_run(n, batches=batches, counter=itertools.count()):
          for _ in range(n):
            batches.batch_at(next(counter))

        def pipeline_with_transfer(n, batches=batches, counter=itertools.count()):
          out = None
          for _ in range(n):
            out = jax.device_put(batches.batch_at(next(counter)))
          jax.block_until_ready(out)

        # What training uses (train.py): TrainBatches.iterate with input_workers threads and
        # uint8 images, which the jitted step normalises on the device.
        workers = int(config.get('input_workers', 0)) or 1
        training_batches = data_lib.TrainBatches(dataset.train, dataset, batch_size, seed=0,
                                                 augment=augment, normalize=False)
        prefetched = training_batches.iterate(10_000, num_workers=workers)

        def pipeline_prefetched(n, prefetched=prefetched):
          out = None
          for _ in range(n):
            out = jax.device_put(next(prefetched))
          jax.block_until_ready(out)

        pipe = interleaved({'batch_at': pipeline_run, 'batch_at+device_put': pipeline_with_transfer,
                            'iterate': pipeline_prefetched},
                           size.reps, size.pipeline_batches)
        prefetched.close()
        single_s = statistics.median(pipe['batch_at'])
        pipe_s = statistics.median(pipe['iterate'])  # host work and transfer, as in training
        row.update({
            'train_examples': len(dataset.train), 'image_shape': list(dataset.image_shape),
            'batch_at': summarize(pipe['batch_at']),
            'batch_at_device_put': summarize(pipe['batch_at+device_put']),
            'iterate': summarize(pipe['iterate']),
            'input_workers': workers,
            'single_thread_images_per_s': batch_size / single_s,
            'pipeline_images_per_s': batch_size / pipe_s,
            'pipeline_with_transfer_images_per_s':
                batch_size / statistics.median(pipe['batch_at+device_put']),
            'pipeline_vs_step': row['step_s']['sgd'] / pipe_s,
            'pipeline_vs_sam_step': row['step_s']['sam'] / pipe_s,
        })
        datasets[name] = row
      except Exception as e:  # one dataset's failure keeps the others
        datasets[name] = {'status': 'error', 'reason': repr(e),
                          'traceback': traceback.format_exc()}
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)
  result = {'status': 'ok' if data_lib is not None else 'consumers_only', 'datasets': datasets,
            'note': ('images/s delivered to the device by TrainBatches.iterate (uint8, normalised '
                     'in the step) with the config\'s input_workers threads, vs images/s of '
                     "the dataset's train step (SGD: the most demanding consumer)")}
  if data_lib is None:
    result['reason'] = f'samjax.data is not importable here: {data_error}'
  return result


# ----------------------------------------------------------------------------
# Goals and report.
# ----------------------------------------------------------------------------


def _verdict(name: str, value: Optional[float], where: str) -> dict[str, Any]:
  threshold, op, description = GOALS[name]
  if value is None or not math.isfinite(value):
    return {'goal': name, 'where': where, 'description': description, 'value': value,
            'threshold': f'{op} {threshold}', 'verdict': 'NOT MEASURED'}
  ok = {'<=': value <= threshold, '>=': value >= threshold, '<': value < threshold}[op]
  return {'goal': name, 'where': where, 'description': description, 'value': value,
          'threshold': f'{op} {threshold}', 'verdict': 'PASS' if ok else 'MISS'}


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
  goals = []
  for model, r in (results.get('steps') or {}).items():
    if not isinstance(r, dict) or 'ratios' not in r:  # also skips an error section's fields
      continue
    for g in ('sam_vs_optax_sam', 'sam_vs_sgd', 'lsam_vs_sgd', 'diagnostics_overhead'):
      goals.append(_verdict(g, r['ratios'][g]['ratio_of_medians'], r['label']))
  toy = results.get('toy') or {}
  goals.append(_verdict('toy_vmap_speedup', toy.get('speedup'),
                        f"{toy.get('runs')} runs x {toy.get('steps_per_run')} steps"))
  pex = results.get('per_example') or {}
  goals.append(_verdict('per_example_bounded_memory', pex.get('chunked_vs_unchunked_peak'),
                        f"{pex.get('label')} chunk {pex.get('chunk_size')}"))
  pipeline = results.get('pipeline') or {}
  for ds, r in (pipeline.get('datasets') or {}).items():
    where = ds if r.get('consumer_source') in (None, 'steps section', 'timed here') else (
        f"{ds} (step from {r['consumer_source']})")
    goals.append(_verdict('pipeline_vs_step', r.get('pipeline_vs_step'), where))
  if not pipeline.get('datasets'):
    goals.append(_verdict('pipeline_vs_step', None, 'samjax.data'))
  return goals


def format_report(results: dict[str, Any]) -> str:
  lines = []
  meta = results['meta']
  lines.append(f"samjax benchmark, size={meta['size']}, backend={meta['backend']} "
               f"({meta['device_kind']}), {meta['cpu_count']} host CPUs, jax {meta['jax']}")
  steps = results.get('steps') or {}
  if steps.get('status'):
    lines.append(f"\n[steps] {steps.get('status')}: {steps.get('reason')}")
    steps = {}
  for model, r in steps.items():
    lines.append(f"\n[steps] {r['label']}  (median of {meta['reps']} interleaved samples)")
    lines.append(f"{'contender':<17}{'ms/step':>9}{'x SGD':>8}{'img/s':>9}{'compile s':>10}"
                 f"{'convs':>7}{'dots':>6}{'GFLOP':>9}")
    sgd = r['contenders']['sgd']['median_s']
    for name, c in r['contenders'].items():
      flops = c['hlo'].get('flops', float('nan')) / 1e9
      lines.append(f"{name:<17}{c['median_s'] * 1e3:>9.2f}{c['median_s'] / sgd:>8.3f}"
                   f"{c['images_per_s']:>9.0f}{c['compile_s']:>10.1f}"
                   f"{c['hlo']['convolutions']:>7d}{c['hlo']['dots']:>6d}{flops:>9.3f}")
    for k, v in r['ratios'].items():
      lines.append(f"  {k:<22} {v['ratio_of_medians']:.3f}  (paired {v['median_paired_ratio']:.3f})")
  sc = results.get('scaling')
  if sc and 'devices' in sc:
    lines.append(f"\n[scaling] SAM, {sc['label']}, global batch fixed, {sc['platform']} devices "
                 f"on {sc['host_cpu_count']} host CPUs")
    lines.append(f"{'devices':<9}{'ms/step':>9}{'img/s':>9}{'speedup':>9}{'efficiency':>11}")
    for n, c in sc['devices'].items():
      lines.append(f"{n:<9}{c['median_s'] * 1e3:>9.2f}{c['images_per_s']:>9.0f}"
                   f"{c['speedup']:>9.2f}{c['efficiency']:>11.2f}")
  toy = results.get('toy') or {}
  if toy.get('status') == 'ok':
    lines.append(f"\n[toy] run_sweep, {toy['runs']} runs ({', '.join(toy['methods'])}) x "
                 f"{toy['steps_per_run']} steps (compilation included; warm in brackets)")
    for name, c in toy['contenders'].items():
      lines.append(f"{name:<15}{c['median_s']:>9.2f} s {c['run_steps_per_s']:>12.0f} run-steps/s"
                   f"   [{c['warm']['median_s']:.3f} s, {c['warm']['run_steps_per_s']:.0f}/s]")
    lines.append(f"  speedup {toy['speedup']:.1f}x (warm {toy['warm_speedup']:.1f}x)")
  elif toy:
    lines.append(f"\n[toy] {toy.get('status')}: {toy.get('reason')}")
  pex = results.get('per_example') or {}
  if 'contenders' in pex:
    lines.append(f"\n[per_example] grad norms, {pex['label']}, chunk {pex['chunk_size']}, "
                 f"params {pex['param_bytes'] / 2**20:.1f} MiB")
    lines.append(f"{'contender':<16}{'ms/batch':>10}{'ex/s':>9}{'temp MiB':>10}{'peak MiB':>10}")
    for name, c in pex['contenders'].items():
      m = c['memory']
      lines.append(f"{name:<16}{c['median_s'] * 1e3:>10.1f}{c['examples_per_s']:>9.0f}"
                   f"{m.get('temp_size_in_bytes', 0) / 2**20:>10.1f}"
                   f"{m.get('peak_estimate_bytes', 0) / 2**20:>10.1f}")
  pipe = results.get('pipeline') or {}
  if pipe.get('datasets'):
    lines.append('\n[pipeline] input images/s (float32 batch_at, 1 thread; the training iterator: '
                 'uint8, threads, device_put) vs the train step')
    lines.append(f"{'dataset':<18}{'source':<13}{'1 thread':>11}{'training':>11}{'f32+put':>11}"
                 f"{'SGD step':>11}{'SAM step':>11}{'ratio':>8}  consumer")
    for ds, r in pipe['datasets'].items():
      if 'step_images_per_s' not in r:
        lines.append(f"{ds:<18}{r.get('status')}: {r.get('reason')}")
        continue
      if 'pipeline_images_per_s' not in r:
        lines.append(f"{ds:<18}{'-':<13}{'-':>11}{'-':>11}{'-':>11}{r['step_images_per_s']:>11.0f}"
                     f"{r['sam_step_images_per_s']:>11.0f}{'-':>8}  {r['consumer']}")
        continue
      lines.append(f"{ds:<18}{r['source']:<13}{r['single_thread_images_per_s']:>11.0f}"
                   f"{r['pipeline_images_per_s']:>11.0f}"
                   f"{r['pipeline_with_transfer_images_per_s']:>11.0f}"
                   f"{r['step_images_per_s']:>11.0f}{r['sam_step_images_per_s']:>11.0f}"
                   f"{r['pipeline_vs_step']:>8.2f}  {r['consumer']}")
  if pipe.get('reason'):
    lines.append(f"\n[pipeline] {pipe.get('status')}: {pipe.get('reason')}")
  lines.append('\n[goals]')
  for g in results.get('goals', []):
    value = g['value']
    shown = f'{value:.3f}' if isinstance(value, float) and math.isfinite(value) else str(value)
    lines.append(f"  {g['verdict']:<12} {g['goal']:<28} {shown:>9} {g['threshold']:<7} "
                 f"{g['where']}")
  return '\n'.join(lines)


def metadata(args) -> dict[str, Any]:
  device = jax.devices()[0]
  return {'size': args.size, 'dtype': args.dtype, 'backend': jax.default_backend(),
          'device_kind': getattr(device, 'device_kind', str(device)),
          'num_devices': len(jax.devices()), 'cpu_count': os.cpu_count(),
          'machine': platform.machine(), 'python': platform.python_version(),
          'jax': jax.__version__, 'optax': optax.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'reps': SIZES[args.size].reps,
          'iters': SIZES[args.size].iters, 'argv': sys.argv[1:],
          'time': time.strftime('%Y-%m-%dT%H:%M:%S')}


def run(args) -> dict[str, Any]:
  size = SIZES[args.size]
  if args.reps:
    size = dataclasses.replace(size, reps=args.reps)
  sections = args.sections.split(',') if args.sections else list(SECTIONS)
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise SystemExit(f'unknown sections {sorted(unknown)}; choose from {SECTIONS}')
  results: dict[str, Any] = {'meta': metadata(args)}
  results['meta']['reps'] = size.reps
  start = time.perf_counter()
  builders = {
      'steps': lambda: bench_steps(size),
      'scaling': lambda: bench_scaling(size),
      'per_example': lambda: bench_per_example(size),
      'pipeline': lambda: bench_pipeline(size, results.get('steps'), args.consumers_from),
      'toy': lambda: bench_toy(size),  # last: it clears JAX's compilation caches
  }
  for name in [s for s in builders if s in sections]:
    section_start = time.perf_counter()
    try:
      results[name] = builders[name]()
    except Exception as e:  # keep the other sections' numbers
      if args.strict:
        raise
      results[name] = {'status': 'error', 'reason': repr(e), 'traceback': traceback.format_exc()}
    results['meta'].setdefault('section_wall_s', {})[name] = time.perf_counter() - section_start
  results['goals'] = evaluate_goals(results)
  results['meta']['wall_s'] = time.perf_counter() - start
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='small')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype of the models (parameters stay float32)')
  parser.add_argument('--out', default='', help='write the results as JSON to this path')
  parser.add_argument('--sections', default='', help=f'comma list of {SECTIONS}; default all')
  parser.add_argument('--reps', type=int, default=0, help='override the round-robin repetitions')
  parser.add_argument('--strict', action='store_true', help='raise on a failing section')
  parser.add_argument('--consumers-from', default='',
                      help="take the pipeline section's train-step timings from this JSON (the "
                           'same size run elsewhere, e.g. on an accelerator)')
  args = parser.parse_args(argv)
  global COMPUTE_DTYPE
  COMPUTE_DTYPE = args.dtype
  results = run(args)
  print(format_report(results), flush=True)
  if args.out:
    from samjax.io_utils import atomic_write_text  # pylint: disable=g-import-not-at-top
    # Local or gs://; atomic_write creates the parent folder.
    atomic_write_text(args.out, json.dumps(results, indent=1, default=float))
  return 0


if __name__ == '__main__':
  sys.exit(main())

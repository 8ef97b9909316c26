"""Device-resident training input (JSON section ``input``): its cost on the train step.

The paper's conv net case (CIFAR-MNIST-shaped 64x32x3 images, batch 100, samjax SAM) on one
device, three contenders timed round-robin by :func:`bench.timing.interleaved`:

* ``preplaced``: the same step (uint8 images, normalised inside it, as both placements train)
  fed a uint8 batch already on the device: no input cost at all;
* ``preplaced_f32``: the step without in-step normalisation fed a normalised float32 batch
  already on the device (the steps section's setting);
* ``device``: what training does with ``data.placement='device'``: per step the host draws the
  indices and crop/flip parameters (``TrainBatches.device_inputs``, augmentation on), makes them
  global arrays, and the step gathers, crops, flips and normalises the uint8 batch from the
  resident split (``StepSpec(device_data='replicated')``, ``resident_split``);
* ``device_inputs_preplaced``: the same step fed inputs already on the device (its on-device
  gather and augmentation alone, without the host's draws and transfer).

Two more, on every device (8 on CPU) with the batch rounded down to a multiple of their number:

* ``replicated_all``: ``device`` over all devices, the split replicated on each;
* ``sharded_all``: the same with the split sharded over the devices (what ``'auto'`` picks when
  the split exceeds one device's budget): each step adds an all-gather of the indices and a
  reduce-scatter of about one uint8 batch (``gather_batch_from_shards``).

``device_over_preplaced`` = ``device`` / ``preplaced`` (goal <= 1.05): what device-resident
input adds to the step. ``sharded_over_replicated`` = ``sharded_all`` / ``replicated_all``:
what sharding the split costs (no goal; reported as measured). ``normalization_in_step`` = ``preplaced`` / ``preplaced_f32``: what
normalising uint8 images inside the step costs (both placements do it; the host pipeline of
the ``pipeline`` section too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.bench import timing
from experiments.bench.sizes import ModelCase, Size
from experiments.bench.steps import NUM_TRAIN_STEPS, optimizer_config


def _random_split(num_examples: int, case: ModelCase, seed: int = 0):
  from samjax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return dataset_lib.Split(
      images=rng.integers(0, 256, (num_examples, *case.image_shape), dtype=np.uint8),
      labels=rng.integers(0, case.num_classes, num_examples).astype(np.int32),
      attributes=rng.integers(0, 2, num_examples).astype(np.int32),
      num_classes=case.num_classes, num_attributes=2)


class _Contender:
  """A train step and what it is fed; ``run(n)`` makes ``n`` steps and waits for them."""

  def __init__(self, step, state, feed):
    self.step, self.state, self.feed, self.calls = step, state, feed, 0

  def run(self, n: int) -> None:
    state, metrics = self.state, None
    for _ in range(n):
      state, metrics = self.step(state, *self.feed(self.calls))
      self.calls += 1
    jax.block_until_ready((state, metrics))
    self.state = state


def _contenders(case: ModelCase, opt_name: str, num_examples: int, dtype: str) -> dict:
  # samjax.data and samjax.train are imported here: the section needs no TensorFlow at import.
  from samjax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from samjax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  from samjax.models import create_model  # pylint: disable=g-import-not-at-top
  from samjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  model = create_model({'name': case.name, 'width': case.width, 'dtype': dtype},
                       case.num_classes)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(step_lib.DATA_AXIS))
  config = optimizer_config(opt_name)
  split = _random_split(num_examples, case)
  mean, std = dataset_lib.normalization_constants('mean_pixel', split.images)
  batches = input_lib.TrainBatches(split, None, case.batch_size, seed=0, augment=True,
                                   normalize=False)
  spec = step_lib.StepSpec(config, NUM_TRAIN_STEPS)
  tx, f32_step = step_lib.make_train_step(model, mesh, spec)
  spec = dataclasses.replace(spec, image_normalization=(mean, std))
  _, uint8_step = step_lib.make_train_step(model, mesh, spec)
  _, device_step = step_lib.make_train_step(
      model, mesh, dataclasses.replace(spec, device_data='replicated'))
  sample = np.zeros((1, *case.image_shape), np.float32)
  init = jax.device_put(step_lib.create_train_state(model, tx, jax.random.key(0), sample),
                        replicated)
  copy = lambda: jax.tree.map(lambda x: x.copy(), init)  # every contender donates its own state

  host_batch = batches.batch_at(0)
  normalized = ((host_batch['image'] - mean) / std).astype(np.float32)
  f32_batch = jax.device_put({**host_batch, 'image': normalized}, batch_sharding)
  uint8_batch = jax.device_put(host_batch, batch_sharding)
  resident = input_lib.resident_split(split, mesh)
  to_global = lambda inputs: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                              for k, v in inputs.items()}
  placed_inputs = to_global(batches.device_inputs(0))
  contenders = {
      'preplaced': _Contender(uint8_step, copy(), lambda i: (uint8_batch,)),
      'preplaced_f32': _Contender(f32_step, copy(), lambda i: (f32_batch,)),
      'device': _Contender(device_step, copy(),
                           lambda i: (to_global(batches.device_inputs(i)), resident)),
      'device_inputs_preplaced': _Contender(device_step, copy(),
                                            lambda i: (placed_inputs, resident)),
  }
  contenders.update(_all_device_contenders(model, config, split, case, mean, std))
  for contender in contenders.values():
    contender.run(2)  # compile and warm up
  return contenders


def _all_device_contenders(model, config, split, case: ModelCase, mean, std) -> dict:
  """``replicated_all`` and ``sharded_all``: the device-fed step on every device."""
  from samjax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  from samjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = step_lib.make_mesh()
  batch_size = max(case.batch_size // mesh.size, 1) * mesh.size
  batches = input_lib.TrainBatches(split, None, batch_size, seed=0, augment=True,
                                   normalize=False)
  batch_sharding = NamedSharding(mesh, P(step_lib.DATA_AXIS))
  to_global = lambda inputs: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                              for k, v in inputs.items()}
  sample = np.zeros((1, *case.image_shape), np.float32)
  contenders = {}
  for layout in ('replicated', 'sharded'):
    tx, step = step_lib.make_train_step(model, mesh, step_lib.StepSpec(
        config, NUM_TRAIN_STEPS, image_normalization=(mean, std), device_data=layout))
    state = jax.device_put(step_lib.create_train_state(model, tx, jax.random.key(0), sample),
                           NamedSharding(mesh, P()))
    resident = input_lib.resident_split(split, mesh, layout)
    contenders[f'{layout}_all'] = _Contender(
        step, state, lambda i, resident=resident: (to_global(batches.device_inputs(i)), resident))
  return contenders


def bench_device_input(size: Size) -> dict[str, Any]:
  case = size.input_model
  timing.log(f'[input] {case.label}, sam, {size.input_examples} resident images')
  contenders = _contenders(case, 'sam', size.input_examples, size.dtype)
  samples = timing.interleaved({k: c.run for k, c in contenders.items()}, size.input_reps,
                               size.iters)
  ratios = {'device_over_preplaced': timing.ratio(samples, 'device', 'preplaced'),
            'device_inputs_preplaced_over_preplaced': timing.ratio(
                samples, 'device_inputs_preplaced', 'preplaced'),
            'device_over_preplaced_f32': timing.ratio(samples, 'device', 'preplaced_f32'),
            'normalization_in_step': timing.ratio(samples, 'preplaced', 'preplaced_f32'),
            'sharded_over_replicated': timing.ratio(samples, 'sharded_all', 'replicated_all')}
  return {'case': case.label, 'optimizer': 'sam', 'resident_examples': size.input_examples,
          'all_devices': jax.device_count(),
          'reps': size.input_reps, 'iters': size.iters,
          'contenders': {k: timing.summarize(v) for k, v in samples.items()},
          'ratios': ratios,
          'device_over_preplaced': ratios['device_over_preplaced']['ratio_of_medians']}


def goal_values(section: dict) -> list[tuple[str, Any, str]]:
  section = section or {}
  return [('device_over_preplaced', section.get('device_over_preplaced'),
           section.get('case', 'input'))]


def report_lines(section: dict) -> list[str]:
  if not section:
    return []
  if section.get('status') == 'error':
    return ['\n[input: device-resident]', f"  error: {section['reason']}"]
  lines = [f"\n[input: device-resident] {section['case']}, {section['optimizer']}, "
           f"{section['resident_examples']} resident images"]
  for name, summary in section['contenders'].items():
    lines.append(f"  {name:<26} {summary['median_s'] * 1e3:9.2f} ms / step")
  for name, r in section['ratios'].items():
    lines.append(f"  {name:<40} {r['ratio_of_medians']:.3f} (paired median "
                 f"{r['median_paired_ratio']:.3f})")
  return lines

"""Cost of device-resident training input (``config.data.placement='device'``) on the train step.

One command, one process::

    python experiments/device_input_bench.py --reps=20 --out=device_input.json

The paper's conv net case (``benchmark.CONVNET_PAPER``: CIFAR-MNIST-shaped 64x32x3 images, batch
100, samjax SAM) on one device, three contenders timed round-robin (``benchmark.interleaved``):

* ``preplaced``: the step fed a normalised float32 batch already on the device (the steps
  section of ``experiments/benchmark.py``: no input cost at all);
* ``device``: what training does with ``placement='device'``: per step the host draws the
  indices and crop/flip parameters (``TrainBatches.device_inputs``, augmentation on), makes them
  global arrays, and the step gathers, crops, flips and normalises the uint8 batch from the
  resident split (``make_train_step(device_data=True)``, ``resident_split``);
* ``device_inputs_preplaced``: the same step fed inputs already on the device (its on-device
  gather + augment alone, without the host's draws and transfer).

Written as JSON (stdout, and ``--out``): medians per contender and
``device_over_preplaced`` (``device`` / ``preplaced``; goal <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bench  # noqa: E402  (configures XLA's host devices before jax is imported)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from samjax.data import dataset as dataset_lib  # noqa: E402
from samjax.data import input as input_lib  # noqa: E402
from samjax.models import create_model  # noqa: E402
from samjax.train import step as step_lib  # noqa: E402

GOAL = 1.05
# 'tiny': digits dominoes' shape and a narrow net, for a smoke test in seconds.
CASES = {'paper': bench.CONVNET_PAPER, 'tiny': bench.CONVNET_TINY}


def random_split(num_examples: int, case: bench.ModelCase, seed: int = 0) -> dataset_lib.Split:
  rng = np.random.default_rng(seed)
  return dataset_lib.Split(
      images=rng.integers(0, 256, (num_examples, *case.image_shape), dtype=np.uint8),
      labels=rng.integers(0, case.num_classes, num_examples).astype(np.int32),
      attributes=rng.integers(0, 2, num_examples).astype(np.int32),
      num_classes=case.num_classes, num_attributes=2)


class Contender:
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


def build(case: bench.ModelCase, opt_name: str, num_examples: int, devices) -> dict:
  model = create_model({'name': case.name, 'width': case.width, 'dtype': bench.COMPUTE_DTYPE},
                       case.num_classes)
  mesh = step_lib.make_mesh(devices)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(step_lib.DATA_AXIS))
  config = bench.optimizer_config(opt_name)
  split = random_split(num_examples, case)
  mean, std = dataset_lib.normalization_constants('mean_pixel', split.images)
  batches = input_lib.TrainBatches(split, None, case.batch_size, seed=0, augment=True,
                                   normalize=False)

  tx, preplaced_step = step_lib.make_train_step(model, config, bench.NUM_TRAIN_STEPS, mesh)
  _, device_step = step_lib.make_train_step(model, config, bench.NUM_TRAIN_STEPS, mesh,
                                            image_normalization=(mean, std), device_data=True)
  sample = np.zeros((1, *case.image_shape), np.float32)
  init = jax.device_put(step_lib.create_train_state(model, tx, jax.random.key(0), sample),
                        replicated)
  copy = lambda: jax.tree.map(lambda x: x.copy(), init)  # every contender donates its own state

  host_batch = batches.batch_at(0)
  normalized = ((host_batch['image'] - mean) / std).astype(np.float32)
  preplaced_batch = jax.device_put({**host_batch, 'image': normalized}, batch_sharding)
  resident = input_lib.resident_split(split, mesh)
  to_global = lambda inputs: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                              for k, v in inputs.items()}
  placed_inputs = to_global(batches.device_inputs(0))
  contenders = {
      'preplaced': Contender(preplaced_step, copy(), lambda i: (preplaced_batch,)),
      'device': Contender(device_step, copy(),
                          lambda i: (to_global(batches.device_inputs(i)), resident)),
      'device_inputs_preplaced': Contender(device_step, copy(),
                                           lambda i: (placed_inputs, resident)),
  }
  for contender in contenders.values():
    contender.run(2)  # compile and warm up
  return contenders


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--reps', type=int, default=20, help='round-robin repetitions')
  parser.add_argument('--iters', type=int, default=5, help='steps per timed sample')
  parser.add_argument('--examples', type=int, default=5000, help='images in the resident split')
  parser.add_argument('--case', default='paper', choices=tuple(CASES),
                      help='paper: the paper conv net case; tiny: a smoke test')
  parser.add_argument('--optimizer', default='sam', choices=('sgd', 'sam', 'lsam', 'asam'))
  parser.add_argument('--out', default=None, help='also write the JSON here')
  args = parser.parse_args(argv)
  case = CASES[args.case]
  bench.log(f'[device_input] {case.label}, {args.optimizer}, {args.examples} resident images')
  contenders = build(case, args.optimizer, args.examples, jax.devices()[:1])
  samples = bench.interleaved({k: c.run for k, c in contenders.items()}, args.reps, args.iters)
  result = {
      'case': case.label, 'optimizer': args.optimizer, 'resident_examples': args.examples,
      'reps': args.reps, 'iters': args.iters, 'backend': jax.default_backend(),
      'device': str(jax.devices()[0]), 'machine': platform.machine(),
      'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
      'contenders': {k: bench.summarize(v) for k, v in samples.items()},
      'ratios': {'device_over_preplaced': bench.ratio(samples, 'device', 'preplaced'),
                 'device_inputs_preplaced_over_preplaced': bench.ratio(
                     samples, 'device_inputs_preplaced', 'preplaced')},
  }
  value = result['ratios']['device_over_preplaced']['ratio_of_medians']
  result['device_over_preplaced'] = value
  result['goal'] = {'device_over_preplaced_at_most': GOAL, 'met': value <= GOAL}
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())

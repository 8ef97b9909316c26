"""The input pipeline (JSON section ``pipeline``) against the train step it feeds.

``samjax.data`` ``TrainBatches.batch_at`` images / s per dataset (digits dominoes built for
real, the catalog-based datasets under ``tfds.testing.mock_data``) and the training path
(``TrainBatches.iterate``: uint8, the config's ``input_workers`` threads, ``device_put``) against
the images / s the dataset's own train step consumes. Where ``samjax.data`` cannot be imported
(no TensorFlow, e.g. on an accelerator machine) only the consumer steps are timed; a later run
with ``--consumers_from=that.json`` compares this host's pipeline with those steps.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import statistics
import tempfile
import traceback
import unittest.mock
from typing import Any, Optional

import jax
from etils import epath

from experiments.bench import timing
from experiments import load_config
from experiments.bench.sizes import ModelCase, PipelineCase, Size
from experiments.bench.steps import build_step


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
        config = load_config(os.path.join('configs', f'{case.config}.py'))
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
          timing.log(f'[pipeline] {name}: timing the consumer step {consumer.label}')
          contenders = {k: build_step(consumer, k, jax.devices()[:1], dtype=size.dtype)
                        for k in ('sgd', 'sam')}
          step_samples = timing.interleaved({k: c.run for k, c in contenders.items()},
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
        timing.log(f'[pipeline] {name}: loading ({case.source})')
        dataset, row['load_s'] = timing.timed(
            lambda: _load_pipeline_dataset(case, data_config, data_dir))
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

        pipe = timing.interleaved({'batch_at': pipeline_run,
                                   'batch_at+device_put': pipeline_with_transfer,
                                   'iterate': pipeline_prefetched},
                                  size.reps, size.pipeline_batches)
        prefetched.close()
        single_s = statistics.median(pipe['batch_at'])
        pipe_s = statistics.median(pipe['iterate'])  # host work and transfer, as in training
        row.update({
            'train_examples': len(dataset.train), 'image_shape': list(dataset.image_shape),
            'batch_at': timing.summarize(pipe['batch_at']),
            'batch_at_device_put': timing.summarize(pipe['batch_at+device_put']),
            'iterate': timing.summarize(pipe['iterate']),
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


def goal_values(pipeline: dict) -> list[tuple[str, Any, str]]:
  pipeline = pipeline or {}
  out = []
  for ds, r in (pipeline.get('datasets') or {}).items():
    where = ds if r.get('consumer_source') in (None, 'steps section', 'timed here') else (
        f"{ds} (step from {r['consumer_source']})")
    out.append(('pipeline_vs_step', r.get('pipeline_vs_step'), where))
  if not pipeline.get('datasets'):
    out.append(('pipeline_vs_step', None, 'samjax.data'))
  return out


def report_lines(pipe: dict) -> list[str]:
  pipe = pipe or {}
  lines = []
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
  return lines

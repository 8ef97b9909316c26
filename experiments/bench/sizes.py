"""The benchmark's sizes: what every section runs at ``tiny``, ``small`` and ``full``."""

from __future__ import annotations

import dataclasses
from typing import Optional



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
  """One dataset of the input section.

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
  toy_main_overrides: tuple          # --config.KEY=VALUE of the timed main job; (): the real job
  grid_points: int                   # grids section: lr x rho x seed points
  grid_steps: int
  pex_model: ModelCase               # per-example-gradient model and batch
  pex_chunk: int
  pipeline_datasets: tuple           # PipelineCase per dataset
  pipeline_batches: int              # batch_at calls per timed sample
  pipeline_step_reps: int            # samples of a consumer step not timed in the steps section
  pipeline_consumer: Optional[ModelCase] = None  # tiny: stand-in model of every consumer
  pex_reference: bool = True         # also time one batch gradient of the same batch
  dtype: str = 'float32'             # --dtype: the models' activations and matmuls
  input_model: Optional[ModelCase] = None  # input section: the step fed from the resident split
  input_examples: int = 5000         # images in the resident split
  input_reps: int = 20               # its round-robin repetitions: a ratio near 1 needs many


CONVNET_TINY = ModelCase('convnet', 8, (32, 16, 1), 16)  # digits dominoes' shape
CONVNET_PAPER = ModelCase('convnet', 32, (64, 32, 3), 100)  # CIFAR-MNIST, batch 100 (App. B)

SIZES = {
    'tiny': Size(
        reps=3, iters=2,
        step_models=(CONVNET_TINY,),
        scaling_model=CONVNET_TINY, device_counts=(1, 2, 4, 8),
        toy_overrides=(('methods', ('lsam',)), ('seeds', (0, 1)), ('rhos', (1.0, 2.0)),
                       ('noflip_rhos', ()), ('complexities', (360.0,))),
        toy_runs=0, toy_steps=20, toy_chunk=10, toy_reps=1,
        # The main job on a 4-run, 20-step sweep: the same code path as the real one in seconds.
        toy_main_overrides=(('methods', "('lsam',)"), ('seeds', '(0,)'), ('rhos', '(1.0,)'),
                            ('noflip_rhos', '()'),
                            ('complexities', '(360.0, 540.0)'), ('num_steps', '20'),
                            ('eval_every', '10'), ('num_probe', '200')),
        grid_points=2, grid_steps=3,
        pex_model=CONVNET_TINY, pex_chunk=4, pex_reference=False,
        pipeline_datasets=(PipelineCase('digits_dominoes', 'real', batch_size=16),),
        pipeline_batches=3, pipeline_step_reps=3, pipeline_consumer=CONVNET_TINY,
        input_model=CONVNET_TINY, input_examples=64, input_reps=2),
    'small': Size(
        reps=5, iters=3,
        step_models=(CONVNET_PAPER, ModelCase('resnet18', 64, (32, 32, 3), 32)),
        scaling_model=ModelCase('convnet', 32, (64, 32, 3), 128), device_counts=(1, 2, 4, 8),
        toy_overrides=(('methods', ('sgd', 'lsam')),),  # 72 runs: 12 SGD, 60 LSAM
        toy_runs=0, toy_steps=200, toy_chunk=100, toy_reps=2,
        toy_main_overrides=(),
        grid_points=8, grid_steps=50,
        pex_model=ModelCase('resnet18', 64, (32, 32, 3), 32), pex_chunk=8,
        pipeline_datasets=(
            PipelineCase('digits_dominoes', 'real'),
            PipelineCase('cifar_mnist', 'mock_sources', 2000),
            PipelineCase('fmnist_mnist', 'mock_sources', 2000),
            PipelineCase('celeba', 'mock', 512, data_overrides=(('image_size', 32),),
                         batch_size=32)),  # = the steps section's ResNet-18 case
        pipeline_batches=10, pipeline_step_reps=3, input_model=CONVNET_PAPER),
    'full': Size(
        reps=9, iters=10,
        step_models=(CONVNET_PAPER, ModelCase('resnet18', 64, (64, 64, 3), 128)),
        scaling_model=ModelCase('convnet', 32, (64, 32, 3), 256), device_counts=(1, 2, 4, 8),
        toy_overrides=(),  # the paper's whole main sweep: 234 runs in 6 method groups
        toy_runs=0, toy_steps=3000, toy_chunk=200, toy_reps=1,
        toy_main_overrides=(),
        grid_points=32, grid_steps=100,
        pex_model=ModelCase('resnet18', 64, (64, 64, 3), 128), pex_chunk=16,
        pipeline_datasets=(
            PipelineCase('digits_dominoes', 'real'),
            PipelineCase('cifar_mnist', 'mock_sources', 2000),
            PipelineCase('fmnist_mnist', 'mock_sources', 2000),
            PipelineCase('celeba', 'mock', 1024),
            PipelineCase('waterbirds', 'mock', 1024),
            PipelineCase('domainbed', 'mock', 512)),
        pipeline_batches=10, pipeline_step_reps=3, input_model=CONVNET_PAPER),
}

"""The real-data config schema and its validation, run before anything compiles or is written.

Every real-data config starts from :func:`base_train_config` and overrides fields, so the schema
(the allowed keys and their types) lives in one place. :func:`validate_train_config` raises a
``ValueError`` whose one-line message names the field and the allowed values; ``samjax.main``
turns it into an error line and exit code 2 without touching the workdir.
"""

from __future__ import annotations

import math
import numbers

import ml_collections
from ml_collections.config_dict import placeholder

OPTIMIZERS = ('sgd', 'sam', 'lsam', 'asam')
MODELS = ('convnet', 'resnet18')
DATASETS = ('digits_dominoes', 'cifar_mnist', 'fmnist_mnist', 'celeb_a', 'waterbirds', 'domainbed')
PERTURBATIONS = ('sync', 'per_device')
SCHEDULES = ('cosine', 'constant')
DTYPES = ('float32', 'bfloat16')
MICROBATCH_MODES = ('full_batch', 'per_microbatch')


def base_train_config() -> ml_collections.ConfigDict:
  """Every field a real-data run understands, with its default."""
  c = ml_collections.ConfigDict()
  c.job = 'train'
  c.seed = 0
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_train_steps = 0  # 0: use num_epochs
  c.num_epochs = 20
  c.log_every_steps = 10
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.progress_bar = True
  c.input_workers = 4  # threads preparing the next batches while the device trains
  c.log_diagnostics = True  # Gini of real and phantom importance weights per logged step
  c.perturbation = 'sync'  # 'per_device': m-sharpness with m = per-device batch
  c.group_weighted_test_error = False  # CelebA, Waterbirds: weight group errors by train frequency
  c.probe_l2 = 1e-3  # L2 penalty on the probe's mean loss (samjax.probe)
  c.microbatches = 1
  c.microbatch_mode = 'full_batch'
  c.compute_dtype = 'float32'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sam'
  c.optimizer.rho = 0.05
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = 'cosine'
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.adaptive_eta = 0.01
  c.optimizer.head = 'head'

  c.model = ml_collections.ConfigDict()
  c.model.name = 'convnet'
  c.model.init_checkpoint = placeholder(str)  # torchvision ResNet-18 state_dict (.pth) or .npz

  # The data fields of samjax.data.default_data_config(), typed so --config.data.x=v parses.
  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits_dominoes'
  c.data.data_dir = placeholder(str)  # TFDS data_dir; None: TFDS's default
  c.data.manual_dir = placeholder(str)  # Waterbirds / DomainBed manual downloads
  c.data.image_size = placeholder(int)  # None: native resolution
  c.data.val_fraction = 0.1
  c.data.probe_examples_per_group = placeholder(int)
  c.data.max_train_examples = placeholder(int)
  c.data.augment = False
  c.data.normalization = 'mean_pixel'
  c.data.domainbed_dataset = 'pacs'
  c.data.held_out_domain = placeholder(str)
  c.data.domain_test_fraction = 0.2
  return c


def _fail(field: str, message: str) -> None:
  raise ValueError(f'config.{field}: {message}')


def _check_keys(config, schema, prefix: str = '') -> None:
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in schema:
      allowed = ', '.join(sorted(schema.keys()))
      _fail(name, f'unknown field; allowed fields here: {allowed}.')
    value, expected = config[key], schema[key]
    if expected is None or value is None:  # optional fields; their owners check the values
      continue
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        _fail(name, 'must be a group of fields.')
      _check_keys(value, expected, name + '.')
    elif isinstance(expected, bool):
      if not isinstance(value, bool):
        _fail(name, f'must be true or false, got {value!r}.')
    elif isinstance(expected, numbers.Integral):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, f'must be an integer, got {value!r}.')
    elif isinstance(expected, numbers.Real):
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, f'must be a number, got {value!r}.')
    elif isinstance(expected, str) and not isinstance(value, str):
      _fail(name, f'must be a string, got {value!r}.')


def _one_of(config, field: str, allowed) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  if value not in allowed:
    _fail(field, f'{value!r} is not one of {", ".join(allowed)}.')


def _positive(config, field: str, allow_zero: bool = False) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    _fail(field, f'must be {">= 0" if allow_zero else "> 0"}, got {value!r}.')


def validate_train_config(config, num_devices: int) -> None:
  """Raises ``ValueError('config.<field>: ...')`` for the first problem found."""
  _check_keys(config, base_train_config())
  _one_of(config, 'job', ('train',))
  _one_of(config, 'optimizer.name', OPTIMIZERS)
  _one_of(config, 'optimizer.schedule', SCHEDULES)
  _one_of(config, 'model.name', MODELS)
  _one_of(config, 'data.name', DATASETS)
  _one_of(config, 'perturbation', PERTURBATIONS)
  if config.compute_dtype == 'float16':
    _fail('compute_dtype', 'float16 is refused: it needs loss scaling, which would have to be '
          'applied to both SAM passes alike; use bfloat16 (same memory, float32 range).')
  _one_of(config, 'compute_dtype', DTYPES)
  _one_of(config, 'microbatch_mode', MICROBATCH_MODES)
  for field in ('optimizer.rho', 'optimizer.weight_decay', 'optimizer.grad_clip_norm',
                'optimizer.adaptive_eta', 'num_train_steps', 'num_epochs', 'probe_l2',
                'checkpoint_every_steps', 'input_workers'):
    _positive(config, field, allow_zero=True)
  for field in ('optimizer.learning_rate', 'batch_size', 'eval_batch_size', 'log_every_steps',
                'keep_checkpoints', 'microbatches'):
    _positive(config, field)
  if not 0 <= config.optimizer.momentum < 1:
    _fail('optimizer.momentum', f'must be in [0, 1), got {config.optimizer.momentum!r}.')
  from samjax.data import validate_data_config  # pylint: disable=g-import-not-at-top
  try:
    validate_data_config(config.data)
  except ValueError as e:
    raise ValueError(f'config.{e}') from None
  if config.num_train_steps == 0 and config.num_epochs == 0:
    _fail('num_train_steps', 'set num_train_steps or num_epochs to a positive number.')
  per_step = num_devices * config.microbatches
  if config.batch_size % per_step:
    _fail('batch_size', f'{config.batch_size} is not divisible by microbatches x devices = '
          f'{config.microbatches} x {num_devices}; use a multiple of {per_step}.')
  if config.eval_batch_size % num_devices:
    _fail('eval_batch_size', f'{config.eval_batch_size} is not divisible by the {num_devices} '
          f'devices; use a multiple of {num_devices}.')

"""The one real-data config schema: every field, its default, type, range and meaning.

:data:`FIELDS` is the single definition. From it come

* :func:`base_train_config`, the ``ConfigDict`` every ``configs/*.py`` (real data) starts from;
* :func:`validate_train_config`, run by ``samjax.main`` before anything is compiled or written:
  a ``ValueError('config.<field>: ...')`` whose one line names the field and what it accepts;
* :func:`data_config`, the data fields with their defaults (what ``samjax.data.load_dataset``
  reads);
* :func:`field_default`, the default of one field for code handed a part of a config;
* :func:`markdown_table`, the table of ``docs/CONFIG.md`` (``python -m samjax.config``
  prints it; a test keeps the file equal to it) and of ``--help``'s pointer.

``config.json`` in a workdir holds every field of the schema, resolved.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_dict import placeholder

from samjax.cli import ConfigFileError, first_line
from samjax.data import registry
from samjax.data.registry import DATASETS, DOMAINBED_DATASETS, NORMALIZATIONS, PLACEMENTS
from samjax.optimizers import OPTIMIZERS

MODELS = ('convnet', 'resnet18')
PERTURBATIONS = ('sync', 'per_device')
SCHEDULES = ('cosine', 'constant')
DTYPES = ('float32', 'bfloat16')
MICROBATCH_MODES = ('full_batch', 'per_microbatch')
JOBS = ('train',)

# The step counter is int32 on the device; a seed must fit a uint32 PRNG key.
MAX_STEPS = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_INT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  Attributes:
    name: dotted path, e.g. ``'optimizer.rho'``.
    default: the value a config that does not set it gets (None: unset, allowed when
      ``optional``).
    kind: ``bool``, ``int``, ``float`` or ``str``.
    help: the meaning, one sentence.
    choices: allowed values (strings), or empty.
    low, high: inclusive bounds of a number (None: unbounded).
    low_open: the lower bound itself is excluded.
    optional: None is allowed.
  """
  name: str
  default: Any
  kind: type
  help: str
  choices: tuple = ()
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  optional: bool = False

  def range_text(self) -> str:
    if self.choices:
      return ' | '.join(self.choices)
    if self.low is None and self.high is None:
      return ''
    left = '(' if self.low_open else '['
    high = '' if self.high is None else _number_text(self.high)
    return f'{left}{_number_text(self.low)}, {high}{"]" if self.high is not None else ")"}'


def _number_text(x) -> str:
  if x is None:
    return ''
  if isinstance(x, int) and x >= 2**20:
    exponent = math.log2(x + 1)
    return f'2^{int(exponent)}-1' if exponent.is_integer() else str(x)
  return str(x)


def _count(name, default, help, low=0, high=MAX_INT, **kw):
  return Field(name, default, int, help, low=low, high=high, **kw)


def _positive(name, default, help, high=MAX_INT, **kw):
  return Field(name, default, int, help, low=1, high=high, **kw)


def _real(name, default, help, low=0.0, high=None, **kw):
  return Field(name, default, float, help, low=low, high=high, **kw)


FIELDS: tuple[Field, ...] = (
    Field('job', 'train', str, 'The job samjax.main runs (configs/toy.py sets toy).', choices=JOBS),
    _count('seed', 0, 'Seed of initialisation, data order and augmentation.', high=MAX_SEED),
    _positive('batch_size', 128, 'Global training batch (all devices and processes).'),
    _positive('eval_batch_size', 256, 'Global batch of evaluation and probe feature passes.'),
    _count('num_train_steps', 0, 'Training steps; 0: num_epochs epochs.', high=MAX_STEPS),
    _count('num_epochs', 20, 'Epochs when num_train_steps is 0.', high=MAX_STEPS),
    _positive('log_every_steps', 10, 'Steps between metrics.jsonl / TensorBoard records.'),
    # 500, not 0 (only at the end): a preempted or killed run loses at most 500 steps.
    _count('checkpoint_every_steps', 500, 'Steps between checkpoints; 0: only at the end.'),
    _positive('keep_checkpoints', 2, 'Checkpoints kept (older ones are deleted).'),
    Field('progress_bar', True, bool, 'Show a progress bar (process 0, on a terminal or not).'),
    _count('profile_steps', 0, 'Steps traced by jax.profiler into tensorboard/; 0: none.'),
    # 4, not 0: batches are pure functions of the step, so threads change speed, never values.
    _count('input_workers', 4, 'Threads preparing the next batches while the device trains.',
           high=256),
    Field('log_diagnostics', True, bool,
          'Log the Gini of real and phantom importance weights per logged step.'),
    Field('perturbation', 'sync', str,
          "'sync': one phantom from the global gradient; 'per_device': m-sharpness, "
          'm = per-device batch.', choices=PERTURBATIONS),
    Field('group_weighted_test_error', False, bool,
          'Report the test error with groups weighted by their training frequency.'),
    _real('probe_l2', 1e-3, 'L2 penalty on the linear probes\' mean loss.'),
    _positive('microbatches', 1, 'Micro-batches per (per-device) batch, one in memory at a time.',
              high=4096),
    Field('microbatch_mode', 'full_batch', str,
          "'full_batch': ascend along the whole batch's gradient; 'per_microbatch': each "
          'micro-batch its own (m-sharpness).', choices=MICROBATCH_MODES),
    Field('compute_dtype', 'float32', str,
          'Dtype of activations (parameters and optimizer state stay float32).', choices=DTYPES),
    Field('optimizer.name', 'sam', str, 'The optimizer.', choices=OPTIMIZERS),
    _real('optimizer.rho', 0.05, 'SAM radius (ignored by sgd).'),
    _real('optimizer.learning_rate', 0.01, 'Peak learning rate.', low_open=True),
    # 0.9, not 0: every configuration of the paper uses SGD with momentum 0.9.
    _real('optimizer.momentum', 0.9, 'Heavy-ball momentum; 0: plain SGD.', high=0.999999),
    Field('optimizer.nesterov', False, bool, 'Nesterov momentum.'),
    _real('optimizer.weight_decay', 0.0, 'L2 weight decay added to the applied gradient.'),
    Field('optimizer.schedule', 'cosine', str,
          'Learning-rate schedule over num_train_steps.', choices=SCHEDULES),
    _real('optimizer.grad_clip_norm', 0.0,
          'Clip the applied (phantom) gradient to this global norm; 0: no clipping.'),
    _real('optimizer.adaptive_eta', 0.01, 'ASAM\'s eta.'),
    Field('optimizer.head', 'head', str, 'Name of the classifier-head parameters LSAM perturbs.'),
    Field('model.name', 'convnet', str, 'The model.', choices=MODELS),
    Field('model.init_checkpoint', None, str,
          'torchvision ResNet-18 state_dict (.pth) or its .npz to start from.', optional=True),
    Field('data.name', 'digits_dominoes', str, 'The data set.', choices=DATASETS),
    Field('data.data_dir', None, str,
          "TFDS data_dir (a path or gs:// URL); None: TFDS's default (honours TFDS_DATA_DIR).",
          optional=True),
    Field('data.download', False, bool,
          'Let TFDS download and prepare a data set not prepared in data_dir; False: stop with '
          'the command that prepares it.'),
    Field('data.manual_dir', None, str,
          'Manual downloads of waterbirds / domainbed; None: <data_dir>/downloads/manual.',
          optional=True),
    _positive('data.image_size', None,
              'Square resolution photos are centre-cropped and resized to; None: native.',
              high=4096, optional=True),
    _real('data.val_fraction', 0.1, 'Share of train held out as validation where the data set '
          'has no validation split.', high=0.999999, low_open=True),
    _positive('data.probe_examples_per_group', None,
              'Cap on the examples of every group of the probe splits; None: no cap.',
              optional=True),
    _positive('data.max_train_examples', None, 'Random subset of train (tiny runs); None: all.',
              optional=True),
    Field('data.augment', False, bool, 'Random crop with padding and horizontal flip.'),
    # Every placement (host, device replicated, device sharded) trains bit-identically (same
    # indices and augmentation draws, exact uint8 crop/flip): the choice is about speed and
    # device memory only.
    Field('data.placement', 'auto', str,
          "Where training batches are made. 'device': the uint8 training split is put on the "
          'devices once, replicated on every device if it fits data.device_memory_budget_mb, '
          'else sharded over them, and each step sends only indices and crop/flip parameters; '
          "'host': each step's batch is gathered and augmented on the host and sent; 'auto': "
          "'device' if the split or its shard fits the budget, else 'host'.", choices=PLACEMENTS),
    # 2 GiB: every paper data set at the paper's image size fits (the largest, CelebA's train
    # split at 64x64, takes 1.9 GiB; at its native 218x178, 19 GB, it is sharded over 10 or more
    # devices or trains from the host) and most of an accelerator's memory is left to the model.
    _real('data.device_memory_budget_mb', 2048.0,
          'MiB per device the uint8 training split (images, labels, attributes), or its shard, '
          "may take under placement 'auto' / 'device'.", high=2.0**20),
    Field('data.normalization', 'mean_pixel', str,
          "'mean_pixel': training set's per-channel mean / std; 'imagenet': ImageNet's; "
          "'none': divide by 255.", choices=NORMALIZATIONS),
    Field('data.domainbed_dataset', 'pacs', str, 'DomainBed data set.', choices=DOMAINBED_DATASETS),
    Field('data.held_out_domain', None, str,
          "DomainBed target domain, e.g. 'art_painting' (required for domainbed).", optional=True),
    _real('data.domain_test_fraction', 0.2, 'Share of every DomainBed domain that forms its test '
          'part.', high=0.999999, low_open=True),
)

FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def field_default(name: str) -> Any:
  """The schema's default of the dotted field ``name``."""
  return FIELDS_BY_NAME[name].default


def get_field(config: Any, name: str) -> Any:
  """``config[name]`` for a field of a sub-config (``name`` without its group), else its default.

  For code handed one group (e.g. ``config.optimizer``), possibly partial: the default comes
  from the schema, never from the caller.
  """
  value = config.get(name.split('.')[-1], None)
  return field_default(name) if value is None else value


def base_train_config() -> ml_collections.ConfigDict:
  """Every field a real-data run understands, with its default."""
  c = ml_collections.ConfigDict()
  for field in FIELDS:
    *groups, key = field.name.split('.')
    node = c
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    # A typed placeholder keeps `--config.a.b=value` parsing for fields that default to None.
    node[key] = placeholder(field.kind) if field.default is None else field.default
  return c


def data_config(data: Any) -> dict[str, Any]:
  """The ``data`` fields as a plain dict with the schema's defaults filled in (validated)."""
  if isinstance(data, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    given = data.to_dict()
  elif isinstance(data, Mapping):
    given = dict(data)
  else:
    raise ValueError(f'data config must be a ConfigDict or a mapping, got {type(data)}')
  defaults = {f.name.split('.', 1)[1]: f.default for f in FIELDS if f.name.startswith('data.')}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f'config.data.{unknown[0]}: unknown field; allowed fields here: '
                     f'{", ".join(sorted(defaults))}.')
  resolved = {**defaults, **given}
  for key, value in resolved.items():
    _check_value(FIELDS_BY_NAME[f'data.{key}'], value)
  _check_data_rules(resolved)
  return resolved


def _fail(field: str, message: str) -> None:
  raise ValueError(f'config.{field}: {message}')


def _check_value(field: Field, value: Any) -> None:
  """Type, choices and range of one value."""
  name = field.name
  if value is None:
    if not field.optional:
      _fail(name, 'must be set.')
    return
  if field.kind is bool:
    if not isinstance(value, bool):
      _fail(name, f'must be true or false, got {value!r}.')
    return
  if field.kind is str:
    if not isinstance(value, str):
      _fail(name, f'must be a string, got {value!r}.')
    if field.choices and value not in field.choices:
      _fail(name, f'{value!r} is not one of {", ".join(field.choices)}.')
    return
  if field.kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
    _fail(name, f'must be an integer, got {value!r}.')
  if field.kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
    _fail(name, f'must be a number, got {value!r}.')
  if not math.isfinite(value):
    _fail(name, f'must be finite, got {value!r}.')
  too_low = field.low is not None and (value <= field.low if field.low_open else value < field.low)
  too_high = field.high is not None and value > field.high
  if too_low or too_high:
    _fail(name, f'must be in {field.range_text()}, got {value!r}.')


def _check_keys(config, prefix: str = '') -> None:
  for key in config.keys():
    name = f'{prefix}{key}'
    value = config[key]
    if name in FIELDS_BY_NAME:
      _check_value(FIELDS_BY_NAME[name], value)
      continue
    group = [f for f in FIELDS if f.name.startswith(name + '.')]
    if not group:
      siblings = sorted({f.name[len(prefix):].split('.')[0] for f in FIELDS
                         if f.name.startswith(prefix)})
      _fail(name, f'unknown field; allowed fields here: {", ".join(siblings)}.')
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      _fail(name, 'must be a group of fields.')
    _check_keys(value, name + '.')


def _check_data_rules(data: Mapping[str, Any]) -> None:
  """Rules between data fields (:func:`samjax.data.registry.rule_violations`)."""
  for field, message in registry.rule_violations(data):
    _fail(field, message)


def validate_train_config(config, num_devices: int) -> None:
  """Raises ``ValueError('config.<field>: ...')`` for the first problem found."""
  if config.get('compute_dtype', None) == 'float16':
    _fail('compute_dtype', 'float16 is refused: it needs loss scaling, which would have to be '
          'applied to both SAM passes alike; use bfloat16 (same memory, float32 range).')
  _check_keys(config)
  for field in FIELDS:  # fields a config file deleted: the schema's default is not there
    node = config
    for part in field.name.split('.'):
      if part not in node:
        _fail(field.name, 'missing; start the config from samjax.config.base_train_config().')
      node = node[part]
  data_config(config.data)
  if config.num_train_steps == 0 and config.num_epochs == 0:
    _fail('num_train_steps', 'set num_train_steps or num_epochs to a positive number.')
  per_step = num_devices * config.microbatches
  if config.batch_size % per_step:
    _fail('batch_size', f'{config.batch_size} is not divisible by microbatches x devices = '
          f'{config.microbatches} x {num_devices}; use a multiple of {per_step}.')
  if config.eval_batch_size % num_devices:
    _fail('eval_batch_size', f'{config.eval_batch_size} is not divisible by the {num_devices} '
          f'devices; use a multiple of {num_devices}.')


def load_config_file(path: str, arg: Optional[str] = None,
                     overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file ``path``; ValueError with one line if that fails.

  The one loader of config files (the CLI, tests and experiments): a missing or non-Python
  file, a syntax error, a failing import and a ``get_config`` that raises all become a
  ``ValueError`` naming the file and the cause. ``overrides`` maps dotted fields to values
  (``{'optimizer.rho': 0.1}``), applied by ml_collections as ``--config.optimizer.rho=0.1`` is.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f'config file {path} does not exist (run from the repository root, or pass '
                     'a path).')
  if not path.endswith('.py'):
    raise ValueError(f'config file {path} is not a Python file (configs/*.py define get_config).')
  name = '_samjax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f'config file {path}: syntax error at line {e.lineno}: {e.msg}') from None
  except Exception as e:  # pylint: disable=broad-except  # any failure of the user's file
    raise ValueError(f'config file {path} failed to load: {type(e).__name__}: '
                     f'{first_line(e)}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'config file {path} defines no get_config().')
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'config file {path}: get_config() raised {type(e).__name__}: '
                     f'{first_line(e)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'config file {path}: get_config() returned {type(config).__name__}, not '
                     'an ml_collections.ConfigDict.')
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


class _ConfigFileParser(flags.ArgumentParser):
  """``--config=PATH[:ARG]`` read by :func:`load_config_file` and locked."""

  def flag_type(self) -> str:
    return 'config object'

  def parse(self, argument):
    path, _, arg = argument.partition(':')
    try:
      config = load_config_file(path, arg or None)
    except ValueError as e:
      raise ConfigFileError(first_line(e)) from None
    config.lock()  # an override of a field the file does not define is refused
    return config


def define_config_flag(name: str = 'config') -> flags.FlagHolder:
  """ml_collections' ``--config`` flag (``--config.a.b=value`` overrides), read by the one loader.

  The file is read once, when flags are parsed; a file that does not load raises
  :class:`samjax.cli.ConfigFileError`, which :func:`samjax.cli.parse_flags` prints in one line.
  """
  holder = config_flags.DEFINE_config_file(name, None, 'Path to a config file (configs/*.py).')
  flags.FLAGS[name].parser = _ConfigFileParser()
  return holder


def markdown_table() -> str:
  """The schema as a Markdown table (docs/CONFIG.md)."""
  lines = ['| field | default | type | range | meaning |', '| --- | --- | --- | --- | --- |']
  for f in FIELDS:
    default = 'None' if f.default is None else repr(f.default)
    lines.append(f'| `{f.name}` | `{default}` | {f.kind.__name__} | {f.range_text()} | '
                 f'{f.help} |')
  return '\n'.join(lines) + '\n'


def docs_page() -> str:
  return ('# Training config fields\n\n'
          'Generated from `samjax/config.py` (`python -m samjax.config > docs/CONFIG.md`); '
          'the one schema that validation, `config.json` and `--help` use. Override any field as '
          '`--config.<field>=value`.\n\n' + markdown_table())


if __name__ == '__main__':
  print(docs_page(), end='')

"""The one config schema of every job: each field, its default, type, range and meaning.

:data:`FIELDS` (the training job, ``job = 'train'``) and :data:`TOY_FIELDS` (the toy study,
``job = 'toy'``) are the single definitions. From them come

* :func:`base_train_config` and :func:`base_toy_config`, the ``ConfigDict`` every
  ``configs/*.py`` starts from;
* :func:`validate_config`, run before anything is compiled or written (it dispatches on
  ``config.job`` to :func:`validate_train_config` or :func:`validate_toy_config`): a
  ``ValueError('config.<field>: ...')`` whose one line names the field and what it accepts;
* :func:`data_config`, the data fields with their defaults (what ``samjax.data.load_dataset``
  reads);
* :func:`field_default`, the default of one field for code handed a part of a config;
* :func:`markdown_table`, the tables of ``docs/CONFIG.md`` (``python -m samjax.config``
  prints it; a test keeps the file equal to it) and of ``--help``'s pointer.

``config.json`` in a workdir holds every field of the schema, resolved.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Mapping, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_dict import placeholder

from samjax.cli import ConfigFileError, first_line
from samjax.data import registry
from samjax.data.registry import DATASETS, DOMAINBED_DATASETS, NORMALIZATIONS, PLACEMENTS
from samjax.optimizers import OPTIMIZERS
from samjax.toy import train as toy_train

MODELS = ('convnet', 'resnet18')
PERTURBATIONS = ('sync', 'per_device')
SCHEDULES = ('cosine', 'constant')
DTYPES = ('float32', 'bfloat16')
MICROBATCH_MODES = ('full_batch', 'per_microbatch')
JOBS = ('train', 'toy')

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
    kind: ``bool``, ``int``, ``float``, ``str``, ``tuple`` (a sweep: values of kind ``item``;
      a single value stands for a one-element tuple) or ``dict`` (a group with free keys,
      checked by a rule of its job).
    help: the meaning, one sentence.
    choices: allowed values (strings), or empty.
    low, high: bounds of a number, inclusive unless ``low_open`` / ``high_open`` (None:
      unbounded).
    low_open: the lower bound itself is excluded.
    optional: None is allowed.
    item: the kind of a tuple's values.
    nonempty: a tuple needs at least one value.
    unique: a tuple's values are distinct.
    high_open: the upper bound itself is excluded.
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
  item: Optional[type] = None
  nonempty: bool = False
  unique: bool = False
  high_open: bool = False

  def range_text(self) -> str:
    if self.choices:
      return ' | '.join(self.choices)
    if self.low is None and self.high is None:
      return ''
    left = '(' if self.low_open else '['
    high = '' if self.high is None else _number_text(self.high)
    right = ']' if self.high is not None and not self.high_open else ')'
    return f'{left}{_number_text(self.low)}, {high}{right}'

  def type_text(self) -> str:
    if self.kind is tuple:
      return f'tuple[{self.item.__name__}]' + (', non-empty' if self.nonempty else '')
    return self.kind.__name__


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


def _sweep(name, default, help, item=float, low=0.0, **kw):
  return Field(name, default, tuple, help, item=item, low=low, **kw)


# The toy's default layout under $XDG_CACHE_HOME (~/.cache when unset), resolved by
# base_toy_config: a fixed ~/.cache path made runs under a fresh XDG_CACHE_HOME warm.
TOY_COMPILATION_CACHE_DIR = '$XDG_CACHE_HOME/samjax/jax'
# 'constant': v_0 = head_init (1, 1); 'random': signed uniform +-head_init/sqrt(2) per
# coordinate (PyTorch's nn.Linear init at head_init = 1).
TOY_HEADS = ('constant', 'random')
# 'absolute': rho as given; 'initial_head': rho in units of the run's ||v_0||.
TOY_RHO_UNITS = ('absolute', 'initial_head')

# The toy study (configs/toy.py, docs/toy.md); the defaults are the main study (Figs. 1-6).
# The data and training constants whose values the paper lost are ours (docs/toy.md).
TOY_FIELDS: tuple[Field, ...] = (
    dataclasses.replace(FIELDS_BY_NAME['job'], default='toy'),
    Field('name', 'main', str, 'Name of the study, in its report.'),
    _count('seed', 0, "Base key: a run's key is fold_in(key(seed), run seed).", high=MAX_SEED),
    # >= 10: the paired t intervals of report.json.
    _sweep('seeds', tuple(range(10)),
           'Run seeds; runs with the same seed share training set, init and batch order.',
           item=int, high=MAX_SEED, nonempty=True, unique=True),
    Field('methods', ('sgd', 'lsam', 'lsam_noflip', 'iw_only', 'lr_only', 'iw_lr'), tuple,
          'Methods swept.', item=str, choices=toy_train.METHODS, nonempty=True, unique=True),
    Field('heads', ('constant', 'random'), tuple,
          "Initial heads swept at the default knobs: 'constant' v_0 = head_init (1, 1), "
          "'random' signed uniform +-head_init/sqrt(2); (): the single head of head_random.",
          item=str, choices=TOY_HEADS, unique=True),
    # 'initial_head' keeps the regime (does v~ flip a feature's sign?) the same for every head.
    Field('rho_unit', 'initial_head', str,
          "Unit of rhos: 'absolute', or 'initial_head' (the run's ||v_0||).",
          choices=TOY_RHO_UNITS),
    # Below ~0.5 no step of any seed flips with the constant head (flip-free); 1-1.8 is the
    # flip regime. The regime of each radius is measured (report.json's 'regimes').
    _sweep('rhos', (0.02, 0.05, 0.1, 0.2, 0.45, 1.0, 1.4, 1.8),
           'LSAM radii (SGD is rho = 0); non-empty when methods has lsam.'),
    _sweep('noflip_rhos', (1.4, 1.8), 'Radii of LSAM-noflip, each one of rhos; (): all rhos.'),
    # Full SAM's training collapses at 0.75 here.
    _sweep('sam_rhos', (0.1, 0.25, 0.5), 'Full SAM radii; non-empty when methods has sam.'),
    _sweep('complexities', (360.0, 540.0, 720.0),
           'Spiral rotations (degrees) of the hard feature.', nonempty=True),
    _sweep('fixed_ratios', (2.0, 8.0, 32.0),
           'Fixed ratios c = v^_hard / v^_easy of the interventions; non-empty when methods has '
           'one.', low_open=True),
    _sweep('intervention_complexities', (360.0,),
           'Complexities the interventions run at; (): all complexities.'),
    # Appendix B: constant lr, batch 5, 300 points, no momentum or weight decay.
    _count('num_train', 300, 'Training points.', low=2),
    _positive('batch_size', 5, 'Batch size, at most num_train.'),
    _sweep('batch_sizes', (), 'Batch sizes swept (SGD, LSAM) instead of batch_size; each at '
           'most num_train.', item=int, low=1, high=MAX_INT),
    _real('learning_rate', 0.05, 'Constant learning rate.', low_open=True),
    _positive('num_steps', 3000, 'Training steps (3000: 50 epochs of 60 steps).',
              high=MAX_STEPS),
    _positive('eval_every', 200, 'Steps per scan chunk (probes, snapshots, progress); divides '
              'num_steps.'),
    _positive('hidden', 32, 'Width of each 3-layer feature MLP.'),
    # The ratio diagnostics and v^ assume a positive head.
    _real('head_init', 1.0, 'Scale of the initial head v (v_easy = v_hard at init).',
          low_open=True),
    Field('head_random', False, bool, 'Signed random initial head: each coordinate uniform in '
          '+-head_init / sqrt(2) (PyTorch nn.Linear at head_init = 1).'),
    # Appendix C fixes v^.
    Field('intervention_norm', 'initial', str,
          "Interventions' v^: 'initial' fixed at the initial head's length, 'tracking' "
          '||v^|| = ||v|| at every step.', choices=toy_train.INTERVENTION_NORMS),
    _count('num_probe', 2000, 'Fresh points for probe-train, -validation and -test.', low=2),
    _count('curve_probe', 250, 'Points of probe-train and -test for the per-chunk curves.',
           low=2),
    # Appendix E.
    _real('data.easy_scale', 1.0, 'Scale of the easy (linear) feature.', low_open=True),
    # Latents end at 1.
    _real('data.easy_margin', 0.1, 'Margin of the easy feature.', high=1.0, high_open=True),
    _real('data.hard_scale', 1.0, 'Scale of the hard (spiral) feature.', low_open=True),
    _real('data.hard_min_radius', 0.1, 'Smallest radius of the spiral.', high=1.0,
          high_open=True),
    _real('data.hard_noise', 0.03, 'Noise of the spiral.'),
    # Appendix H: besides the clean data, every non-zero level of each kind is run alone, for
    # each hard_only value.
    _sweep('noise.label_noise', (), 'Label-noise rates of the training set.', high=1.0),
    _sweep('noise.gaussian_noise', (), 'Gaussian feature-noise scales.'),
    # 1 would drop every feature.
    _sweep('noise.dropout', (), 'Feature dropout rates.', high=1.0, high_open=True),
    Field('noise.hard_only', (False, True), tuple,
          'Corrupt only the hard feature (True) or both (False).', item=bool, nonempty=True),
    _real('figure_complexity', None, 'Complexity of Figs. 1, 3 and 5; None: where LSAM gains '
          'most over SGD.', optional=True),
    # One factor at a time: each knob's values are run with every other knob at its default.
    Field('sensitivity', {}, dict,
          'Knob -> values of the sensitivity study; knobs: data.<constant>, learning_rate, '
          'head_init, head_random, each value in its field\'s range.'),
    _sweep('sensitivity_steps', (), 'Steps after which claims are judged, multiples of '
           'eval_every up to num_steps.', item=int, low=1, high=MAX_STEPS),
    Field('compilation_cache_dir', TOY_COMPILATION_CACHE_DIR, str,
          "Persistent XLA compilation cache ($XDG_CACHE_HOME: ~/.cache when unset); '': off."),
)

TOY_FIELDS_BY_NAME = {f.name: f for f in TOY_FIELDS}

# The sensitivity study's knobs and the fields whose type and range their values take.
TOY_SENSITIVITY_KNOBS = {
    **{name: f'data.{name}' for name in
       ('easy_scale', 'easy_margin', 'hard_scale', 'hard_min_radius', 'hard_noise')},
    'learning_rate': 'learning_rate', 'head_init': 'head_init', 'head_random': 'head_random'}


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


def _config_of(fields: tuple[Field, ...]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for field in fields:
    *groups, key = field.name.split('.')
    node = c
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    if field.kind is dict:
      node[key] = ml_collections.ConfigDict(dict(field.default))
    else:
      # A typed placeholder keeps `--config.a.b=value` parsing for fields that default to None.
      node[key] = placeholder(field.kind) if field.default is None else field.default
  return c


def base_train_config() -> ml_collections.ConfigDict:
  """Every field a real-data run understands, with its default."""
  return _config_of(FIELDS)


def base_toy_config() -> ml_collections.ConfigDict:
  """Every field of the toy study, with its default (the main study, Figs. 1-6)."""
  c = _config_of(TOY_FIELDS)
  c.compilation_cache_dir = c.compilation_cache_dir.replace(
      '$XDG_CACHE_HOME', os.environ.get('XDG_CACHE_HOME') or '~/.cache')
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
  if field.kind is tuple:
    _check_sweep(field, value)
    return
  if field.kind is dict:
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      _fail(name, f'must be a group of fields, got {value!r}.')
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
  too_high = field.high is not None and (value >= field.high if field.high_open
                                         else value > field.high)
  if too_low or too_high:
    _fail(name, f'must be in {field.range_text()}, got {value!r}.')


def as_tuple(value) -> tuple:
  """A sweep's value as a tuple; a single value (or a string) is a one-element tuple."""
  return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _check_sweep(field: Field, value: Any) -> None:
  values = as_tuple(value)
  if field.nonempty and not values:
    _fail(field.name, 'the sweep is empty; give at least one value.')
  each = dataclasses.replace(field, kind=field.item, optional=False)
  for v in values:
    _check_value(each, v)
  if field.unique and len(set(values)) != len(values):
    _fail(field.name, f'duplicate values in {values}.')


def _check_keys(config, fields: tuple[Field, ...], prefix: str = '') -> None:
  by_name = {f.name: f for f in fields}
  for key in config.keys():
    name = f'{prefix}{key}'
    value = config[key]
    if name in by_name:
      _check_value(by_name[name], value)
      continue
    group = [f for f in fields if f.name.startswith(name + '.')]
    if not group:
      siblings = sorted({f.name[len(prefix):].split('.')[0] for f in fields
                         if f.name.startswith(prefix)})
      _fail(name, f'unknown field; allowed fields here: {", ".join(siblings)}.')
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      _fail(name, 'must be a group of fields.')
    _check_keys(value, fields, name + '.')


def _check_complete(config, fields: tuple[Field, ...], base: str) -> None:
  """Fields a config file deleted: the schema's default is not there."""
  for field in fields:
    node = config
    for part in field.name.split('.'):
      if part not in node:
        _fail(field.name, f'missing; start the config from samjax.config.{base}().')
      node = node[part]


def _check_data_rules(data: Mapping[str, Any]) -> None:
  """Rules between data fields (:func:`samjax.data.registry.rule_violations`)."""
  for field, message in registry.rule_violations(data):
    _fail(field, message)


def validate_train_config(config, num_devices: int) -> None:
  """Raises ``ValueError('config.<field>: ...')`` for the first problem found."""
  if config.get('compute_dtype', None) == 'float16':
    _fail('compute_dtype', 'float16 is refused: it needs loss scaling, which would have to be '
          'applied to both SAM passes alike; use bfloat16 (same memory, float32 range).')
  _check_keys(config, FIELDS)
  _check_complete(config, FIELDS, 'base_train_config')
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


def validate_toy_config(config) -> None:
  """Raises ``ValueError('config.<field>: ...')`` for the first problem of a toy config."""
  _check_keys(config, TOY_FIELDS)
  _check_complete(config, TOY_FIELDS, 'base_toy_config')
  _check_toy_rules(config)


def _check_toy_rules(config) -> None:
  """Rules between toy fields (each field alone is in range)."""
  methods = as_tuple(config.methods)
  if 'lsam' in methods and not as_tuple(config.rhos):
    _fail('rhos', 'the sweep is empty; give at least one value (methods has lsam).')
  if 'sam' in methods and not as_tuple(config.sam_rhos):
    _fail('sam_rhos', 'the sweep is empty; give at least one value (methods has sam).')
  if any(m in toy_train.INTERVENTIONS for m in methods) and not as_tuple(config.fixed_ratios):
    _fail('fixed_ratios', 'the sweep is empty; give at least one value (methods has an '
          'intervention).')
  for name in ('batch_size', 'batch_sizes'):
    for b in as_tuple(config[name]):
      if b > config.num_train:
        _fail(name, f'{b} is larger than the training set (num_train={config.num_train}).')
  if config.num_steps % config.eval_every:
    _fail('eval_every', f'{config.eval_every} does not divide num_steps={config.num_steps}.')
  rhos = as_tuple(config.rhos)
  for r in as_tuple(config.noflip_rhos):
    if r not in rhos:
      _fail('noflip_rhos', f'{r!r} is not one of rhos={rhos}; set noflip_rhos to a subset of '
            'rhos, or to () (every radius of rhos).')
  for knob, values in config.sensitivity.items():
    if knob not in TOY_SENSITIVITY_KNOBS:
      _fail(f'sensitivity.{knob}', f'unknown knob; choose from '
            f'{", ".join(TOY_SENSITIVITY_KNOBS)}.')
    field = TOY_FIELDS_BY_NAME[TOY_SENSITIVITY_KNOBS[knob]]
    _check_sweep(dataclasses.replace(field, name=f'sensitivity.{knob}', kind=tuple,
                                     item=field.kind), values)
  for n in as_tuple(config.sensitivity_steps):
    if n > config.num_steps or n % config.eval_every:
      _fail('sensitivity_steps', f'{n} is not a multiple of eval_every={config.eval_every} up '
            f'to num_steps={config.num_steps}.')


def validate_config(config, num_devices: Optional[int] = None) -> None:
  """The one validator: :func:`validate_toy_config` or :func:`validate_train_config` by
  ``config.job``; ``num_devices`` (training only) defaults to ``jax.device_count()``."""
  job = config.get('job', 'train')
  if job not in JOBS:
    _fail('job', f'{job!r} is not one of {", ".join(JOBS)}.')
  if job == 'toy':
    validate_toy_config(config)
    return
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  validate_train_config(config, num_devices)


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


def markdown_table(fields: tuple[Field, ...] = FIELDS) -> str:
  """``fields`` (default: the training job's) as a Markdown table (docs/CONFIG.md)."""
  lines = ['| field | default | type | range | meaning |', '| --- | --- | --- | --- | --- |']
  for f in fields:
    default = 'None' if f.default is None else repr(f.default)
    cells = (f'`{f.name}`', f'`{default}`', f.type_text(), f.range_text(), f.help)
    # A '|' inside a cell (between choices) would end the cell.
    lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def docs_page() -> str:
  return ('# Config fields\n\n'
          'Generated from `samjax/config.py` (`python -m samjax.config > docs/CONFIG.md`); '
          'the one schema that validation, `config.json` and `--help` use. Override any field as '
          '`--config.<field>=value`; a bad value stops the run with one line, '
          '`config.<field>: ...`.\n\n'
          "## Training (`job = 'train'`: configs/*.py but toy.py)\n\n"
          'Configs start from `samjax.config.base_train_config()`.\n\n' + markdown_table(FIELDS)
          + "\n## Toy study (`job = 'toy'`: configs/toy.py)\n\n"
          'Configs start from `samjax.config.base_toy_config()`, whose defaults are the main '
          'study (Figs. 1-6). A sweep (tuple) field also takes a single value.\n\n'
          + markdown_table(TOY_FIELDS))


if __name__ == '__main__':
  print(docs_page(), end='')

"""samjax command line: ``python -m samjax.main --config=configs/NAME.py --workdir=DIR``.

``config.job`` picks the job: ``'toy'`` runs the paper's toy study
(:func:`samjax.toy.study.run`), ``'train'`` trains on real data
(:func:`samjax.train.train_and_evaluate`). Fields are overridden as ``--config.a.b=value``.

A mistake in the command or the config ends with one line naming what to fix and exit code 2,
before anything is compiled or written. A run stopped by SIGTERM checkpoints and exits with 143;
the same command resumes it.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for outputs, checkpoints and logs.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for multi-process runs (jax.distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-process run.')

USAGE_ERROR = 2
TRAINING_FAULT = 3
PREEMPTED = 143


def _error(message: str) -> None:
  print(f'samjax: error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when asked (or auto-detected on TPU pods)."""
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address or FLAGS.num_processes:
    if FLAGS.coordinator_address is None or FLAGS.num_processes is None or FLAGS.process_id is None:
      _error('--coordinator_address, --num_processes and --process_id go together.')
    # Only the CPU backend reads this; it must be set before any backend starts.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()


# Top-level packages of the `train` extra (pyproject.toml) that real-data training imports.
TRAIN_EXTRA_MODULES = ('tensorflow', 'tensorflow_datasets', 'orbax', 'sklearn', 'tensorboardX',
                       'importlib_resources')


def import_training():
  """``samjax.train``, or one line naming the extra when its dependencies are not installed."""
  try:
    from samjax import train  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    missing = (e.name or '').split('.')[0]
    if missing not in TRAIN_EXTRA_MODULES:
      raise
    _error(f"real-data training needs the 'train' extra, which is not installed (no module "
           f"{missing!r}): pip install 'samjax[train]' (in a checkout: pip install -e '.[train]').")
  return train


def run(config, workdir: str) -> dict:
  """Runs the job that ``config.job`` names."""
  job = config.get('job', 'train')
  if job == 'toy':
    from samjax.toy import study  # pylint: disable=g-import-not-at-top
    return study.run(config, workdir)
  if job == 'train':
    train = import_training()
    return train.train_and_evaluate(config, workdir)
  raise ValueError(f"config.job: {job!r} is not one of 'toy', 'train'.")


def main(argv) -> None:
  if len(argv) > 1:
    _error(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    _error('--config is required, e.g. --config=configs/toy.py')
  if not FLAGS.workdir:
    _error('--workdir is required, e.g. --workdir=runs/toy')
  initialize_distributed()
  try:
    result = run(_CONFIG.value, FLAGS.workdir)
  except ValueError as e:
    if os.environ.get('SAMJAX_DEBUG'):
      raise
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not message.startswith('config.'):  # not a config field: the traceback may matter
      message += ' (SAMJAX_DEBUG=1 shows the traceback)'
    _error(message)
  except RuntimeError as e:  # a numerical fault: the message names the step and the quantity
    from samjax.train import TrainingFault  # pylint: disable=g-import-not-at-top
    if not isinstance(e, TrainingFault) or os.environ.get('SAMJAX_DEBUG'):
      raise
    print(f'samjax: training stopped: {e}', file=sys.stderr)
    sys.exit(TRAINING_FAULT)
  if isinstance(result, dict) and 'preempted_at_step' in result:
    logging.warning('preempted at step %d', result['preempted_at_step'])
    sys.exit(PREEMPTED)


def _missing_config_file(argv) -> str | None:
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg[len('--config='):].split(':', 1)[0]
      if not os.path.exists(path):
        return path
  return None


def cli() -> None:
  """Parses flags ourselves so that a bad flag is one line and exit code 2, not a usage dump."""
  missing = _missing_config_file(sys.argv)
  if missing:
    _error(f'config file {missing} does not exist (run from the repository root, or pass a path).')
  try:
    argv = FLAGS(sys.argv)
    if _CONFIG.value is not None:
      _CONFIG.value.get('job')  # config files load lazily: surface a load failure here
  except flags.Error as e:
    _error(str(e).splitlines()[0])
  except (ValueError, KeyError, AttributeError, TypeError, FileNotFoundError, OSError) as e:
    # config_flags raises these for a missing config file or an override of an unknown field.
    _error(f'bad --config: {str(e).splitlines()[0] if str(e) else type(e).__name__}')
  app.run(main, argv=argv)


if __name__ == '__main__':
  cli()

"""samjax command line: ``python -m samjax.main --config=configs/NAME.py --workdir=DIR_OR_URL``.

``config.job`` picks the job: ``'toy'`` runs the paper's toy study
(:func:`samjax.toy.study.run`), ``'train'`` trains on real data
(:func:`samjax.train.train_and_evaluate`). Fields are overridden as ``--config.a.b=value``.

Exit codes: 0 done; 2 a mistake in the command, the config, the workdir or the data (one line
naming what to fix, nothing written); 3 non-finite values stopped training (the message ends
with a command that continues from the last finite checkpoint); 74 an input/output error such
as a full disk (one line); 143 preempted by SIGTERM (checkpointed; the same command resumes).
"""

from __future__ import annotations

import ast
import importlib.util
import logging as std_logging
import os
import shlex
import signal
import sys
import time

USAGE_ERROR = 2
TRAINING_FAULT = 3
IO_ERROR = 74  # sysexits.h EX_IOERR
PREEMPTED = 143

USAGE = """\
usage: python -m samjax.main --config=configs/NAME.py[:ARG] --workdir=DIR_OR_URL [--config.FIELD=VALUE ...]

Trains (configs/digits_dominoes.py, celeba.py, ...) or runs the toy study (configs/toy.py), writing
config.json, metrics.jsonl, tensorboard/, checkpoints/ and probe.json into the workdir (a local
directory or a gs:// URL). Rerunning the same command resumes the run.

flags:
  --config=PATH[:ARG]        config file; ARG goes to its get_config (e.g. an optimizer name:
                             configs/digits_dominoes.py:sgd)
  --config.FIELD=VALUE       override one field, e.g. --config.optimizer.learning_rate=0.01
  --workdir=DIR_OR_URL       outputs, checkpoints and logs (created if absent)
  --show_config              print the resolved config (every field and value) and exit
  --verbosity=N              -1 (default): warnings and errors only; 0: also INFO lines (absl,
                             orbax, TFDS progress); 1: debug
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                             a multi-process run (jax.distributed); TPU pods are detected
  -h, --help                 this text

config fields: every field with its default, type, range and meaning is listed in docs/CONFIG.md
(or: python -m samjax.config); a config's values: --config=configs/NAME.py --show_config.

exit codes: 0 done; 2 bad command, config, workdir or missing data (nothing written); 3 non-finite
values (the message ends with a command to continue); 74 input/output error (e.g. disk full);
143 preempted (checkpointed; rerun the same command to resume).
"""


def _error(message: str, code: int = USAGE_ERROR) -> None:
  print(f'samjax: error: {message}', file=sys.stderr)
  _exit(code)


def _exit(code: int) -> None:
  """Exits now: after a failure, library finalisers (orbax's event loops) only add noise."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _is_disk_full(error: BaseException) -> bool:
  text = str(error)
  return (getattr(error, 'errno', None) == 28 or 'No space left on device' in text
          or "os_error_code='28'" in text)


class _DropLibraryErrors:
  """A logging filter for the default verbosity: orbax logs a failed save with its traceback
  from a worker thread (the same error reaches samjax.main, which reports it in one line), and
  TFDS warns about folders it looks into while finding a data set (samjax says what is
  missing)."""

  def filter(self, record) -> bool:
    path = record.pathname or ''
    if '/orbax/' in path:
      return False
    if record.name == 'asyncio' and 'orbax' in record.getMessage():
      return False  # an orbax write task's failure, reported again when its Task is collected
    return not ('/tensorflow_datasets/' in path and record.levelno < std_logging.ERROR)


def _flag_value(argv, name: str):
  """The value of ``--name=value`` or ``--name value`` in ``argv`` (the last one), or None."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _verbosity(argv) -> int:
  value = _flag_value(argv, 'verbosity') or _flag_value(argv, 'v')
  try:
    return int(value) if value is not None else -1
  except ValueError:
    return -1  # absl's flag parser reports the bad value


def _quiet_libraries(verbosity: int) -> None:
  """Without --verbosity >= 0 only warnings and errors reach the terminal."""
  if verbosity >= 0:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is first imported
  for name in ('absl', 'orbax', 'jax', 'tensorflow', 'etils'):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


def _import_tensorflow_quietly() -> None:
  """TensorFlow's C++ logging prints INFO lines at import whatever TF_CPP_MIN_LOG_LEVEL says
  (tensorflow-cpu 2.21): import it with the stderr file descriptor pointed at /dev/null. Only
  real-data training imports TensorFlow (the toy study and the base install have none)."""
  if importlib.util.find_spec('tensorflow') is None:
    return
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                           lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory or URL for outputs, checkpoints and logs.')
  flags.DEFINE_boolean('show_config', False, 'Print the resolved config and exit.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 for multi-process runs (jax.distributed).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
  flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-process run.')
  return flags.FLAGS, config


def initialize_distributed(flags_values) -> None:
  """Starts JAX's multi-controller runtime when asked (or auto-detected on TPU pods)."""
  import jax  # pylint: disable=g-import-not-at-top
  if flags_values.coordinator_address or flags_values.num_processes:
    if (flags_values.coordinator_address is None or flags_values.num_processes is None
        or flags_values.process_id is None):
      _error('--coordinator_address, --num_processes and --process_id go together.')
    # Only the CPU backend reads this; it must be set before any backend starts.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(flags_values.coordinator_address, flags_values.num_processes,
                               flags_values.process_id)
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()


# Top-level packages of the `train` extra (pyproject.toml) that real-data training imports.
TRAIN_EXTRA_MODULES = ('tensorflow', 'tensorflow_datasets', 'orbax', 'sklearn', 'clu',
                       'tensorboard', 'importlib_resources')


def import_training(verbosity: int = -1):
  """``samjax.train``, or one line naming the extra when its dependencies are not installed."""
  if verbosity < 0:
    _import_tensorflow_quietly()
  try:
    from samjax import train  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    missing = (e.name or '').split('.')[0]
    if missing not in TRAIN_EXTRA_MODULES:
      raise
    _error(f"real-data training needs the 'train' extra, which is not installed (no module "
           f"{missing!r}): pip install 'samjax[train]' (in a checkout: pip install -e '.[train]').")
  if verbosity < 0:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  return train


def job_runner(config, verbosity: int = -1):
  """``(run(config, workdir) -> dict, the exception type of a training fault)`` for ``config.job``."""
  job = config.get('job', 'train')
  if job == 'toy':
    from samjax.toy import study  # pylint: disable=g-import-not-at-top
    return study.run, ()  # () catches nothing: the toy study has no training faults to report
  if job == 'train':
    train = import_training(verbosity)
    return train.train_and_evaluate, train.TrainingFault
  raise ValueError(f"config.job: {job!r} is not one of 'toy', 'train'.")


def run(config, workdir: str) -> dict:
  """Runs the job that ``config.job`` names."""
  return job_runner(config)[0](config, workdir)


def _continue_command(argv, fault, config) -> str:
  """A command that starts a new run, lr / 10, from the fault's last sane checkpoint if any.

  A new workdir: the stopped run's workdir keeps its config (and its evidence)."""
  workdir = fault.workdir.rstrip('/')
  learning_rate = config.optimizer.learning_rate / 10
  replaced = ['--workdir', '--config.optimizer.learning_rate']
  if fault.last_checkpoint is not None:
    replaced.append('--config.model.init_checkpoint')
  kept = [a for a in argv[1:] if not a.startswith(tuple(replaced))]
  kept += [f'--workdir={workdir}-lr{learning_rate:g}',
           f'--config.optimizer.learning_rate={learning_rate:g}']
  if fault.last_checkpoint is not None:
    kept.append(f'--config.model.init_checkpoint={workdir}/checkpoints/{fault.last_checkpoint}')
  return 'python -m samjax.main ' + ' '.join(shlex.quote(a) for a in kept)


def _summary(result: dict, workdir: str, seconds: float) -> str:
  from samjax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  lines = [f'samjax: done in {seconds:.0f} s; outputs in {workdir}']
  records = workdir_lib.read_metrics(epath.Path(workdir) / workdir_lib.METRICS_FILE)
  if records:
    last = records[-1]
    losses = ', '.join(f'{k} {last[k]:.4g}' for k in ('loss', 'accuracy') if k in last)
    lines.append(f'  final step {last["step"]}: {losses}')
  errors = [(k, result[k]) for k in ('test_error', 'worst_group_error', 'easy_probe_error',
                                    'hard_probe_error') if isinstance(result.get(k), float)]
  if errors:
    lines.append('  ' + ', '.join(f'{k.replace("_", " ")} {v:.4f}' for k, v in errors))
  lines.append('  files: config.json, metrics.jsonl, probe.json, checkpoints/, tensorboard/')
  return '\n'.join(lines)


def main(argv, flags_values, config_flag, verbosity: int) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(verbosity)  # after app.run's own set-up, which would reset it
  if verbosity < 0:
    logging.get_absl_handler().addFilter(_DropLibraryErrors())
  if len(argv) > 1:
    _error(f'unexpected arguments: {" ".join(argv[1:])}')
  if config_flag.value is None:
    _error('--config is required, e.g. --config=configs/digits_dominoes.py (see --help)')
  if flags_values.show_config:
    print(config_flag.value.to_yaml() if hasattr(config_flag.value, 'to_yaml')
          else config_flag.value)
    return
  if not flags_values.workdir:
    _error('--workdir is required, e.g. --workdir=runs/digits (see --help)')
  initialize_distributed(flags_values)
  import jax  # pylint: disable=g-import-not-at-top
  start = time.time()
  training_fault = ()
  try:
    run_job, training_fault = job_runner(config_flag.value, verbosity)
    result = run_job(config_flag.value, flags_values.workdir)
  except ValueError as e:
    if os.environ.get('SAMJAX_DEBUG'):
      raise
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if _is_disk_full(e):  # tensorstore reports ENOSPC as a ValueError
      _error(f'input/output error: no space left on device ({message[:300]})', IO_ERROR)
    _error(message)
  except training_fault as e:  # pylint: disable=catching-non-exception
    if os.environ.get('SAMJAX_DEBUG'):
      raise
    message = f'samjax: training stopped: {e}'
    if e.last_checkpoint is not None:
      message += (f' To continue from the last sane checkpoint (step {e.last_checkpoint}) with '
                  'a 10x lower learning rate in a new workdir, run: ')
    else:
      message += (' No checkpoint precedes the divergence; to start afresh with a 10x lower '
                  'learning rate in a new workdir, run: ')
    message += _continue_command(sys.argv, e, config_flag.value)
    print(message, file=sys.stderr)
    _exit(TRAINING_FAULT)
  except OSError as e:  # a full disk, a vanished mount: one line, a documented code
    if os.environ.get('SAMJAX_DEBUG'):
      raise
    _error(f'input/output error: {e.strerror or e}'
           f'{f" ({e.filename})" if getattr(e, "filename", None) else ""}', IO_ERROR)
  if isinstance(result, dict) and 'preempted_at_step' in result:
    print(f'samjax: preempted at step {result["preempted_at_step"]} (checkpointed); rerun the '
          'same command to resume.', file=sys.stderr)
    sys.exit(PREEMPTED)
  if jax.process_index() == 0 and isinstance(result, dict) and 'test_error' in result:
    print(_summary(result, flags_values.workdir, time.time() - start))


def _plain(error: BaseException) -> str:
  """An error's text on one line; ml_collections' messages are the repr of a KeyError's."""
  text = str(error)
  if text[:1] in ('"', "'"):
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  return '; '.join(line.strip() for line in text.splitlines() if line.strip())


def _preempted_outside_training(signum, frame) -> None:
  del signum, frame
  print('samjax: preempted (SIGTERM) outside the training loop; what is finished is saved: rerun '
        'the same command to resume.', file=sys.stderr)
  _exit(PREEMPTED)


def cli() -> None:
  """Parses flags ourselves so that a bad flag is one line and exit code 2, not a usage dump."""
  # SIGTERM before training starts or after it ends (evaluation, probes): 143, as inside the
  # loop, whose own handler checkpoints the current step instead while it runs.
  signal.signal(signal.SIGTERM, _preempted_outside_training)
  argv = sys.argv
  if any(a in ('-h', '--help', '-help', '--helpfull', '-?') for a in argv[1:]):
    print(USAGE, end='')
    sys.exit(0)
  _quiet_libraries(_verbosity(argv))
  config_path = _flag_value(argv, 'config')
  from samjax import config as config_lib  # pylint: disable=g-import-not-at-top
  if config_path:
    path, _, arg = config_path.partition(':')
    try:  # the file's own failures (syntax, imports, get_config) as one line, before flags
      config_lib.load_config_file(path, arg or None)
    except ValueError as e:
      _error(str(e).splitlines()[0])
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags_values, config_flag = _define_flags()
  try:
    argv = flags_values(argv)
    if config_flag.value is not None:
      config_flag.value.get('job')  # config files load lazily: surface a load failure here
  except flags.Error as e:
    _error(str(e).splitlines()[0].replace('\\n', ' '))
  except (KeyError, AttributeError) as e:  # an override of an unknown field
    _error(f'--config: unknown field {_plain(e)}')
  except (ValueError, TypeError, FileNotFoundError, OSError) as e:
    # config_flags raises these for a bad value.
    _error(f'bad --config: {str(e).splitlines()[0] if str(e) else type(e).__name__}')
  verbosity = _verbosity(sys.argv)
  app.run(lambda a: main(a, flags_values, config_flag, verbosity), argv=argv)


if __name__ == '__main__':
  cli()

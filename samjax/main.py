"""usage: python -m samjax.main --config=configs/NAME.py[:ARG] --workdir=DIR_OR_URL [--config.FIELD=VALUE ...]

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

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

from absl import app, flags

from samjax import cli
from samjax import config as config_lib

PROG = 'samjax'
_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory or URL for outputs, checkpoints and logs.')
_SHOW_CONFIG = flags.DEFINE_boolean('show_config', False, 'Print the resolved config and exit.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-process runs (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index in a multi-process run.")

# Top-level packages of the `train` extra (pyproject.toml) that real-data training imports.
TRAIN_EXTRA_MODULES = ('tensorflow', 'tensorflow_datasets', 'orbax', 'sklearn', 'clu',
                       'tensorboard', 'importlib_resources')


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when asked (or auto-detected on TPU pods)."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
      cli.fail(PROG, '--coordinator_address, --num_processes and --process_id go together.')
    # Only the CPU backend reads this; it must be set before any backend starts.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()


def import_training(quiet: bool):
  """``samjax.train``, or one line naming the extra when its dependencies are not installed."""
  if quiet:
    cli.import_tensorflow_quietly()
  try:
    from samjax import train  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    missing = (e.name or '').split('.')[0]
    if missing not in TRAIN_EXTRA_MODULES:
      raise
    cli.fail(PROG, f"real-data training needs the 'train' extra, which is not installed (no "
             f"module {missing!r}): pip install 'samjax[train]' (in a checkout: pip install -e "
             "'.[train]').")
  if quiet:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  return train


def job_runner(config, quiet: bool = True):
  """``(run(config, workdir) -> dict, the exception type of a training fault)`` for ``config.job``."""
  job = config.get('job', 'train')
  if job == 'toy':
    from samjax.toy import study  # pylint: disable=g-import-not-at-top
    return study.run, ()  # () catches nothing: the toy study has no training faults to report
  if job == 'train':
    train = import_training(quiet)
    return train.train_and_evaluate, train.TrainingFault
  raise ValueError(f"config.job: {job!r} is not one of 'toy', 'train'.")


def _continue_from(fault, config) -> str:
  """How to continue after a fault: a new workdir, lr / 10, from the last sane checkpoint if any.

  A new workdir: the stopped run's workdir keeps its config (and its evidence)."""
  workdir = fault.workdir.rstrip('/')
  learning_rate = config.optimizer.learning_rate / 10
  replaced = ['--workdir', '--config.optimizer.learning_rate']
  if fault.last_checkpoint is not None:
    replaced.append('--config.model.init_checkpoint')
  kept = [a for a in sys.argv[1:] if not a.startswith(tuple(replaced))]
  kept += [f'--workdir={workdir}-lr{learning_rate:g}',
           f'--config.optimizer.learning_rate={learning_rate:g}']
  if fault.last_checkpoint is not None:
    kept.append(f'--config.model.init_checkpoint={workdir}/checkpoints/{fault.last_checkpoint}')
    advice = (f' To continue from the last sane checkpoint (step {fault.last_checkpoint}) with a '
              '10x lower learning rate in a new workdir, run: ')
  else:
    advice = (' No checkpoint precedes the divergence; to start afresh with a 10x lower learning '
              'rate in a new workdir, run: ')
  return advice + 'python -m samjax.main ' + ' '.join(shlex.quote(a) for a in kept)


def _summary(result: dict, workdir: str, seconds: float) -> str:
  from etils import epath  # pylint: disable=g-import-not-at-top
  from samjax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
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


def _preempted_outside_training(signum, frame) -> None:
  del signum, frame
  print('samjax: preempted (SIGTERM) outside the training loop; what is finished is saved: rerun '
        'the same command to resume.', file=sys.stderr)
  cli.exit_now(cli.PREEMPTED)


def main(argv) -> None:
  # absl's own default lets INFO lines through; samjax's is warnings and errors only.
  verbosity = flags.FLAGS.verbosity if flags.FLAGS['verbosity'].present else -1
  cli.quiet_libraries(verbosity)
  cli.no_extra_arguments(PROG, argv)
  config = _CONFIG.value
  if config is None:
    cli.fail(PROG, '--config is required, e.g. --config=configs/digits_dominoes.py (see --help)')
  if _SHOW_CONFIG.value:
    print(config)
    return
  if not _WORKDIR.value:
    cli.fail(PROG, '--workdir is required, e.g. --workdir=runs/digits (see --help)')
  initialize_distributed()
  start = time.time()
  with cli.one_line_errors(PROG, at_once=True):
    run, training_fault = job_runner(config, quiet=verbosity < 0)
    try:
      result = run(config, _WORKDIR.value)
    except training_fault as e:  # pylint: disable=catching-non-exception
      print(f'samjax: training stopped: {e}{_continue_from(e, config)}', file=sys.stderr)
      cli.exit_now(cli.TRAINING_FAULT)
  # Everything is written. Python's shutdown gives a handled SIGTERM back its default action, so
  # a SIGTERM during the teardown would turn a finished run into a killed one; ignored, it
  # leaves the exit code that says what happened.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  if isinstance(result, dict) and 'preempted_at_step' in result:
    print(f'samjax: preempted at step {result["preempted_at_step"]} (checkpointed); rerun the '
          'same command to resume.', file=sys.stderr)
    sys.exit(cli.PREEMPTED)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and isinstance(result, dict) and 'test_error' in result:
    print(_summary(result, _WORKDIR.value, time.time() - start))


if __name__ == '__main__':
  # SIGTERM before training starts or after it ends (evaluation, probes): 143, as inside the
  # loop, whose own handler checkpoints the current step instead while it runs.
  signal.signal(signal.SIGTERM, _preempted_outside_training)
  app.run(main, flags_parser=lambda argv: cli.parse_flags(PROG, argv, usage=__doc__))

"""What every samjax entry point does with a failure: one line on stderr and an exit code.

Entry points (``samjax.main``, ``samjax.data.prepare``, the experiment scripts, the benchmark)
parse their flags with :func:`parse_flags` and run their work inside :func:`one_line_errors`;
neither prints a traceback for a user's mistake. ``SAMJAX_DEBUG=1`` re-raises instead.

Exit codes (the README's table):

* 0 done;
* 2 (:data:`USAGE_ERROR`) a mistake in the command, the config, the workdir or the data (one
  line naming what to fix, nothing written), a workdir locked by another run;
* 3 (:data:`TRAINING_FAULT`) non-finite values stopped training;
* 74 (:data:`IO_ERROR`, sysexits.h ``EX_IOERR``) an input/output error such as a full disk;
* 143 (:data:`PREEMPTED`, 128 + SIGTERM) preempted; checkpointed, the same command resumes.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging as std_logging
import os
import sys
from typing import Iterator, NoReturn, Sequence

from absl import flags

OK = 0
USAGE_ERROR = 2
TRAINING_FAULT = 3
IO_ERROR = 74
PREEMPTED = 143


def first_line(error: BaseException) -> str:
  """The first line of an exception's message, or its type's name when it has none."""
  text = str(error)
  return text.splitlines()[0] if text.strip() else type(error).__name__


def plain(error: BaseException) -> str:
  """An error's text on one line; ml_collections' messages are the repr of a KeyError's."""
  text = str(error)
  if text[:1] in ('"', "'"):
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  return '; '.join(line.strip() for line in text.splitlines() if line.strip())


def is_disk_full(error: BaseException) -> bool:
  """ENOSPC, also when tensorstore reports it inside a ValueError's text."""
  text = str(error)
  return (getattr(error, 'errno', None) == 28 or 'No space left on device' in text
          or "os_error_code='28'" in text)


def exit_now(code: int) -> NoReturn:
  """Exits at once: after a failure, library finalisers (orbax's event loops) only add noise."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def fail(prog: str, message: str, code: int = USAGE_ERROR, *, at_once: bool = False) -> NoReturn:
  """``PROG: error: MESSAGE`` on stderr and exit ``code`` (``at_once``: see :func:`exit_now`)."""
  print(f'{prog}: error: {message}', file=sys.stderr)
  if at_once:
    exit_now(code)
  sys.exit(code)


def exit_code(error: BaseException) -> tuple[int, str]:
  """``(exit code, one-line message)`` of an exception that ends a run."""
  if is_disk_full(error):  # tensorstore reports ENOSPC as a ValueError
    return IO_ERROR, f'input/output error: no space left on device ({first_line(error)[:300]})'
  if isinstance(error, OSError):  # a vanished mount, a permission denied mid-run
    filename = getattr(error, 'filename', None)
    return IO_ERROR, (f'input/output error: {error.strerror or first_line(error)}'
                      f'{f" ({filename})" if filename else ""}')
  return USAGE_ERROR, first_line(error)


@contextlib.contextmanager
def one_line_errors(prog: str, *, catch: tuple = (ValueError, OSError),
                    at_once: bool = False) -> Iterator[None]:
  """Turns an exception of ``catch`` into one line and its exit code (see :func:`exit_code`).

  ``at_once``: exit without running finalisers (a run that may have started orbax's threads).
  """
  try:
    yield
  except catch as e:  # pylint: disable=catching-non-exception
    if os.environ.get('SAMJAX_DEBUG'):
      raise
    code, message = exit_code(e)
    fail(prog, message, code, at_once=at_once)


class ConfigFileError(Exception):
  """A config file that does not load, raised while flags are parsed (see
  :func:`samjax.config.define_config_flag`); not a ValueError, which absl would wrap."""


HELP_FLAGS = ('-h', '--help', '-help', '--helpfull', '-?')


def parse_flags(prog: str, argv: Sequence[str], usage: str | None = None) -> list[str]:
  """absl's flag parsing, with a bad flag as one line and exit code 2 instead of a usage dump.

  ``-h`` / ``--help`` print ``usage`` (default: the flags of the main module) and exit 0.
  Usable as ``app.run(main, flags_parser=...)``, so that flags, and a config file, are read once.
  """
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(usage if usage is not None else flags.FLAGS.main_module_help())
    sys.exit(OK)
  try:
    return flags.FLAGS(list(argv))
  except ConfigFileError as e:
    fail(prog, str(e))
  except flags.Error as e:
    fail(prog, first_line(e).replace('\\n', ' '))
  except (KeyError, AttributeError) as e:  # an ml_collections override of an unknown field
    fail(prog, f'--config: unknown field {plain(e)}')
  except (ValueError, TypeError, OSError) as e:  # ml_collections: a bad override value
    fail(prog, f'bad --config: {first_line(e)}')


def no_extra_arguments(prog: str, argv: Sequence[str]) -> None:
  """absl hands positional arguments through; every samjax command takes none."""
  if len(argv) > 1:
    fail(prog, f'unexpected arguments: {" ".join(argv[1:])}')


class _DropLibraryErrors:
  """A logging filter for the default verbosity: orbax logs a failed save with its traceback
  from a worker thread (the same error reaches the entry point, which reports it in one line),
  and TFDS warns about folders it looks into while finding a data set (samjax says what is
  missing)."""

  def filter(self, record) -> bool:
    path = record.pathname or ''
    if '/orbax/' in path:
      return False
    if record.name == 'asyncio' and 'orbax' in record.getMessage():
      return False  # an orbax write task's failure, reported again when its Task is collected
    return not ('/tensorflow_datasets/' in path and record.levelno < std_logging.ERROR)


def quiet_libraries(verbosity: int) -> None:
  """Below ``--verbosity=0`` only warnings and errors reach the terminal.

  Call before TensorFlow is first imported: its C++ logging reads TF_CPP_MIN_LOG_LEVEL then.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(verbosity)  # after app.run's own set-up, which would reset it
  if verbosity >= 0:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  for name in ('absl', 'orbax', 'jax', 'tensorflow', 'etils'):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  logging.get_absl_handler().addFilter(_DropLibraryErrors())


def import_tensorflow_quietly() -> None:
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

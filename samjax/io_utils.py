"""Small file helpers shared by the training path, the toy study and the experiments."""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Any, Callable


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
  """Calls ``write(file)`` on a temporary file beside ``path``, then renames it into place.

  Readers see the old file or the new one, never a torn one, and a crash leaves no partial file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'wb' if binary else 'w') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + '\n')


def atomic_save_figure(fig, path: str, **savefig_kwargs) -> None:
  """``fig.savefig`` as PNG, atomically."""
  atomic_write(path, lambda f: fig.savefig(f, format='png', **savefig_kwargs), binary=True)

"""Small file helpers shared by the training path, the toy study and the experiments.

Paths are :class:`etils.epath.Path` (a local path or a URL such as ``gs://bucket/run``).
Files are created with the process's usual permissions (0644 under umask 022).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import IO, Any, Callable, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_local(path: PathLike) -> bool:
  """True for a path on this machine's file system, False for a URL (``gs://...``)."""
  return '://' not in os.fspath(path)


def atomic_write(path: PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
  """Calls ``write(file)`` on a temporary file beside ``path``, then renames it into place.

  Readers see the old file or the new one, never a torn one, and a crash leaves no partial file.
  (On object stores such as gs:// a rename is a copy: the new object appears whole or not at all.)
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex}.tmp'
  try:
    with tmp.open('wb' if binary else 'w') as f:
      write(f)
      f.flush()
      if is_local(path):  # an object store's file has no descriptor; its upload is the commit
        os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    try:
      if tmp.exists():
        tmp.unlink()
    except Exception:  # pylint: disable=broad-except  # the original error matters more
      pass
    raise


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + '\n')


def atomic_save_figure(fig, path: PathLike, **savefig_kwargs) -> None:
  """``fig.savefig`` as PNG, atomically."""
  atomic_write(path, lambda f: fig.savefig(f, format='png', **savefig_kwargs), binary=True)


def read_json(path: PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())

"""The paper's experiments and the benchmark, run from the repository root as modules.

  python -m experiments.table1 --out=runs/table1 ...
  python -m experiments.table2 --out=runs/table2 ...
  python -m experiments.diagnostics_figures --workdir=runs/digits ...
  python -m experiments.benchmark --size=small --out=bench.json

They read the repository's ``configs/``, so they run from a checkout, not from an installed
``samjax``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: local


def load_config(config_file: str, arg: Optional[str] = None,
                overrides: Optional[Mapping[str, Any]] = None):
  """``configs/NAME.py`` (relative to the checkout) through the one loader, with overrides."""
  from samjax.config import load_config_file  # pylint: disable=g-import-not-at-top
  return load_config_file(os.path.join(ROOT, config_file), arg, overrides)

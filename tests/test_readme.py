"""The README's code runs as written: every python block, each in a fresh namespace."""

import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
  with open(os.path.join(ROOT, 'README.md')) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)


def test_readme_has_the_recipes():
  text = '\n'.join(python_blocks())
  for needle in ('samjax.sam(', 'has_aux=True', 'nnx.Optimizer', 'jax.shard_map', 'jax.pmap',
                 'samjax.per_device_grad'):
    assert needle in text, needle


@pytest.mark.parametrize('index', range(len(python_blocks())))
def test_readme_python_block_runs_and_trains(index):
  assert jax.device_count() >= 2  # the parallel recipes run on several devices (conftest)
  namespace = {}
  exec(compile(python_blocks()[index], f'README.md block {index}', 'exec'), namespace)  # pylint: disable=exec-used
  before, after = float(namespace['before']), float(namespace['after'])
  assert np.isfinite(after) and after < before, (before, after)

"""The README's code runs as written: every python block of README.md and docs/recipes.md, each in a
fresh namespace."""

import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
  blocks = []
  for page in ('README.md', os.path.join('docs', 'recipes.md')):
    with open(os.path.join(ROOT, page)) as f:
      blocks += re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
  return blocks


def test_readme_has_the_recipes():
  text = '\n'.join(python_blocks())
  for needle in ('samjax.sam(', 'has_aux=True', 'nnx.Optimizer', 'jax.shard_map', 'jax.pmap',
                 'samjax.per_device_grad'):
    assert needle in text, needle


@pytest.mark.parametrize('index', range(len(python_blocks())))
def test_readme_python_block_runs_and_trains(index):
  assert jax.device_count() >= 2  # the parallel recipes run on several devices (conftest)
  namespace = {}
  exec(compile(python_blocks()[index], f'python block {index}', 'exec'), namespace)  # pylint: disable=exec-used
  before, after = float(namespace['before']), float(namespace['after'])
  assert np.isfinite(after) and after < before, (before, after)


def test_readme_is_a_short_guide_whose_modules_exist():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  assert len(text.splitlines()) <= 200
  modules = set(re.findall(r'python -m ([\w.]+)', text))
  assert {'samjax.main', 'samjax.data.prepare', 'experiments.table1',
          'experiments.benchmark'} <= modules, modules
  for module in modules:
    path = os.path.join(ROOT, *module.split('.'))
    assert os.path.isfile(path + '.py') or os.path.isfile(os.path.join(path, '__init__.py')), module
  for link in re.findall(r'\]\(((?:docs/)?[\w./]+\.md)', text):
    assert os.path.isfile(os.path.join(ROOT, link)), link

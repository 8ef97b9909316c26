"""The README's code runs as written."""

import os
import re

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs_and_trains():
  with open(os.path.join(ROOT, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
  assert blocks, 'README.md has no python example'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  params, batch, loss_fn = namespace['params'], namespace['batch'], namespace['loss_fn']
  assert np.asarray(jax.tree.leaves(params)[0]).any()  # one SAM step moved the zero init
  before = loss_fn(jax.tree.map(np.zeros_like, params), batch)
  assert float(loss_fn(params, batch)) < float(before)

"""samjax.train.checkpoint replaces one private orbax function: these tests fail when it is gone."""

import asyncio
import importlib

import pytest
from absl import logging

from samjax.train import checkpoint


def test_orbax_still_has_the_function_that_is_replaced():
  module = importlib.import_module(checkpoint.PATCHED_MODULE)
  assert checkpoint.DRAINING_INSTALLED, (
      f'{checkpoint.PATCHED_MODULE}.{checkpoint.PATCHED_FUNCTION} is gone from this orbax: '
      'port samjax.train.checkpoint._run_sync_draining and the pin in pyproject.toml')
  assert getattr(module, checkpoint.PATCHED_FUNCTION) is checkpoint._run_sync_draining


def test_orbax_sync_runs_let_writes_in_flight_finish_after_a_failure():
  # orbax's public entry to the replaced runner: a failed save's other writes still complete on a
  # live loop instead of calling back into a closed one.
  from orbax.checkpoint._src import asyncio_utils  # pylint: disable=g-import-not-at-top
  finished = []

  async def write_in_flight():
    await asyncio.sleep(0.2)
    finished.append('written')

  async def failing_save():
    asyncio.ensure_future(write_in_flight())
    await asyncio.sleep(0)
    raise OSError(28, 'No space left on device')

  with pytest.raises(OSError, match='No space left'):
    asyncio_utils.run_sync(failing_save())
  assert finished == ['written']


def test_a_release_without_it_warns_and_keeps_orbax_own(monkeypatch):
  module = importlib.import_module(checkpoint.PATCHED_MODULE)
  monkeypatch.delattr(module, checkpoint.PATCHED_FUNCTION)
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  assert checkpoint._install_draining_loops() is False
  assert len(warnings) == 1 and checkpoint.PATCHED_FUNCTION in warnings[0]
  assert 'not drained' in warnings[0]

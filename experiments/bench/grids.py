"""The lr x rho x seed grid trainer (``experiments/grid_train.py``): vmapped vs one point at a time.

The timing is :func:`grid_train.measure_grid_throughput`, which uses :mod:`bench.timing`; this
section only sizes it and reports it.
"""

from __future__ import annotations

from typing import Any

from bench import timing
from bench.sizes import Size


def bench_grids(size: Size) -> dict[str, Any]:
  import grid_train  # pylint: disable=g-import-not-at-top  (experiments/ is on sys.path)
  recipe = grid_train.Recipe(method='sam', num_steps=size.grid_steps, batch_size=32)
  timing.log(f'[grids] {size.grid_points} SAM points x {size.grid_steps} steps, vmapped vs '
             'one at a time')
  numbers = grid_train.measure_grid_throughput(num_points=size.grid_points, recipe=recipe,
                                               repeats=size.reps)
  return {'status': 'ok', **numbers}


def goal_values(grids: dict) -> list[tuple[str, Any, str]]:
  del grids  # no goal was set for the grid trainer; its numbers are reported only
  return []


def report_lines(grids: dict) -> list[str]:
  g = grids or {}
  if g.get('status') != 'ok':
    return [f"\n[grids] {g.get('status')}: {g.get('reason')}"] if g else []
  return [f"\n[grids] {g['num_points']} {g['method']} points x {g['num_steps']} steps, "
          f"batch {g['batch_size']} ({g['devices']}): points/s",
          f"{'':<12}{'vmapped':>10}{'sequential':>12}{'ratio':>8}",
          f"{'cold':<12}{g['vmapped_points_per_s_cold']:>10.2f}"
          f"{g['sequential_points_per_s_cold']:>12.2f}{g['vmapped_over_sequential_cold']:>8.2f}",
          f"{'warm':<12}{g['vmapped_points_per_s_warm']:>10.2f}"
          f"{g['sequential_points_per_s_warm']:>12.2f}{g['vmapped_over_sequential_warm']:>8.2f}"]

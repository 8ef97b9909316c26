"""The lr x rho x seed grid trainer (``experiments/grid_train.py``): vmapped vs one point at a time."""

from __future__ import annotations

import statistics
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import grid_train
from experiments.bench import timing
from experiments.bench.sizes import Size


def bench_grids(size: Size) -> dict[str, Any]:
  recipe = grid_train.Recipe(method='sam', num_steps=size.grid_steps, batch_size=32)
  timing.log(f'[grids] {size.grid_points} SAM points x {size.grid_steps} steps, vmapped vs '
             'one at a time')
  numbers = measure_grid_throughput(num_points=size.grid_points, recipe=recipe, repeats=size.reps)
  return {'status': 'ok', **numbers}


def measure_grid_throughput(num_points: int = 8, recipe: Optional[grid_train.Recipe] = None,
                            num_examples: int = 512, repeats: int = 1) -> dict:
  """Grid points per second, vmapped vs one at a time, compilation included and excluded.

  Both sides train the same points on the same data (:func:`grid_train.synthetic_task`).
  "Sequential" compiles :func:`grid_train.compiled_point_trainer` once and calls it per point;
  "vmapped" compiles :func:`grid_train.compiled_grid_trainer` once and calls it on the whole grid. Cold: the first call of
  each (its compilation included); warm: the median of ``repeats`` further calls of each, taken
  round-robin by the benchmark's shared timing method (``experiments/bench/timing.py``).
  """
  recipe = recipe or grid_train.Recipe(method='sam', num_steps=50, batch_size=32)
  images, labels = grid_train.synthetic_task(num_examples)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  lrs = np.geomspace(0.01, 0.1, num_points).astype(np.float32)
  rhos = np.linspace(0.0, 0.1, num_points).astype(np.float32)
  seeds = np.arange(num_points, dtype=np.uint32)

  grid = grid_train.compiled_grid_trainer(recipe)
  point = grid_train.compiled_point_trainer(recipe)
  run_grid = lambda: grid_train.train_grid(recipe, images, labels, lrs, rhos, seeds, trainer=grid)
  run_points = lambda: [
      grid_train.train_point(recipe, images, labels, lr, rho, seed, trainer=point)
      for lr, rho, seed in zip(lrs, rhos, seeds)]
  _, vmapped_cold = timing.timed(run_grid)
  _, sequential_cold = timing.timed(run_points)
  warm = timing.interleaved({'vmapped': timing.repeat_runner(run_grid),
                             'sequential': timing.repeat_runner(run_points)}, repeats, 1)
  vmapped_warm, sequential_warm = (statistics.median(warm[k]) for k in ('vmapped', 'sequential'))
  return {
      'num_points': num_points, 'method': recipe.method, 'num_steps': recipe.num_steps,
      'batch_size': recipe.batch_size, 'width': recipe.width,
      'devices': f'{jax.devices()[0].platform} x {jax.device_count()}',
      'vmapped_points_per_s_cold': num_points / vmapped_cold,
      'sequential_points_per_s_cold': num_points / sequential_cold,
      'vmapped_points_per_s_warm': num_points / vmapped_warm,
      'sequential_points_per_s_warm': num_points / sequential_warm,
      'vmapped_over_sequential_cold': sequential_cold / vmapped_cold,
      'vmapped_over_sequential_warm': sequential_warm / vmapped_warm,
  }


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

"""A grid of learning rates x rho x seeds of one small model, trained as one vmapped program.

Issue 16, item 3. A grid point is ``(learning_rate, rho, seed)``; one method (``sgd``, ``sam`` or
``lsam``) is one program. Every point trains the same model on the same in-memory training set
with the paper's recipe (SGD with momentum, cosine schedule, no weight decay, no augmentation;
the SAM transform first in the chain) and is a pure function of its three numbers:

* ``seed`` draws the initial parameters and the order of the examples (a fresh permutation per
  epoch; the incomplete last batch of an epoch is dropped), so points of equal seed share both,
  whatever their method, learning rate or rho: SGD, SAM and LSAM are paired by seed;
* ``learning_rate`` and ``rho`` enter as traced arrays (``optax.cosine_decay_schedule`` of a
  traced peak, ``samjax.sam`` of a traced radius), so the grid is a ``jax.vmap`` over them.

:func:`train_grid` runs the points vmapped: one jitted program initialises every point, one
jitted program takes one step of every point, and the host calls it ``num_steps`` times (see
:class:`Trainer` for why the loop is not a ``lax.scan``). :func:`train_point` runs one point
alone (its own jit, no vmap). ``tests/test_grid_train.py`` checks that the two agree to float
tolerance, and ``experiments.bench.grids.measure_grid_throughput`` times them side by side.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samjax.models import ConvNet
from samjax.optimizers import perturbation
from samjax.train.step import cross_entropy

METHODS = ('sgd', 'sam', 'lsam')


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every grid point of one program shares (static: one compiled program per recipe)."""
  method: str = 'sam'
  num_steps: int = 400
  batch_size: int = 100
  momentum: float = 0.9
  width: int = 32  # the conv net's first-layer channels (the paper: 32)
  num_classes: int = 2

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'method must be one of {METHODS}, got {self.method!r}')


def make_model(recipe: Recipe) -> ConvNet:
  return ConvNet(num_classes=recipe.num_classes, width=recipe.width)


def make_optimizer(recipe: Recipe, learning_rate, rho) -> optax.GradientTransformationExtraArgs:
  """``chain([sam | lsam](rho), sgd(cosine(learning_rate), momentum))``; traced values welcome."""
  ascent = perturbation(recipe.method, rho)
  parts = [] if ascent is None else [ascent]
  schedule = optax.cosine_decay_schedule(learning_rate, max(recipe.num_steps, 1))
  parts.append(optax.sgd(schedule, momentum=recipe.momentum or None))
  return optax.chain(*parts)


def _init_point(recipe: Recipe, sample: jax.Array, learning_rate, rho, seed):
  """The initial ``(params, opt_state)`` of one grid point (params drawn from ``seed``)."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  params = make_model(recipe).init(init_key, sample)['params']
  return params, make_optimizer(recipe, learning_rate, rho).init(params)


def initial_params(recipe: Recipe, sample, seed: int):
  """The initial parameters every grid point of seed ``seed`` starts from (its untrained net)."""
  return _init_point(recipe, jnp.asarray(sample), 0.0, 0.0, seed)[0]


def _step_point(recipe: Recipe, images: jax.Array, labels: jax.Array, carry, learning_rate, rho,
                seed, step_index):
  """One training step of one grid point; ``images`` are normalised float32 ``[N, H, W, C]``."""
  model = make_model(recipe)
  tx = make_optimizer(recipe, learning_rate, rho)
  params, opt_state = carry
  _, order_key = jax.random.split(jax.random.key(seed))
  num_examples = images.shape[0]
  epoch, position = jnp.divmod(step_index, num_examples // recipe.batch_size)
  order = jax.random.permutation(jax.random.fold_in(order_key, epoch), num_examples)
  batch = jax.lax.dynamic_slice_in_dim(order, position * recipe.batch_size, recipe.batch_size)
  x, y = images[batch], labels[batch]

  def loss_fn(p):
    return jnp.mean(cross_entropy(model.apply({'params': p}, x), y))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=jax.grad(loss_fn))
  return (optax.apply_updates(params, updates), opt_state), loss


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled init and step of one recipe, vmapped over grid points or not."""
  recipe: Recipe
  init: Callable
  step: Callable

  def __call__(self, images, labels, learning_rates, rhos, seeds):
    """Trains from scratch: ``(params, losses [..., num_steps])``.

    The host drives the steps: XLA:CPU runs convolutions inside a ``lax.scan``/``while`` body
    with a slow generic kernel (20x slower here than the same step compiled alone), so the
    compiled unit is the step of the whole grid, called ``num_steps`` times.
    """
    carry = self.init(images[:1], learning_rates, rhos, seeds)
    losses = []
    for step_index in range(self.recipe.num_steps):
      carry, loss = self.step(images, labels, carry, learning_rates, rhos, seeds,
                              jnp.int32(step_index))
      losses.append(loss)
    return carry[0], jnp.stack(losses, axis=-1)


def compiled_grid_trainer(recipe: Recipe) -> Trainer:
  """The init and step of every grid point as one vmapped, jitted program each."""
  init = jax.vmap(functools.partial(_init_point, recipe), in_axes=(None, 0, 0, 0))
  step = jax.vmap(functools.partial(_step_point, recipe),
                  in_axes=(None, None, 0, 0, 0, 0, None))
  return Trainer(recipe, jax.jit(init), jax.jit(step, donate_argnums=2))


def compiled_point_trainer(recipe: Recipe) -> Trainer:
  """The same computation for one point, without vmap."""
  return Trainer(recipe, jax.jit(functools.partial(_init_point, recipe)),
                 jax.jit(functools.partial(_step_point, recipe), donate_argnums=2))


def _as_grid_arrays(learning_rates, rhos, seeds):
  lrs = jnp.asarray(learning_rates, jnp.float32)
  rhos = jnp.asarray(rhos, jnp.float32)
  seeds = jnp.asarray(seeds, jnp.uint32)
  if not lrs.shape == rhos.shape == seeds.shape or lrs.ndim != 1:
    raise ValueError(f'learning_rates, rhos and seeds must be 1-D of one length, got '
                     f'{lrs.shape}, {rhos.shape}, {seeds.shape}')
  return lrs, rhos, seeds


def train_grid(recipe: Recipe, images, labels, learning_rates: Sequence[float],
               rhos: Sequence[float], seeds: Sequence[int], trainer: Optional[Trainer] = None):
  """Trains every point ``(learning_rates[g], rhos[g], seeds[g])`` in one vmapped program.

  Returns:
    ``(params, losses)``: params with a leading grid axis ``[G, ...]`` and the per-step
    training losses ``[G, num_steps]``.
  """
  lrs, rhos, seeds = _as_grid_arrays(learning_rates, rhos, seeds)
  trainer = trainer or compiled_grid_trainer(recipe)
  return trainer(jnp.asarray(images), jnp.asarray(labels), lrs, rhos, seeds)


def train_point(recipe: Recipe, images, labels, learning_rate: float, rho: float, seed: int,
                trainer: Optional[Trainer] = None):
  """One grid point alone: ``(params, losses [num_steps])``."""
  trainer = trainer or compiled_point_trainer(recipe)
  return trainer(jnp.asarray(images), jnp.asarray(labels), jnp.float32(learning_rate),
                 jnp.float32(rho), jnp.uint32(seed))


def grid_features(recipe: Recipe, params, images, chunk_size: int = 1000):
  """``(logits [G, N, classes], features [G, N, D])`` of every grid point's model (numpy)."""
  model = make_model(recipe)
  apply = jax.jit(jax.vmap(
      lambda p, x: model.apply({'params': p}, x, return_features=True), in_axes=(0, None)))
  logits, features = [], []
  for start in range(0, len(images), chunk_size):
    out = apply(params, jnp.asarray(images[start:start + chunk_size]))
    logits.append(np.asarray(out[0]))
    features.append(np.asarray(out[1]))
  return np.concatenate(logits, axis=1), np.concatenate(features, axis=1)


def synthetic_task(num_examples: int = 256, shape=(32, 16, 1), seed: int = 0):
  """A small random two-class image task (for tests and the throughput benchmark)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, num_examples).astype(np.int32)
  images = rng.normal(size=(num_examples, *shape)).astype(np.float32)
  images[:, :4] += 1.5 * (2 * labels[:, None, None, None] - 1)  # a learnable signal
  return images, labels

"""Training one toy run with SGD, LSAM, SAM or a ratio intervention, written to be vmapped.

Every run of a sweep is described by a :class:`RunSpec` of *arrays* (seed,
radius, fixed ratio, complexity, corruption), so a sweep is one ``vmap`` over a
flat batch of specs and one compilation per method and shape. Steps run inside
``lax.scan`` in chunks (:func:`train_chunk`); after each chunk the run is
evaluated and its importance weights are snapshotted on the training set.

The update rules (batch ``B``, learning rate ``eta``, ``l = log(1 + e^{-y f})``):

* ``sgd``:  ``w <- w - eta grad L_B(w)``, ``w = (theta, v)``.
* ``lsam``: ``v~ = v + rho g_v / ||g_v||``, ``g_v = grad_v L_B(theta, v)``;
  ``w <- w - eta grad L_B(theta, v~)`` (Eq. 5), through
  ``optax.chain(samjax.lsam(rho), optax.sgd(eta))``.
* ``sam``:  ``w~ = w + rho g / ||g||``; ``w <- w - eta grad L_B(w~)`` (Eq. 3),
  through ``optax.chain(samjax.sam(rho), optax.sgd(eta))``.
* interventions (Appendix C, Eqs. 8-10). Eq. 6 splits the representation
  gradient of one example into an importance weight and a feature-gradient sum,

      grad_theta l = -y sigma(-y v.Phi) [v_easy grad phi_easy + v_hard grad phi_hard],

  and each intervention replaces ``v`` by ``v^`` in one or both places:
  ``iw_only`` in ``sigma(.)`` (Eq. 8), ``lr_only`` in ``[.]`` (Eq. 9), ``iw_lr``
  in both (Eq. 10). ``v^`` fixes the *direction* of the head,
  ``v^_hard / v^_easy = c``, and keeps its length, ``||v^|| = ||v||``
  (:func:`fixed_ratio_head`): only the balance is fixed, not the overall scale
  (which grows during training and sets how fast the loss saturates), and an
  intervention with ``c = v_hard / v_easy`` is exactly SGD. Eqs. 8-10 are the
  gradient of the representation ``theta``; the head ``v`` keeps its ordinary
  SGD gradient ``-y sigma(-y v.Phi) Phi``, so an intervention changes how the
  features are learned and nothing else. (Feeding the head the intervened
  weight instead makes ``iw_only`` shrink ``v_hard``, since it up-weights the
  points the hard feature gets wrong; we measured no benefit from it either.)
  All parameters then take a plain SGD step.

Per step we record the real ratio ``v_hard / v_easy``, the phantom ratio
``v~_hard / v~_easy`` and the learning-rate scales ``v~_k / v_k`` (Figs. 2B, 4),
where the "phantom" head is the one the update used in place of ``v``: ``v~``
for LSAM and SAM (the head block of SAM's perturbation), ``v^`` for the
interventions, and ``v`` itself for SGD (the phantom at ``rho = 0``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import samjax
from samjax.toy import data as toy_data
from samjax.toy import model as toy_model
from samjax.toy import probe as toy_probe

PyTree = Any

METHODS = ('sgd', 'lsam', 'sam', 'iw_only', 'lr_only', 'iw_lr')
# intervention -> (fix the ratio in the importance weight, fix it in the feature-gradient weights)
INTERVENTIONS = {'iw_only': (True, False), 'lr_only': (False, True), 'iw_lr': (True, True)}


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What every run of one compiled sweep shares (static, hashable).

  Attributes:
    method: one of :data:`METHODS`.
    hidden: width of each feature MLP.
    head_init: initial ``v_easy = v_hard``.
    learning_rate: constant step size ``eta``.
    batch_size: examples per step.
    num_train: training-set size.
    num_probe: size of each fresh probe sample (probe-train and probe-test).
    data: the distribution's constants.
    base_seed: ``config.seed``; a run's randomness is ``fold_in(key(base_seed), seed)``.
  """

  method: str
  hidden: int = 32
  head_init: float = 1.0
  learning_rate: float = 0.05
  batch_size: int = 5
  num_train: int = 300
  num_probe: int = 2000
  data: toy_data.ToyDataConstants = toy_data.ToyDataConstants()
  base_seed: int = 0

  @property
  def model(self) -> toy_model.DisentangledModel:
    return toy_model.DisentangledModel(hidden=self.hidden, head_init=self.head_init)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size


class RunSpec(NamedTuple):
  """One run's traced inputs; a sweep stacks them along a leading axis.

  Attributes:
    seed: int32; selects the training set, the init and the batch order.
    rho: perturbation radius (LSAM, SAM; ignored otherwise).
    fixed_ratio: ``c = v^_hard / v^_easy`` (interventions; ignored otherwise).
    complexity: spiral rotation in degrees.
    corruption: Appendix H training-feature corruptions.
  """

  seed: jax.Array
  rho: jax.Array
  fixed_ratio: jax.Array
  complexity: jax.Array
  corruption: toy_data.Corruption


class RunData(NamedTuple):
  """A run's data: the training set, two fresh clean probe samples and the batch-order key."""

  train_x: jax.Array
  train_y: jax.Array
  probe_train_x: jax.Array
  probe_train_y: jax.Array
  probe_test_x: jax.Array
  probe_test_y: jax.Array
  order_key: jax.Array


class StepStats(NamedTuple):
  """Head statistics of one step (Figs. 2B and 4); a chunk returns them for every step."""

  real_easy: jax.Array       # v_easy
  real_hard: jax.Array       # v_hard
  phantom_easy: jax.Array    # v~_easy
  phantom_hard: jax.Array    # v~_hard
  real_ratio: jax.Array      # v_hard / v_easy
  phantom_ratio: jax.Array   # v~_hard / v~_easy
  lr_scale_easy: jax.Array   # v~_easy / v_easy
  lr_scale_hard: jax.Array   # v~_hard / v_hard


class RunState(NamedTuple):
  params: PyTree
  opt_state: optax.OptState
  step: jax.Array


class Snapshot(NamedTuple):
  """Real and phantom importance weights on the whole training set (Figs. 3, 5).

  The phantom is formed with the full-batch gradient, so a snapshot shows what
  one LSAM (SAM, intervention) step would do to every training point.
  """

  weight_real: jax.Array
  weight_phantom: jax.Array
  contribution_easy: jax.Array  # y v_easy phi_easy
  contribution_hard: jax.Array  # y v_hard phi_hard


class Evaluation(NamedTuple):
  hard_probe_error: jax.Array
  easy_probe_error: jax.Array
  train_error: jax.Array
  test_error: jax.Array


def run_keys(spec: RunSpec, setup: TrainSetup) -> dict[str, jax.Array]:
  """Independent keys for a run; they depend on the seed only, so runs that
  differ in method, radius or complexity share their data, init and batch order."""
  key = jax.random.fold_in(jax.random.PRNGKey(setup.base_seed), spec.seed)
  data_key, init_key, order_key, probe_key = jax.random.split(key, 4)
  return dict(data=data_key, init=init_key, order=order_key, probe=probe_key)


def make_run_data(spec: RunSpec, setup: TrainSetup) -> RunData:
  """Training set (corrupted as the spec says) and clean probe samples for one run."""
  keys = run_keys(spec, setup)
  train_x, train_y = toy_data.sample_toy(keys['data'], setup.num_train, spec.complexity,
                                         setup.data, spec.corruption)
  # One draw split in two: probe-train and probe-test are independent fresh samples.
  probe_x, probe_y = toy_data.sample_toy(keys['probe'], 2 * setup.num_probe, spec.complexity,
                                         setup.data)
  n = setup.num_probe
  return RunData(train_x, train_y, probe_x[:n], probe_y[:n], probe_x[n:], probe_y[n:],
                 keys['order'])


def make_optimizer(setup: TrainSetup, rho: jax.Array) -> optax.GradientTransformationExtraArgs:
  """The optax chain of a method; ``rho`` may be traced. Interventions use plain SGD
  on their modified gradient (see :func:`intervention_grads`)."""
  descent = optax.sgd(setup.learning_rate)
  if setup.method == 'lsam':
    return optax.chain(samjax.lsam(rho), descent)
  if setup.method == 'sam':
    return optax.chain(samjax.sam(rho), descent)
  return optax.chain(descent)  # a chain, so update() accepts (and ignores) grad_fn


def batch_loss(params: PyTree, x: jax.Array, y: jax.Array, setup: TrainSetup) -> jax.Array:
  """``L_B = mean_i log(1 + exp(-y_i f(x_i)))``."""
  return jnp.mean(toy_model.logistic_loss(setup.model.apply({'params': params}, x), y))


def fixed_ratio_head(v: jax.Array, ratio: jax.Array) -> jax.Array:
  """``v^ = ||v|| (1, c) / sqrt(1 + c^2)``: ``v^_hard / v^_easy = c`` and ``||v^|| = ||v||``."""
  direction = jnp.stack([jnp.ones_like(ratio), ratio]) / jnp.sqrt(1.0 + ratio**2)
  return jnp.linalg.norm(v) * direction


def intervention_grads(params: PyTree, x: jax.Array, y: jax.Array, ratio: jax.Array, *,
                       fix_importance: bool, fix_feature_lr: bool,
                       setup: TrainSetup) -> PyTree:
  """The batch gradient of Eqs. 8-10 (Appendix C) for all parameters.

  With ``w_iw`` the head in the importance weight and ``w_lr`` the head in the
  feature-gradient sum (each ``v^`` if fixed, else ``v``)::

      grad_theta = mean_i  -y_i sigma(-y_i w_iw . Phi_i) [w_lr . grad_theta Phi_i]
      grad_v     = mean_i  -y_i sigma(-y_i w_iw . Phi_i) Phi_i

  computed as the gradient of a surrogate whose coefficients are held constant
  with ``stop_gradient``; with neither term fixed it is the logistic-loss
  gradient. The head's gradient is the ordinary one, ``mean_i -y_i sigma(-y_i
  v . Phi_i) Phi_i``, whatever is fixed (see the module docstring).
  """
  v = toy_model.head_weights(params)
  v_hat = fixed_ratio_head(v, ratio)
  w_iw = jax.lax.stop_gradient(v_hat if fix_importance else v)
  w_lr = jax.lax.stop_gradient(v_hat if fix_feature_lr else v)

  def surrogate(p):
    _, features = setup.model.apply({'params': p}, x, return_features=True)
    fixed_features = jax.lax.stop_gradient(features)
    # Both coefficients are constants of the surrogate: -y sigma(-y w . Phi).
    representation_coefficient = -y * toy_model.importance_weights(fixed_features @ w_iw, y)
    head_coefficient = -y * toy_model.importance_weights(fixed_features @ v, y)
    representation_term = jax.lax.stop_gradient(representation_coefficient) * (features @ w_lr)
    head_term = (jax.lax.stop_gradient(head_coefficient)
                 * (fixed_features @ toy_model.head_weights(p)))
    return jnp.mean(representation_term + head_term)

  return jax.grad(surrogate)(params)


def phantom_of(params: PyTree, grads: PyTree, spec: RunSpec, setup: TrainSetup) -> PyTree:
  """The parameters whose head replaces ``v`` in the method's update (see module doc)."""
  if setup.method == 'lsam':
    return samjax.phantom_params(params, grads, spec.rho, mask=samjax.head_mask)[0]
  if setup.method == 'sam':
    return samjax.phantom_params(params, grads, spec.rho)[0]
  if setup.method in INTERVENTIONS:
    v_hat = fixed_ratio_head(toy_model.head_weights(params), spec.fixed_ratio)
    return toy_model.with_head_weights(params, v_hat)
  return params


def head_stats(v: jax.Array, v_phantom: jax.Array) -> StepStats:
  return StepStats(real_easy=v[0], real_hard=v[1], phantom_easy=v_phantom[0],
                   phantom_hard=v_phantom[1], real_ratio=v[1] / v[0],
                   phantom_ratio=v_phantom[1] / v_phantom[0],
                   lr_scale_easy=v_phantom[0] / v[0], lr_scale_hard=v_phantom[1] / v[1])


def init_run(spec: RunSpec, setup: TrainSetup) -> tuple[RunState, RunData]:
  """Initial state and data of one run (vmap over ``spec``)."""
  params, data = init_params_and_data(spec, setup)
  return init_state(params, spec, setup), data


def init_params_and_data(spec: RunSpec, setup: TrainSetup) -> tuple[PyTree, RunData]:
  """The method-independent part of :func:`init_run`: data and initial parameters."""
  data = make_run_data(spec, setup)
  params = setup.model.init(run_keys(spec, setup)['init'], data.train_x[:1])['params']
  return params, data


def init_state(params: PyTree, spec: RunSpec, setup: TrainSetup) -> RunState:
  return RunState(params, make_optimizer(setup, spec.rho).init(params), jnp.zeros((), jnp.int32))


def epoch_order(data: RunData, epoch: jax.Array, setup: TrainSetup) -> jax.Array:
  """The permutation of the training set that epoch ``epoch`` visits."""
  return jax.random.permutation(jax.random.fold_in(data.order_key, epoch), setup.num_train)


def batch_at(data: RunData, step: jax.Array, setup: TrainSetup,
             epoch_orders: Optional[tuple[jax.Array, jax.Array]] = None
             ) -> tuple[jax.Array, jax.Array]:
  """The ``step``-th batch: epochs are fresh permutations, the remainder is dropped.

  ``epoch_orders = (first_epoch, orders)`` passes precomputed permutations of epochs
  ``first_epoch, first_epoch + 1, ...`` (a chunk computes them once instead of once a step).
  """
  epoch, position = jnp.divmod(step, setup.steps_per_epoch)
  if epoch_orders is None:
    order = epoch_order(data, epoch, setup)
  else:
    first_epoch, orders = epoch_orders
    order = orders[epoch - first_epoch]
  index = jax.lax.dynamic_slice_in_dim(order, position * setup.batch_size, setup.batch_size)
  return data.train_x[index], data.train_y[index]


def train_step(state: RunState, data: RunData, spec: RunSpec, setup: TrainSetup,
               epoch_orders: Optional[tuple[jax.Array, jax.Array]] = None
               ) -> tuple[RunState, StepStats]:
  """One update of one run, and the head statistics of the step."""
  x, y = batch_at(data, state.step, setup, epoch_orders)
  grad_fn = jax.grad(functools.partial(batch_loss, x=x, y=y, setup=setup))
  if setup.method in INTERVENTIONS:
    fix_importance, fix_feature_lr = INTERVENTIONS[setup.method]
    grads = intervention_grads(state.params, x, y, spec.fixed_ratio,
                               fix_importance=fix_importance, fix_feature_lr=fix_feature_lr,
                               setup=setup)
  else:
    grads = grad_fn(state.params)
  # The phantom of this very batch gradient, as the update forms it (interventions
  # do not use the gradient: their v^ depends on v alone).
  phantom = phantom_of(state.params, grads, spec, setup)
  stats = head_stats(toy_model.head_weights(state.params), toy_model.head_weights(phantom))
  updates, opt_state = make_optimizer(setup, spec.rho).update(
      grads, state.opt_state, state.params, grad_fn=grad_fn)
  params = optax.apply_updates(state.params, updates)
  return RunState(params, opt_state, state.step + 1), stats


def snapshot(params: PyTree, data: RunData, spec: RunSpec, setup: TrainSetup) -> Snapshot:
  """Importance weights at ``params`` and at the full-batch phantom, on the training set."""
  x, y = data.train_x, data.train_y
  grads = jax.grad(batch_loss)(params, x, y, setup)
  phantom = phantom_of(params, grads, spec, setup)
  logits, features = setup.model.apply({'params': params}, x, return_features=True)
  if setup.method == 'sam':  # SAM also moves theta, so the phantom's features differ
    phantom_logits = setup.model.apply({'params': phantom}, x)
  else:
    phantom_logits = features @ toy_model.head_weights(phantom)
  v = toy_model.head_weights(params)
  return Snapshot(weight_real=toy_model.importance_weights(logits, y),
                  weight_phantom=toy_model.importance_weights(phantom_logits, y),
                  contribution_easy=y * v[0] * features[:, 0],
                  contribution_hard=y * v[1] * features[:, 1])


def evaluate(params: PyTree, data: RunData, setup: TrainSetup) -> Evaluation:
  """Probe errors of each feature on fresh clean data, training and test error of ``f``."""
  model = setup.model
  _, probe_train_features = model.apply({'params': params}, data.probe_train_x,
                                        return_features=True)
  test_logits, probe_test_features = model.apply({'params': params}, data.probe_test_x,
                                                 return_features=True)
  errors = [toy_probe.probe_error(probe_train_features[:, k], data.probe_train_y,
                                  probe_test_features[:, k], data.probe_test_y)
            for k in range(2)]
  train_logits = model.apply({'params': params}, data.train_x)
  return Evaluation(hard_probe_error=errors[1], easy_probe_error=errors[0],
                    train_error=jnp.mean(jnp.sign(train_logits) != data.train_y),
                    test_error=jnp.mean(jnp.sign(test_logits) != data.probe_test_y))


class ChunkResult(NamedTuple):
  """What a chunk reports: per-step head statistics ``[num_steps]``, then the
  snapshot and the evaluation at the chunk's end."""

  stats: StepStats
  snapshot: Snapshot
  evaluation: Evaluation


def train_chunk(state: RunState, data: RunData, spec: RunSpec, setup: TrainSetup,
                num_steps: int) -> tuple[RunState, ChunkResult]:
  """``num_steps`` steps in a ``lax.scan``, then a snapshot and an evaluation."""

  first_epoch = state.step // setup.steps_per_epoch
  epochs = first_epoch + jnp.arange(num_steps // setup.steps_per_epoch + 2)
  orders = jax.vmap(lambda e: epoch_order(data, e, setup))(epochs)

  def body(carry, _):
    return train_step(carry, data, spec, setup, (first_epoch, orders))

  state, stats = jax.lax.scan(body, state, None, length=num_steps)
  return state, ChunkResult(stats, snapshot(state.params, data, spec, setup),
                            evaluate(state.params, data, setup))


@functools.lru_cache(maxsize=None)
def _compiled_params_and_data(setup: TrainSetup):
  # It runs once per sweep and costs microseconds, but LLVM's optimisation of
  # the unrolled random-number code takes ~10x longer to compile than the
  # training chunk; without it the compile is ~10x faster.
  return jax.jit(jax.vmap(functools.partial(init_params_and_data, setup=setup)),
                 compiler_options={'xla_backend_optimization_level': 0})


@functools.lru_cache(maxsize=None)
def compiled_sweep_fns(setup: TrainSetup, chunk_steps: int):
  """``(init, chunk)``: ``init(specs)``, ``chunk(state, data, specs)``, vmapped over runs, jitted.

  Cached per ``(setup, chunk_steps)``, so a sweep compiles each once whatever
  the number of chunks; only the number of runs can trigger a retrace. The
  data and parameter initialisation does not depend on the method, so all the
  methods of a sweep share one compilation of it.
  """
  params_and_data = _compiled_params_and_data(dataclasses.replace(setup, method='sgd'))
  state_init = jax.jit(jax.vmap(functools.partial(init_state, setup=setup)))

  def init(specs: RunSpec) -> tuple[RunState, RunData]:
    params, data = params_and_data(specs)
    return state_init(params, specs), data

  chunk = jax.jit(jax.vmap(functools.partial(train_chunk, setup=setup, num_steps=chunk_steps)))
  return init, chunk

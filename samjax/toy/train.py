"""Training one toy run with SGD, LSAM, SAM or a ratio intervention, written to be vmapped.

Every run of a sweep is described by a :class:`RunSpec` of *arrays* (seed,
radius, fixed ratio, complexity, corruption, data constants, learning rate,
head init, method flags), so a sweep is one ``vmap`` over a flat batch of specs
and one compilation per program (:data:`PROGRAMS`: SGD, LSAM and LSAM-noflip
share one, the three interventions another, SAM the third) and shape. Steps run inside
``lax.scan`` in chunks (:func:`train_chunk`); after each chunk the run is
evaluated and its importance weights are snapshotted on the training set.

The update rules (batch ``B``, learning rate ``eta``, ``l = log(1 + e^{-y f})``):

* ``sgd``:  ``w <- w - eta grad L_B(w)``, ``w = (theta, v)``.
* ``lsam``: ``v~ = v + rho g_v / ||g_v||``, ``g_v = grad_v L_B(theta, v)``;
  ``w <- w - eta grad L_B(theta, v~)`` (Eq. 5); the same step as
  ``optax.chain(samjax.lsam(rho), optax.sgd(eta))`` (tested), written out so that
  SGD (``rho = 0``) and LSAM-noflip share its compiled program.
* ``lsam_noflip`` (an ablation, not in the paper): LSAM with each coordinate of
  ``v~`` that would cross zero (sign opposite to ``v``'s) clipped to 0, so the
  phantom head never flips the sign of a feature's gradient.
* ``sam``:  ``w~ = w + rho g / ||g||``; ``w <- w - eta grad L_B(w~)`` (Eq. 3),
  through ``optax.chain(samjax.sam(rho), optax.sgd(eta))``.
* interventions (Appendix C, Eqs. 8-10). Eq. 6 splits the representation
  gradient of one example into an importance weight and a feature-gradient sum,

      grad_theta l = -y sigma(-y v.Phi) [v_easy grad phi_easy + v_hard grad phi_hard],

  and each intervention replaces ``v`` by ``v^`` in one or both places:
  ``iw_only`` in ``sigma(.)`` (Eq. 8), ``lr_only`` in ``[.]`` (Eq. 9), ``iw_lr``
  in both (Eq. 10). ``v^`` has the direction ``v^_hard / v^_easy = c`` and, by
  default, the length of the initial head ``||v_0||`` for the whole run:
  Appendix C fixes ``v^_easy`` and ``v^_hard`` ("fixed and do not change during
  training"). ``intervention_norm='tracking'`` instead keeps ``||v^|| = ||v||``
  at every step (an intervention at ``c = v_hard / v_easy`` is then SGD). Eqs.
  8-10 are the gradient of the representation ``theta``; the head ``v`` keeps
  its ordinary SGD gradient ``-y sigma(-y v.Phi) Phi``, so an intervention
  changes how the features are learned and nothing else. All parameters then
  take a plain SGD step.

Per step we record the real ratio ``v_hard / v_easy``, the phantom ratio
``v~_hard / v~_easy`` and the learning-rate scales ``v~_k / v_k`` (Figs. 2B, 4),
where the "phantom" head is the one the update used in place of ``v``: ``v~``
for LSAM and SAM (the head block of SAM's perturbation), ``v^`` for the
interventions, and ``v`` itself for SGD (the phantom at ``rho = 0``), and the
batch's mean real and phantom importance weights.
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

METHODS = ('sgd', 'lsam', 'lsam_noflip', 'sam', 'iw_only', 'lr_only', 'iw_lr')
# intervention -> (fix the ratio in the importance weight, fix it in the feature-gradient weights)
INTERVENTIONS = {'iw_only': (True, False), 'lr_only': (False, True), 'iw_lr': (True, True)}
# Methods that share one compiled program: what tells them apart is a traced
# input of the run (rho = 0 makes LSAM's step SGD's exactly, since the phantom is
# v + 0 g / (||g|| + eps); ``clip_phantom`` makes it LSAM-noflip; two flags
# select the intervention), so a sweep compiles three training programs.
PROGRAMS = {'sgd': 'lsam', 'lsam': 'lsam', 'lsam_noflip': 'lsam', 'sam': 'sam',
            'iw_only': 'intervention', 'lr_only': 'intervention', 'iw_lr': 'intervention'}
# How the interventions' v^ gets its length (see fixed_ratio_head).
INTERVENTION_NORMS = ('initial', 'tracking')


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What every run of one compiled program shares (static, hashable).

  Attributes:
    program: one of the values of :data:`PROGRAMS`.
    hidden: width of each feature MLP.
    batch_size: examples per step.
    num_train: training-set size.
    num_probe: size of each fresh probe sample (probe-train, probe-validation and
      probe-test, three independent draws).
    curve_probe: points of probe-train and probe-test used by the cheap evaluation
      after every chunk (the probe-error curves); the final evaluation uses all
      ``num_probe`` of each sample.
    intervention_norm: ``'initial'`` (Appendix C: ``v^`` is fixed for the whole
      run, its length that of the initial head) or ``'tracking'`` (``||v^|| =
      ||v||`` at every step).
    base_seed: ``config.seed``; a run's randomness is ``fold_in(key(base_seed), seed)``.
  """

  program: str
  hidden: int = 32
  batch_size: int = 5
  num_train: int = 300
  num_probe: int = 2000
  curve_probe: int = 250
  intervention_norm: str = 'initial'
  base_seed: int = 0

  @property
  def model(self) -> toy_model.DisentangledModel:
    return toy_model.DisentangledModel(hidden=self.hidden)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size


class RunSpec(NamedTuple):
  """One run's traced inputs; a sweep stacks them along a leading axis.

  Everything that is a number (not a shape) is traced, so one compiled program
  serves every radius, ratio, complexity, data constant, head init and
  learning rate of a sweep (the sensitivity study varies them all at once).

  Attributes:
    seed: int32; selects the training set, the init and the batch order.
    rho: perturbation radius (LSAM, SAM; 0 for SGD; ignored by interventions); in
      units of the run's initial head length ``||v_0||`` when ``rho_relative`` is 1.
    fixed_ratio: ``c = v^_hard / v^_easy`` (interventions; ignored otherwise).
    complexity: spiral rotation in degrees.
    corruption: Appendix H training-feature corruptions.
    data: the distribution's constants, each a scalar array.
    learning_rate: constant step size ``eta``.
    head_init: scale of the initial head ``v``.
    head_random: 1.0 draws each coordinate of ``v`` uniform in ``+-head_init /
      sqrt(2)`` per run (PyTorch's ``nn.Linear`` init at ``head_init = 1``: uniform in
      ``+-1/sqrt(fan_in)``, signed); 0.0 sets ``v = head_init (1, 1)``.
    rho_relative: 1.0: the radius is ``rho ||v_0||`` (the regime is set by
      ``rho / ||v_0||``, whatever the head's init); 0.0: ``rho`` itself.
    clip_phantom: 1.0 for LSAM-noflip: each coordinate of ``v~`` that would
      take the sign opposite to ``v``'s is set to 0.
    fix_importance, fix_feature_lr: 1.0 to use ``v^`` in the importance weight
      (Eq. 8), in the feature-gradient weights (Eq. 9); both for Eq. 10.
  """

  seed: jax.Array
  rho: jax.Array
  rho_relative: jax.Array
  fixed_ratio: jax.Array
  complexity: jax.Array
  corruption: toy_data.Corruption
  data: toy_data.ToyDataConstants
  learning_rate: jax.Array
  head_init: jax.Array
  head_random: jax.Array
  clip_phantom: jax.Array
  fix_importance: jax.Array
  fix_feature_lr: jax.Array


def make_spec(*, seed=0, rho=0.0, fixed_ratio=1.0, complexity=360.0, corruption=None,
              data: toy_data.ToyDataConstants = toy_data.ToyDataConstants(),
              learning_rate=0.05, head_init=1.0, head_random=False, method='lsam',
              rho_relative=False) -> RunSpec:
  """The spec of one run of ``method`` (its flags set from the method's name)."""
  f = lambda x: jnp.asarray(x, jnp.float32)
  fix_importance, fix_feature_lr = INTERVENTIONS.get(method, (False, False))
  return RunSpec(seed=jnp.asarray(seed, jnp.int32), rho=f(rho), rho_relative=f(rho_relative),
                 fixed_ratio=f(fixed_ratio),
                 complexity=f(complexity),
                 corruption=toy_data.Corruption.clean() if corruption is None else corruption,
                 data=toy_data.ToyDataConstants(*[f(x) for x in data]),
                 learning_rate=f(learning_rate), head_init=f(head_init),
                 head_random=f(head_random), clip_phantom=f(method == 'lsam_noflip'),
                 fix_importance=f(fix_importance), fix_feature_lr=f(fix_feature_lr))


class RunData(NamedTuple):
  """A run's data: the training set, three fresh clean probe samples (probe-train fits
  the threshold, probe-validation chooses rho and c, probe-test scores them), the
  batch-order key and the initial head (the interventions' ``v^`` takes its length)."""

  train_x: jax.Array
  train_y: jax.Array
  probe_train_x: jax.Array
  probe_train_y: jax.Array
  probe_val_x: jax.Array
  probe_val_y: jax.Array
  probe_test_x: jax.Array
  probe_test_y: jax.Array
  order_key: jax.Array
  initial_head: jax.Array


class StepStats(NamedTuple):
  """Head statistics of one step (Figs. 2B and 4); a chunk returns them for every step."""

  real_easy: jax.Array       # v_easy
  real_hard: jax.Array       # v_hard
  phantom_easy: jax.Array    # v~_easy
  phantom_hard: jax.Array    # v~_hard
  real_ratio: jax.Array      # |v_hard| / |v_easy|
  phantom_ratio: jax.Array   # (v~_hard sgn v_hard) / (v~_easy sgn v_easy)
  lr_scale_easy: jax.Array   # v~_easy / v_easy
  lr_scale_hard: jax.Array   # v~_hard / v_hard
  weight_real: jax.Array     # mean over the batch of sigma(-y v.Phi)
  weight_phantom: jax.Array  # ... of sigma(-y v~.Phi) (Phi at the current theta)
  weight_max_share: jax.Array  # largest real weight of the batch / their sum


class RunState(NamedTuple):
  params: PyTree
  opt_state: optax.OptState
  step: jax.Array


class Snapshot(NamedTuple):
  """Real and phantom importance weights on the whole training set (Figs. 3, 5).

  The phantom is formed with the full-batch gradient, so a snapshot shows what
  one LSAM (SAM, intervention) step would do to every training point. The
  margins ``y f`` give the weights' logarithms without underflow
  (``log sigma(-m) = -softplus(m)``).
  """

  weight_real: jax.Array
  weight_phantom: jax.Array
  margin_real: jax.Array        # y v.Phi
  margin_phantom: jax.Array     # y v~.Phi (SAM: y f at its phantom parameters)
  contribution_easy: jax.Array  # y v_easy phi_easy
  contribution_hard: jax.Array  # y v_hard phi_hard
  real_head: jax.Array          # v [2]
  phantom_head: jax.Array       # the full-batch phantom head v~ [2]


class Evaluation(NamedTuple):
  """The cheap evaluation after every chunk (``curve_probe`` points per probe sample)."""

  hard_probe_error: jax.Array
  easy_probe_error: jax.Array
  train_error: jax.Array
  test_error: jax.Array


class FinalEvaluation(NamedTuple):
  """The end-of-training evaluation on the whole probe samples: the threshold is fitted
  on probe-train and scored on probe-validation (``*_val``, where rho and c are chosen)
  and on probe-test (where the chosen setting is scored)."""

  hard_probe_error: jax.Array
  easy_probe_error: jax.Array
  hard_probe_error_val: jax.Array
  easy_probe_error_val: jax.Array
  train_error: jax.Array
  test_error: jax.Array


def run_keys(spec: RunSpec, setup: TrainSetup) -> dict[str, jax.Array]:
  """Independent keys for a run; they depend on the seed only, so runs that
  differ in method, radius or complexity share their data, init and batch order."""
  key = jax.random.fold_in(jax.random.PRNGKey(setup.base_seed), spec.seed)
  data_key, init_key, order_key, probe_key = jax.random.split(key, 4)
  return dict(data=data_key, init=init_key, order=order_key, probe=probe_key)


def make_run_data(spec: RunSpec, setup: TrainSetup) -> RunData:
  """Training set (corrupted as the spec says) and clean probe samples for one run;
  ``initial_head`` is filled in by :func:`init_params_and_data`."""
  keys = run_keys(spec, setup)
  train_x, train_y = toy_data.sample_toy(keys['data'], setup.num_train, spec.complexity,
                                         spec.data, spec.corruption)
  # One draw split in three: probe-train, probe-validation and probe-test are
  # independent fresh samples.
  probe_x, probe_y = toy_data.sample_toy(keys['probe'], 3 * setup.num_probe, spec.complexity,
                                         spec.data)
  n = setup.num_probe
  return RunData(train_x, train_y, probe_x[:n], probe_y[:n], probe_x[n:2 * n],
                 probe_y[n:2 * n], probe_x[2 * n:], probe_y[2 * n:], keys['order'],
                 jnp.zeros(2))


def initial_head(spec: RunSpec, key: jax.Array) -> jax.Array:
  """``head_init (1, 1)``, or, when ``head_random``, ``head_init u`` with ``u`` uniform in
  ``[-1/sqrt(2), 1/sqrt(2)]^2``: PyTorch's ``nn.Linear(2, 1)`` init (bound ``1/sqrt(fan_in)``)."""
  bound = 1.0 / jnp.sqrt(2.0)
  signed = jax.random.uniform(key, (2,), minval=-bound, maxval=bound)
  return spec.head_init * jnp.where(spec.head_random > 0, signed, 1.0)


def radius(spec: RunSpec, data: RunData) -> jax.Array:
  """The run's perturbation radius: ``rho``, or ``rho ||v_0||`` when ``rho_relative``."""
  return spec.rho * jnp.where(spec.rho_relative > 0, jnp.linalg.norm(data.initial_head), 1.0)


def head_signs(v: jax.Array) -> jax.Array:
  """``sgn v`` with 0 counted positive: the orientation of each feature's weight."""
  return jnp.where(v >= 0, 1.0, -1.0)


def make_optimizer(setup: TrainSetup, spec: RunSpec) -> optax.GradientTransformationExtraArgs:
  """The optax chain of a program. LSAM, LSAM-noflip, SGD and the interventions
  descend along a gradient formed by :func:`train_step`; SAM is ``samjax.sam``."""
  descent = optax.sgd(spec.learning_rate)
  if setup.program == 'sam':
    return optax.chain(samjax.sam(spec.rho), descent)
  return optax.chain(descent)  # a chain, so update() accepts (and ignores) grad_fn


def batch_loss(params: PyTree, x: jax.Array, y: jax.Array, setup: TrainSetup) -> jax.Array:
  """``L_B = mean_i log(1 + exp(-y_i f(x_i)))``."""
  return batch_loss_and_features(params, x, y, setup)[0]


def batch_loss_and_features(params: PyTree, x: jax.Array, y: jax.Array,
                            setup: TrainSetup) -> tuple[jax.Array, jax.Array]:
  """``(L_B, Phi [B, 2])``: the features come out of the same forward pass."""
  logits, features = setup.model.apply({'params': params}, x, return_features=True)
  return jnp.mean(toy_model.logistic_loss(logits, y)), features


def fixed_ratio_head(norm: jax.Array, ratio: jax.Array) -> jax.Array:
  """``v^ = norm (1, c) / sqrt(1 + c^2)``: ``v^_hard / v^_easy = c`` and ``||v^|| = norm``."""
  direction = jnp.stack([jnp.ones_like(ratio), ratio]) / jnp.sqrt(1.0 + ratio**2)
  return norm * direction


def intervention_head(v: jax.Array, spec: RunSpec, data: RunData, setup: TrainSetup) -> jax.Array:
  """The interventions' ``v^``: ratio ``c`` of magnitudes, each coordinate with the sign of
  ``v``'s (a signed random head keeps each feature's orientation; a positive head is
  unchanged); length ``||v_0||`` (fixed for the run, as Appendix C fixes ``v^_easy`` and
  ``v^_hard``) or ``||v||`` (``'tracking'``)."""
  if setup.intervention_norm == 'tracking':
    norm = jnp.linalg.norm(v)
  else:
    norm = jnp.linalg.norm(data.initial_head)
  return head_signs(v) * fixed_ratio_head(norm, spec.fixed_ratio)


def intervention_grads(params: PyTree, x: jax.Array, y: jax.Array, v_hat: jax.Array, *,
                       fix_importance: jax.Array, fix_feature_lr: jax.Array,
                       setup: TrainSetup, return_features: bool = False):
  """The batch gradient of Eqs. 8-10 (Appendix C) for all parameters.

  With ``w_iw`` the head in the importance weight and ``w_lr`` the head in the
  feature-gradient sum (each ``v^`` if its flag is set, else ``v``)::

      grad_theta = mean_i  -y_i sigma(-y_i w_iw . Phi_i) [w_lr . grad_theta Phi_i]
      grad_v     = mean_i  -y_i sigma(-y_i v . Phi_i) Phi_i

  computed as the gradient of a surrogate whose coefficients are held constant
  with ``stop_gradient``; with neither flag set it is the logistic-loss
  gradient. The flags may be traced (bools or 0/1 floats). With
  ``return_features``, returns ``(gradient, Phi [B, 2])``.
  """
  v = toy_model.head_weights(params)
  w_iw = jax.lax.stop_gradient(jnp.where(fix_importance > 0, v_hat, v))
  w_lr = jax.lax.stop_gradient(jnp.where(fix_feature_lr > 0, v_hat, v))

  def surrogate(p):
    _, features = setup.model.apply({'params': p}, x, return_features=True)
    fixed_features = jax.lax.stop_gradient(features)
    # Both coefficients are constants of the surrogate: -y sigma(-y w . Phi).
    representation_coefficient = -y * toy_model.importance_weights(fixed_features @ w_iw, y)
    head_coefficient = -y * toy_model.importance_weights(fixed_features @ v, y)
    representation_term = jax.lax.stop_gradient(representation_coefficient) * (features @ w_lr)
    head_term = (jax.lax.stop_gradient(head_coefficient)
                 * (fixed_features @ toy_model.head_weights(p)))
    return jnp.mean(representation_term + head_term), fixed_features

  grads, features = jax.grad(surrogate, has_aux=True)(params)
  return (grads, features) if return_features else grads


def clip_at_zero(v: jax.Array, v_phantom: jax.Array) -> jax.Array:
  """``v~`` with every coordinate whose sign differs from ``v``'s set to 0 (LSAM-noflip)."""
  return jnp.where(v_phantom * v > 0, v_phantom, jnp.zeros_like(v_phantom))


def phantom_of(params: PyTree, grads: PyTree, spec: RunSpec, data: RunData,
               setup: TrainSetup) -> PyTree:
  """The parameters whose head replaces ``v`` in the method's update (see module doc)."""
  v = toy_model.head_weights(params)
  if setup.program == 'lsam':
    phantom = samjax.phantom_params(params, grads, radius(spec, data), mask=samjax.head_mask)[0]
    v_phantom = toy_model.head_weights(phantom)
    v_phantom = jnp.where(spec.clip_phantom > 0, clip_at_zero(v, v_phantom), v_phantom)
    return toy_model.with_head_weights(phantom, v_phantom)
  if setup.program == 'sam':
    return samjax.phantom_params(params, grads, radius(spec, data))[0]
  return toy_model.with_head_weights(params, intervention_head(v, spec, data, setup))


def head_stats(v: jax.Array, v_phantom: jax.Array, features: jax.Array,
               y: jax.Array) -> StepStats:
  weight_real = toy_model.importance_weights(features @ v, y)
  weight_phantom = toy_model.importance_weights(features @ v_phantom, y)
  # Ratios of the heads measured along the real head's orientation, so that a signed
  # head's ratios compare across runs (for a positive head they are the plain ratios).
  aligned = v_phantom * head_signs(v)
  return StepStats(real_easy=v[0], real_hard=v[1], phantom_easy=v_phantom[0],
                   phantom_hard=v_phantom[1], real_ratio=jnp.abs(v[1]) / jnp.abs(v[0]),
                   phantom_ratio=aligned[1] / aligned[0],
                   lr_scale_easy=v_phantom[0] / v[0], lr_scale_hard=v_phantom[1] / v[1],
                   weight_real=jnp.mean(weight_real), weight_phantom=jnp.mean(weight_phantom),
                   weight_max_share=jnp.max(weight_real) / jnp.sum(weight_real))


def init_run(spec: RunSpec, setup: TrainSetup) -> tuple[RunState, RunData]:
  """Initial state and data of one run (vmap over ``spec``)."""
  params, data = init_params_and_data(spec, setup)
  return init_state(params, spec, setup), data


def init_params_and_data(spec: RunSpec, setup: TrainSetup) -> tuple[PyTree, RunData]:
  """The program-independent part of :func:`init_run`: data and initial parameters."""
  data = make_run_data(spec, setup)
  init_key = run_keys(spec, setup)['init']
  params = setup.model.init(init_key, data.train_x[:1])['params']
  # The head's own key is folded from the init key, so the feature MLPs start
  # where they would without a random head.
  v0 = initial_head(spec, jax.random.fold_in(init_key, 1))
  return toy_model.with_head_weights(params, v0), data._replace(initial_head=v0)


def init_state(params: PyTree, spec: RunSpec, setup: TrainSetup) -> RunState:
  return RunState(params, make_optimizer(setup, spec).init(params), jnp.zeros((), jnp.int32))


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
  v = toy_model.head_weights(state.params)
  if setup.program == 'intervention':
    # v^ depends on v alone (and the run), not on the gradient.
    phantom = phantom_of(state.params, None, spec, data, setup)
    grads, features = intervention_grads(state.params, x, y, toy_model.head_weights(phantom),
                                         fix_importance=spec.fix_importance,
                                         fix_feature_lr=spec.fix_feature_lr, setup=setup,
                                         return_features=True)
  else:
    grads, features = jax.grad(batch_loss_and_features, has_aux=True)(state.params, x, y, setup)
    # The phantom of this very batch gradient, as the update forms it.
    phantom = phantom_of(state.params, grads, spec, data, setup)
    if setup.program == 'lsam':
      # Eq. 5: every parameter descends along the gradient at (theta, v~); the
      # same step as optax.chain(samjax.lsam(rho), optax.sgd(eta)) (tested), with
      # v~ clipped for LSAM-noflip.
      grads = grad_fn(phantom)
  stats = head_stats(v, toy_model.head_weights(phantom), features, y)
  updates, opt_state = make_optimizer(setup, spec).update(
      grads, state.opt_state, state.params, grad_fn=grad_fn)
  params = optax.apply_updates(state.params, updates)
  return RunState(params, opt_state, state.step + 1), stats


def snapshot(params: PyTree, data: RunData, spec: RunSpec, setup: TrainSetup) -> Snapshot:
  """Importance weights at ``params`` and at the full-batch phantom, on the training set."""
  x, y = data.train_x, data.train_y
  grads = jax.grad(batch_loss)(params, x, y, setup)
  phantom = phantom_of(params, grads, spec, data, setup)
  logits, features = setup.model.apply({'params': params}, x, return_features=True)
  if setup.program == 'sam':  # SAM also moves theta, so the phantom's features differ
    phantom_logits = setup.model.apply({'params': phantom}, x)
  else:
    phantom_logits = features @ toy_model.head_weights(phantom)
  v = toy_model.head_weights(params)
  return Snapshot(weight_real=toy_model.importance_weights(logits, y),
                  weight_phantom=toy_model.importance_weights(phantom_logits, y),
                  margin_real=y * logits, margin_phantom=y * phantom_logits,
                  contribution_easy=y * v[0] * features[:, 0],
                  contribution_hard=y * v[1] * features[:, 1],
                  real_head=v, phantom_head=toy_model.head_weights(phantom))


def evaluate(params: PyTree, data: RunData, setup: TrainSetup) -> Evaluation:
  """The cheap evaluation after a chunk: probe errors on the first ``curve_probe`` points
  of probe-train (fit) and probe-test (score), training error, test error of ``f``.

  A twentieth of the data of :func:`final_evaluate`: the per-chunk evaluation was half
  of the training time with the whole samples, and the curves only locate when the
  features are learned."""
  n = min(setup.curve_probe, setup.num_probe)
  model = setup.model
  _, probe_train_features = model.apply({'params': params}, data.probe_train_x[:n],
                                        return_features=True)
  test_logits, probe_test_features = model.apply({'params': params}, data.probe_test_x[:n],
                                                 return_features=True)
  errors = [toy_probe.probe_error(probe_train_features[:, k], data.probe_train_y[:n],
                                  probe_test_features[:, k], data.probe_test_y[:n])
            for k in range(2)]
  train_logits = model.apply({'params': params}, data.train_x)
  return Evaluation(hard_probe_error=errors[1], easy_probe_error=errors[0],
                    train_error=jnp.mean(jnp.sign(train_logits) != data.train_y),
                    test_error=jnp.mean(jnp.sign(test_logits) != data.probe_test_y[:n]))


def final_evaluate(params: PyTree, data: RunData, setup: TrainSetup) -> FinalEvaluation:
  """Probe errors on the whole samples: fitted on probe-train, scored on probe-validation
  and probe-test; training error and test error of ``f``."""
  model = setup.model
  features = lambda x: model.apply({'params': params}, x, return_features=True)
  _, train_features = features(data.probe_train_x)
  _, val_features = features(data.probe_val_x)
  test_logits, test_features = features(data.probe_test_x)
  probes = [toy_probe.fit_threshold_probe(train_features[:, k], data.probe_train_y)
            for k in range(2)]
  error = lambda k, f, y: jnp.mean(toy_probe.probe_predict(probes[k], f[:, k]) != y)
  train_logits = model.apply({'params': params}, data.train_x)
  return FinalEvaluation(
      hard_probe_error=error(1, test_features, data.probe_test_y),
      easy_probe_error=error(0, test_features, data.probe_test_y),
      hard_probe_error_val=error(1, val_features, data.probe_val_y),
      easy_probe_error_val=error(0, val_features, data.probe_val_y),
      train_error=jnp.mean(jnp.sign(train_logits) != data.train_y),
      test_error=jnp.mean(jnp.sign(test_logits) != data.probe_test_y))


@functools.lru_cache(maxsize=None)
def _compiled_final_evaluate(setup: TrainSetup):
  return jax.jit(jax.vmap(functools.partial(final_evaluate, setup=setup)))


def compiled_final_evaluate(setup: TrainSetup):
  """:func:`final_evaluate` vmapped over runs, jitted: one small program serves every
  program and batch size of a study."""
  return _compiled_final_evaluate(_params_and_data_setup(setup))


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


def _params_and_data_setup(setup: TrainSetup) -> TrainSetup:
  """The fields data and initialisation depend on; the rest set to fixed values."""
  return dataclasses.replace(setup, program='lsam', batch_size=1, intervention_norm='initial')


@functools.lru_cache(maxsize=None)
def _compiled_params_and_data(setup: TrainSetup):
  # It runs once per sweep and costs microseconds, but LLVM's optimisation of
  # the unrolled random-number code takes ~10x longer to compile than the
  # training chunk; without it the compile is ~10x faster.
  return jax.jit(jax.vmap(functools.partial(init_params_and_data, setup=setup)),
                 compiler_options={'xla_backend_optimization_level': 0})


def compiled_params_and_data(setup: TrainSetup):
  """``specs -> (params, data)`` vmapped over runs, jitted; one compilation serves
  every program and batch size (they do not change the data or the init)."""
  return _compiled_params_and_data(_params_and_data_setup(setup))


def init_state_batch(params: PyTree, specs: RunSpec, setup: TrainSetup) -> RunState:
  """:func:`init_state` of a batch of runs, vmapped but not jitted: the optimiser
  states are a few scalars, not worth a compilation."""
  return jax.vmap(functools.partial(init_state, setup=setup))(params, specs)


@functools.lru_cache(maxsize=None)
def compiled_chunk(setup: TrainSetup, chunk_steps: int):
  """``chunk(state, data, specs)``: :func:`train_chunk` vmapped over runs, jitted. A
  ``jax.jit`` object: ``chunk.lower(...).compile()`` compiles it ahead of time
  (the study compiles its programs concurrently)."""
  return jax.jit(jax.vmap(functools.partial(train_chunk, setup=setup, num_steps=chunk_steps)))


def compiled_sweep_fns(setup: TrainSetup, chunk_steps: int):
  """``(init, chunk)``: ``init(specs) -> (state, data)`` and ``chunk(state, data, specs)``,
  vmapped over runs. Cached per ``(setup, chunk_steps)``, so a sweep compiles each
  once whatever the number of chunks; only the number of runs can trigger a retrace."""
  params_and_data = compiled_params_and_data(setup)

  def init(specs: RunSpec) -> tuple[RunState, RunData]:
    params, data = params_and_data(specs)
    return init_state_batch(params, specs, setup), data

  return init, compiled_chunk(setup, chunk_steps)


def clear_compilation_caches() -> None:
  """Forgets every compiled toy program of this process (benchmarks time cold starts)."""
  _compiled_params_and_data.cache_clear()
  compiled_chunk.cache_clear()
  _compiled_final_evaluate.cache_clear()


# experiments/bench/toy.py clears the compiled programs through this name.
compiled_sweep_fns.cache_clear = clear_compilation_caches

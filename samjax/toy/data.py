"""The toy distribution: a linear (easy) feature and a spiral (hard) feature.

Springer et al. (2024), Section 5.1 and Appendix E. An example is ``x = (x_easy,
x_hard)`` in R^4 with a label ``y in {-1, +1}``; the two 2-D features are drawn
independently given ``y`` and each one alone determines ``y``:

    easy latent   z ~ U[m, 1]                    x_easy = s_e * y * (z, z)
    hard latent   t ~ U[t0, 1]                   x_hard = s_h * y * t * (cos a t, sin a t) + u
                  a = complexity * pi / 180      u ~ U[-delta, delta]^2

The easy feature is two branches of a line through the origin (``y = +1`` the
right branch) separated by a gap ``2 m s_e``. The hard feature is a two-armed
spiral: the ``y = -1`` arm is the ``y = +1`` arm rotated by 180 degrees, and the
*complexity* is the total rotation of an arm in degrees. The paper's constants
were lost in extraction; ours are the defaults of :class:`ToyDataConstants` and
were chosen so that SGD measurably fails to learn the spiral at a complexity of
540-720 degrees (1.5-2 turns), see ``docs/toy.md``. Along a ray from the
origin the two arms alternate every ``s_h * 180 / complexity`` in radius, so
with ``delta = 0.03`` and ``s_h = 1`` the noisy arms stay separable (gap above
the noise box's diagonal ``2 sqrt(2) delta``) up to about 2000 degrees.

The corruptions of Appendix H act on the *training* features only (the probes
measure what the model learned about the clean features):

* feature label noise: each feature is drawn for the label ``y * r`` with ``r``
  Rademacher, ``P(r = -1) = label_noise`` (the example keeps its label ``y``);
* Gaussian noise: ``x_k += gaussian_noise * N(0, I_2)`` after scaling;
* feature dropout: ``x_k *= b``, ``b ~ Bernoulli(1 - dropout)``, the whole 2-D
  feature at once;

each drawn independently for the two features, and applied to the hard feature
alone when ``hard_only`` is set.

Every function is a pure function of its PRNG key and jittable; the complexity
and the corruption levels are array arguments, so data for a whole sweep comes
from one ``vmap``. The latent draws do not depend on the complexity: the same
key gives the same points rotated differently.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ToyDataConstants(NamedTuple):
  """The distribution's fixed constants (static Python floats).

  Attributes:
    easy_scale: ``s_e``, the scale of the linear feature.
    easy_margin: ``m``, the easy latent's distance from the origin; the two
      branches are ``2 m s_e * sqrt(2)`` apart.
    hard_scale: ``s_h``, the scale of the spiral.
    hard_min_radius: ``t0``, where the arms start (they would meet at the origin).
    hard_noise: ``delta``, half-width of the uniform noise added to the spiral.
  """

  easy_scale: float = 1.0
  easy_margin: float = 0.1
  hard_scale: float = 1.0
  hard_min_radius: float = 0.1
  hard_noise: float = 0.03


class Corruption(NamedTuple):
  """Appendix H training-feature corruptions; every field a scalar array, 0 = clean.

  Attributes:
    label_noise: probability that a feature is drawn for the flipped label.
    gaussian_noise: standard deviation of Gaussian noise added to a feature.
    dropout: probability that a feature is replaced by zeros.
    hard_only: 1.0 to corrupt the hard feature alone, 0.0 to corrupt both.
  """

  label_noise: jax.Array
  gaussian_noise: jax.Array
  dropout: jax.Array
  hard_only: jax.Array

  @classmethod
  def clean(cls) -> 'Corruption':
    zero = jnp.zeros((), jnp.float32)
    return cls(zero, zero, zero, zero)


def easy_feature(u: jax.Array, y: jax.Array, consts: ToyDataConstants) -> jax.Array:
  """The linear feature ``s_e * y * (z, z)``, ``z = m + (1 - m) u ~ U[m, 1]``; shape ``[n, 2]``.

  Args:
    u: ``[n]`` uniform draws on ``[0, 1)``, the latent before scaling.
    y: ``[n]`` labels in ``{-1, +1}`` (the branch).
    consts: the distribution's constants.
  """
  z = consts.easy_margin + (1.0 - consts.easy_margin) * u
  return consts.easy_scale * (y * z)[:, None] * jnp.ones((1, 2))


def hard_feature(u: jax.Array, u_noise: jax.Array, y: jax.Array, complexity: jax.Array,
                 consts: ToyDataConstants) -> jax.Array:
  """The spiral feature; ``complexity`` is an arm's total rotation in degrees.

  ``x = s_h * y * t * (cos(a t), sin(a t)) + noise`` with ``t = t0 + (1 - t0) u ~
  U[t0, 1]``, ``a = complexity * pi / 180`` and ``noise = delta (2 u_noise - 1) ~
  U[-delta, delta]^2``: multiplying by ``y = -1`` is the rotation by 180 degrees
  that maps one arm onto the other.

  Args:
    u: ``[n]`` uniform draws on ``[0, 1)``, the position along the arm.
    u_noise: ``[n, 2]`` uniform draws on ``[0, 1)`` for the noise.
    y: ``[n]`` labels in ``{-1, +1}`` (the arm).
    complexity: scalar, may be traced.
    consts: the distribution's constants.
  """
  t = consts.hard_min_radius + (1.0 - consts.hard_min_radius) * u
  angle = jnp.deg2rad(complexity) * t
  arm = t[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
  noise = consts.hard_noise * (2.0 * u_noise - 1.0)
  return consts.hard_scale * y[:, None] * arm + noise


def sample_toy(key: jax.Array, n: int, complexity: jax.Array,
               consts: ToyDataConstants = ToyDataConstants(),
               corruption: Corruption | None = None) -> tuple[jax.Array, jax.Array]:
  """``n`` examples ``(x [n, 4], y [n])``: ``x[:, :2]`` easy, ``x[:, 2:]`` hard.

  All randomness is two draws (one uniform ``[n, 9]``, one normal ``[n, 4]``)
  from which every latent, noise and corruption is a deterministic function;
  few random calls keep the vmapped program small to compile.

  Args:
    key: PRNG key; the same key gives the same latents for every complexity.
    n: number of examples (static).
    complexity: rotation of a spiral arm in degrees (may be traced).
    consts: the distribution's constants.
    corruption: Appendix H corruptions (may be traced); ``None`` for clean data.
      Corruptions are applied whatever their level, so a clean draw and a draw
      with zero corruption are the same draw.
  """
  if corruption is None:
    corruption = Corruption.clean()
  uniform_key, normal_key = jax.random.split(key)
  u = jax.random.uniform(uniform_key, (n, 9))
  gauss = jax.random.normal(normal_key, (n, 4))
  y = jnp.where(u[:, 0] < 0.5, 1.0, -1.0)
  # Per feature: [easy, hard] strengths; the easy one is off when hard_only.
  strength = jnp.stack([1.0 - corruption.hard_only, jnp.ones_like(corruption.hard_only)])
  flip = u[:, 1:3] < corruption.label_noise * strength        # [n, 2]: feature drawn for -y
  keep = u[:, 3:5] >= corruption.dropout * strength           # [n, 2]: feature not dropped
  feature_label = jnp.where(flip, -y[:, None], y[:, None])
  x_easy = easy_feature(u[:, 5], feature_label[:, 0], consts)
  x_hard = hard_feature(u[:, 6], u[:, 7:9], feature_label[:, 1], complexity, consts)
  noise_std = corruption.gaussian_noise * strength
  x_easy = (x_easy + noise_std[0] * gauss[:, :2]) * keep[:, :1]
  x_hard = (x_hard + noise_std[1] * gauss[:, 2:]) * keep[:, 1:]
  return jnp.concatenate([x_easy, x_hard], axis=-1), y

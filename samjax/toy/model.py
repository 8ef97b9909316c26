"""The disentangled toy model of Springer et al. (2024), Eq. 4.

    Phi(x) = (phi_easy(x[:2]), phi_hard(x[2:]))      two 3-layer ReLU MLPs to a scalar
    f(x)   = v_easy * phi_easy(x) + v_hard * phi_hard(x) = v . Phi(x)

The last layer ``v`` is a bias-free ``nn.Dense(1, name='head')`` whose kernel is
``v`` as a ``[2, 1]`` column, so ``samjax.lsam`` perturbs exactly ``v``. It is
initialised to ``head_init * (1, 1)`` (the training code may replace it, see
``samjax.toy.train.initial_head``): both features start with the same,
positive weight, so the ratio ``v_hard / v_easy`` starts at 1 and the sign of
each ``phi_k`` is that of its contribution to ``f`` (a random-sign init would
make ratios of different runs incomparable).

Because each ``phi_k`` sees only its own feature, the probe of feature ``k`` is
a 1-D threshold on ``phi_k`` (Section 5.1), with no probe training needed to
disentangle the representation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


class FeatureMLP(nn.Module):
  """``phi``: Dense(hidden) -> ReLU -> Dense(hidden) -> ReLU -> Dense(1), a scalar feature."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden, name='dense_0')(x))
    x = nn.relu(nn.Dense(self.hidden, name='dense_1')(x))
    return nn.Dense(1, name='dense_2')(x)[..., 0]


class DisentangledModel(nn.Module):
  """``f(x) = v . (phi_easy(x[:2]), phi_hard(x[2:]))``.

  Follows the project's model convention: ``apply(variables, x, train=...,
  return_features=...)`` returns the logit ``f [B]`` or ``(f, Phi [B, 2])``.
  A single logit serves the binary logistic loss ``log(1 + exp(-y f))``.
  """

  hidden: int = 32
  head_init: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    del train  # no dropout or batch statistics
    features = jnp.stack([FeatureMLP(self.hidden, name='phi_easy')(x[..., :2]),
                          FeatureMLP(self.hidden, name='phi_hard')(x[..., 2:])], axis=-1)
    head = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.constant(self.head_init),
                    name='head')
    logits = head(features)[..., 0]
    return (logits, features) if return_features else logits


def head_weights(params: PyTree) -> jax.Array:
  """``v = (v_easy, v_hard)`` from the params tree, shape ``[2]``."""
  return params['head']['kernel'][:, 0]


def with_head_weights(params: PyTree, v: jax.Array) -> PyTree:
  """``params`` with the head replaced by ``v [2]`` (the representation untouched)."""
  return {**params, 'head': {'kernel': v[:, None].astype(params['head']['kernel'].dtype)}}


def logistic_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example ``log(1 + exp(-y f))`` for ``y in {-1, +1}``."""
  return jax.nn.softplus(-y * logits)


def importance_weights(logits: jax.Array, y: jax.Array) -> jax.Array:
  """``lambda_i = sigma(-y_i f(x_i))``: minus the derivative of the loss in ``y f`` (Eq. 6)."""
  return jax.nn.sigmoid(-y * logits)

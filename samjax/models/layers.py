"""Layers and initialisers shared by the models, written to match PyTorch conventions.

The paper's models are PyTorch models, and the ResNet-18 starts from torchvision's ImageNet weights.
To make the JAX models the same functions (and, from scratch, the same distributions), this module
provides:

* :class:`BatchNorm`: batch normalisation with torch's semantics, including the *unbiased* batch
  variance that torch mixes into ``running_var`` (flax's ``nn.BatchNorm`` uses the biased one).
* :func:`torch_default_kernel_init` / :func:`torch_default_bias_init`: the default initialisation
  of ``torch.nn.Conv2d`` and ``torch.nn.Linear`` (uniform in ``±1/sqrt(fan_in)``).
* :func:`torch_padding`: explicit symmetric padding ``p`` as in ``nn.Conv2d(padding=p)``. Flax's
  ``'SAME'`` pads stride-2 convolutions asymmetrically (more at the end), torch pads both sides.
* :func:`parse_dtype`: ``'float32'`` / ``'bfloat16'`` (config strings) to a jnp dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# kaiming_uniform_(a=sqrt(5)) in torch: bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in),
# i.e. variance_scaling with scale 1/3 (uniform bound sqrt(3 * scale / fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

# torchvision's ResNet: kaiming_normal_(mode='fan_out', nonlinearity='relu'), not truncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """Bias init of torch's ``Conv2d`` / ``Linear``: uniform in ``±1/sqrt(fan_in)``."""
  bound = 1.0 / fan_in**0.5 if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def classifier_head(num_classes: int, in_features: int, dtype: Dtype) -> nn.Dense:
  """The classifier of every samjax model: named ``head`` (what ``samjax.lsam`` perturbs),
  initialised like ``torch.nn.Linear``, float32 parameters."""
  return nn.Dense(num_classes, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(in_features), dtype=dtype,
                  param_dtype=jnp.float32, name='head')


def torch_padding(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit 2-D padding equal to torch's ``padding=padding`` (same on both sides)."""
  return ((padding, padding), (padding, padding))


def parse_dtype(dtype: str | Dtype | None) -> Dtype:
  """Maps a config string (``'float32'`` or ``'bfloat16'``) or a jnp dtype to a jnp dtype."""
  if dtype is None:
    return jnp.float32
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(
          f'model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.')
    return _DTYPES[dtype]
  canonical = jnp.dtype(dtype)
  if canonical not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f'model.dtype must be float32 or bfloat16, got {canonical}.')
  return canonical.type


class BatchNorm(nn.Module):
  """Batch normalisation over all axes but the last, with ``torch.nn.BatchNorm2d`` semantics.

  Training (``use_running_average=False``) normalises with the batch mean and the *biased* batch
  variance, and updates the running statistics as torch does::

      mean_run <- momentum * mean_run + (1 - momentum) * mean_batch
      var_run  <- momentum * var_run  + (1 - momentum) * var_batch * n / (n - 1)

  with ``n`` the number of values per channel (batch x height x width). The ``n / (n - 1)``
  (unbiased variance) is what separates this from ``flax.linen.BatchNorm``; it keeps a converted
  torchvision model and its fine-tuning statistics identical to torch's. ``momentum=0.9`` here is
  torch's ``momentum=0.1``. Evaluation normalises with the running statistics.

  Statistics are computed in float32 whatever the compute ``dtype``. Under ``jax.jit`` with a
  batch sharded over devices the statistics are global (XLA inserts the reductions). Inside
  ``shard_map``/``pmap`` they are each device's own (as in per-device SAM); averaging the
  updated running statistics across devices is then the caller's job.

  Variables use flax's names: params ``scale``, ``bias``; ``batch_stats`` ``mean``, ``var``.
  """

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_features = x.shape[-1]
    reduction_axes = tuple(range(x.ndim - 1))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (num_features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (num_features,), jnp.float32)
    scale = self.param('scale', self.scale_init, (num_features,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (num_features,), self.param_dtype)

    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      mean = jnp.mean(x32, axis=reduction_axes)
      # Two-pass variance: stable when |mean| >> std, unlike E[x^2] - E[x]^2.
      var = jnp.mean(jnp.square(x32 - mean), axis=reduction_axes)
      if not self.is_initializing():
        count = x.size // num_features
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * unbiased_var

    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = (x32 - mean) * multiplier + bias.astype(jnp.float32)
    return y.astype(self.dtype if self.dtype is not None else x.dtype)

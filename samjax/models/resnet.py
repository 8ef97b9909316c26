"""ResNet-18 (He et al., 2016) in torchvision's layout, for CelebA and Waterbirds.

The module tree mirrors ``torchvision.models.resnet18`` so that ImageNet weights convert one to one
(:mod:`samjax.models.convert`)::

    torchvision                      flax (this module)
    conv1, bn1                       conv1, bn1
    layer{i}.{j}.conv1 / bn1 / ...   layer{i}_{j}/conv1 / bn1 / conv2 / bn2
    layer{i}.{j}.downsample.0 / .1   layer{i}_{j}/downsample_conv / downsample_bn
    fc                               head

Padding is torch's (explicit and symmetric; ``'SAME'`` would pad stride-2 layers differently),
max pooling pads with -inf as torch does, and BatchNorm follows torch (epsilon 1e-5, momentum 0.1,
unbiased running variance; see :class:`samjax.models.layers.BatchNorm`). Initialisation from
scratch follows torchvision (Kaiming-normal fan-out convolutions, unit BN scale, torch's default
``Linear`` init for the head).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.models.layers import (
    BatchNorm,
    Dtype,
    classifier_head,
    kaiming_normal_fan_out,
    torch_padding,
)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (torchvision's ``BasicBlock``).

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the 1x1 projection, if any).
    dtype: compute dtype.
  """

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(
        nn.Conv, use_bias=False, kernel_init=kaiming_normal_fan_out, dtype=self.dtype,
        param_dtype=jnp.float32)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)

    residual = x
    y = conv(self.features, (3, 3), (self.strides, self.strides), padding=torch_padding(1),
             name='conv1')(x)
    y = norm(name='bn1')(y)
    y = nn.relu(y)
    y = conv(self.features, (3, 3), padding=torch_padding(1), name='conv2')(y)
    y = norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, (1, 1), (self.strides, self.strides), padding='VALID',
                      name='downsample_conv')(x)
      residual = norm(name='downsample_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet with basic blocks and the ImageNet stem (7x7/2 conv, 3x3/2 max pool).

  Attributes:
    num_classes: number of logits (the head, ``nn.Dense(num_classes, name='head')``).
    stage_sizes: blocks per stage; ``(2, 2, 2, 2)`` is ResNet-18.
    width: channels of the stem and the first stage (doubling per stage); 64 for torchvision's.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision). Parameters and BatchNorm
      statistics stay float32; the returned logits and features are float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Applies the network to float32 NHWC images.

    Args:
      x: images ``[B, H, W, 3]``, normalised.
      train: batch statistics (and, with ``mutable=['batch_stats']``, their running-average
        update) when True; running statistics when False.
      return_features: also return the globally average-pooled representation ``[B, 8 * width]``.

    Returns:
      logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    x = x.astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=torch_padding(3), use_bias=False,
                kernel_init=kaiming_normal_fan_out, dtype=self.dtype, param_dtype=jnp.float32,
                name='conv1')(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn1')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=torch_padding(1))  # Pads with -inf.
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides=strides, dtype=self.dtype,
                       name=f'layer{stage + 1}_{block}')(x, train=train)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten.
    logits = classifier_head(self.num_classes, features.shape[-1], self.dtype)(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features
    return logits


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
"""ResNet-18: ``ResNet18(num_classes=..., width=64, dtype=...)``."""

"""The paper's small convolutional network for CIFAR-MNIST and FMNIST-MNIST (Appendix B).

In pseudo-PyTorch::

    nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * H/8 * W/8, num_classes))

The flax module is the same function: explicit symmetric padding (not ``'SAME'``), torch's
default initialisation, and the flatten taken in torch's (channel, height, width) order, so that
the features (and the head's weight matrix, transposed) line up element for element with a torch
model's. The input channel count is inferred from the images.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.models.layers import (
    Dtype,
    classifier_head,
    torch_default_bias_init,
    torch_default_kernel_init,
    torch_padding,
)


class ConvNet(nn.Module):
  """Three stride-2 conv + ReLU layers, flatten, linear head.

  Attributes:
    num_classes: number of logits.
    width: channels of the first conv; the others have ``2 * width`` and ``4 * width``
      (the paper: 32, 64, 128).
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32 and the
      returned logits and features are float32.
  """

  num_classes: int
  width: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Applies the network to float32 NHWC images.

    Args:
      x: images ``[B, H, W, C]``.
      train: unused (the network has no BatchNorm or dropout); accepted for the common interface.
      return_features: also return the flattened penultimate representation.

    Returns:
      logits ``[B, num_classes]``, or ``(logits, features)`` with features ``[B, D]``,
      ``D = 4 * width * ceil(H/8) * ceil(W/8)`` for even sizes.
    """
    del train  # No train/eval-dependent layers.
    layer_specs = (  # (out channels, kernel size, stride, padding)
        (self.width, 5, 2, 2),
        (2 * self.width, 3, 2, 1),
        (4 * self.width, 3, 2, 1),
    )
    x = x.astype(self.dtype)
    for index, (features, kernel, stride, padding) in enumerate(layer_specs, start=1):
      fan_in = x.shape[-1] * kernel * kernel
      x = nn.Conv(
          features,
          (kernel, kernel),
          strides=(stride, stride),
          padding=torch_padding(padding),
          kernel_init=torch_default_kernel_init,
          bias_init=torch_default_bias_init(fan_in),
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f'conv{index}',
      )(x)
      x = nn.relu(x)
    # torch flattens NCHW: (channel, height, width) order.
    features = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    logits = classifier_head(self.num_classes, features.shape[-1], self.dtype)(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits

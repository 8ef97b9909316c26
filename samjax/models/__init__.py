"""Flax models for the paper's real-data experiments, and the torchvision ResNet-18 converter.

Every model is called as ``model.apply(variables, x, train=bool, return_features=bool)`` on
float32 NHWC images and returns logits ``[B, num_classes]`` (float32), or ``(logits, features)``
with the penultimate representation ``[B, D]``. The classifier is ``nn.Dense(num_classes,
name='head')`` so that :func:`samjax.lsam` / :func:`samjax.head_mask` find it. Models with
BatchNorm keep its running statistics in the ``batch_stats`` collection: pass
``mutable=['batch_stats']`` with ``train=True``.

:func:`create_model` takes a mapping (training passes ``config.model`` with ``dtype`` set from
``config.compute_dtype``)::

    name:  'convnet' | 'resnet18'
    dtype: 'float32' (default) | 'bfloat16'   compute dtype; parameters are always float32
    width: channels of the first layer (convnet: 32, resnet18: 64 by default)

``width`` is an argument of :func:`create_model` for code that builds models itself (the grid
trainer, the benchmark); it is not a training config field: the schema (``samjax.config``)
refuses ``config.model.width``, so training always uses the default widths.

Pretrained ResNet-18 weights: ``load_pretrained(path, variables)`` (torchvision state dict as a
torch file or ``.npz``; see :mod:`samjax.models.convert`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.models.convert import (
    load_pretrained,
    load_state_dict,
    save_npz_from_state_dict,
    state_dict_to_variables,
)
from samjax.models.convnet import ConvNet
from samjax.models.layers import BatchNorm, parse_dtype
from samjax.models.resnet import BasicBlock, ResNet, ResNet18

MODEL_NAMES = ('convnet', 'resnet18')


def create_model(model_config: Mapping[str, Any], num_classes: int) -> nn.Module:
  """Builds the model named by ``model_config.name``.

  Args:
    model_config: an ``ml_collections.ConfigDict`` or dict with ``name`` (one of
      :data:`MODEL_NAMES`) and optionally ``dtype`` (``'float32'`` or ``'bfloat16'``) and
      ``width``. Other keys (e.g. ``init_checkpoint``, read by the trainer) are ignored here.
    num_classes: size of the classifier head.

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: unknown ``model.name`` or ``model.dtype``.
  """
  name = model_config.get('name')
  dtype = parse_dtype(model_config.get('dtype', 'float32'))
  width = model_config.get('width', None)
  if name == 'convnet':
    return ConvNet(num_classes=num_classes, width=width or 32, dtype=dtype)
  if name == 'resnet18':
    return ResNet18(num_classes=num_classes, width=width or 64, dtype=dtype)
  raise ValueError(f'Unknown model.name {name!r}; expected one of {list(MODEL_NAMES)}.')


def init_variables(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """Initialises ``model`` on zeros of ``input_shape`` (NHWC) in eval mode.

  Returns:
    The variables dict: ``{'params': ...}`` plus ``{'batch_stats': ...}`` for models with
    BatchNorm.
  """
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  return dict(init(rng, jnp.zeros(tuple(input_shape), jnp.float32)))


__all__ = [
    'MODEL_NAMES',
    'BasicBlock',
    'BatchNorm',
    'ConvNet',
    'ResNet',
    'ResNet18',
    'create_model',
    'init_variables',
    'load_pretrained',
    'load_state_dict',
    'save_npz_from_state_dict',
    'state_dict_to_variables',
]

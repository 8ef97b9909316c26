"""torchvision ResNet-18 weights to flax variables for :class:`samjax.models.resnet.ResNet`.

Pretrained weights cannot be downloaded here; they come from a local file holding a torchvision
``resnet18`` ``state_dict``, either

* a ``torch.save``'d state dict (``.pt``/``.pth``/...): read with PyTorch, imported lazily
  because torch is not a dependency of samjax; or
* an ``.npz`` with the same arrays under the same keys (``conv1.weight``, ``bn1.running_mean``,
  ..., ``fc.bias``): read with numpy alone. :func:`save_npz_from_state_dict` writes one from a
  torch file, once, wherever torch is installed.

Key and layout mapping (torch -> flax)::

    conv1.weight [O, I, kh, kw]                    -> params/conv1/kernel [kh, kw, I, O]
    bn1.weight / bn1.bias                          -> params/bn1/scale / bias
    bn1.running_mean / running_var                 -> batch_stats/bn1/mean / var
    layer{i}.{j}.conv1.weight                      -> params/layer{i}_{j}/conv1/kernel
    layer{i}.{j}.downsample.0.weight               -> params/layer{i}_{j}/downsample_conv/kernel
    layer{i}.{j}.downsample.1.*                    -> .../layer{i}_{j}/downsample_bn/*
    fc.weight [C, D] / fc.bias [C]                 -> params/head/kernel [D, C] / bias [C]

``*.num_batches_tracked`` is ignored (the flax BatchNorm uses a fixed momentum). A state dict
that does not fit the model (missing or unexpected keys, wrong shapes) raises one ``ValueError``
listing every offending key.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from flax.core import unfreeze

from samjax.io_utils import atomic_write
from samjax.models.resnet import ResNet18

_COLLECTIONS = ('params', 'batch_stats')
_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
_MODULE_TO_TORCH = {
    'head': 'fc', 'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_IGNORED_SUFFIX = '.num_batches_tracked'
_HEAD_KEYS = ('fc.weight', 'fc.bias')

StateDict = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------- reading files


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ResNet state dict as ``{torch key: numpy array}`` from ``.npz`` or a torch file.

  A torch file may hold the state dict itself or a checkpoint dict with it under
  ``'state_dict'``; a ``module.`` prefix (``DataParallel``) is removed.

  Raises:
    ImportError: a torch file and no PyTorch installed (the message says what to do).
    ValueError: the file does not hold a mapping of arrays.
  """
  path = os.fspath(path)
  if path.endswith('.npz'):
    # Read whole through epath (a local path or gs://...): np.load needs a seekable file.
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as npz:
      state_dict = {key: npz[key] for key in npz.files}
  else:
    state_dict = _load_torch_state_dict(path)
  if state_dict and all(key.startswith('module.') for key in state_dict):
    state_dict = {key[len('module.'):]: value for key, value in state_dict.items()}
  return state_dict


def save_npz_from_state_dict(state_dict_path: str | os.PathLike,
                             npz_path: str | os.PathLike) -> str:
  """Converts a torch-saved state dict to an ``.npz`` with the same keys (needs PyTorch).

  Returns:
    The path written (numpy appends ``.npz`` when ``npz_path`` lacks it).
  """
  state_dict = _load_torch_state_dict(os.fspath(state_dict_path))
  npz_path = os.fspath(npz_path)
  if not npz_path.endswith('.npz'):
    npz_path += '.npz'
  atomic_write(npz_path, lambda f: np.savez(f, **state_dict), binary=True)  # local or gs://
  return npz_path


def _load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        f'Reading {path!r} needs PyTorch, which samjax does not depend on: `pip install torch` '
        '(or `pip install samjax[test]`), or convert the file once where torch is installed with '
        'samjax.models.save_npz_from_state_dict(path, "weights.npz") and load the .npz instead.'
    ) from error
  loaded = torch.load(io.BytesIO(epath.Path(path).read_bytes()), map_location='cpu',
                      weights_only=True)  # through epath: a local path or gs://...
  if isinstance(loaded, Mapping) and isinstance(loaded.get('state_dict'), Mapping):
    loaded = loaded['state_dict']
  if not isinstance(loaded, Mapping):
    raise ValueError(f'{path!r} holds a {type(loaded).__name__}, not a state dict (a mapping '
                     'from parameter names to tensors).')
  not_tensors = sorted(key for key, value in loaded.items() if not torch.is_tensor(value))
  if not_tensors:
    raise ValueError(f'{path!r}: these entries are not tensors: {not_tensors}.')
  state_dict = {}
  for key, tensor in loaded.items():
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
      tensor = tensor.float()  # numpy has no bfloat16.
    state_dict[key] = tensor.numpy()
  return state_dict


# ----------------------------------------------------------------------------- conversion


def _torch_key(path: tuple[str, ...]) -> str:
  """Flax variable path to torch key.

  E.g. ``('params', 'layer2_0', 'downsample_conv', 'kernel')`` -> ``layer2.0.downsample.0.weight``.
  """
  collection, *modules, leaf = path
  if (collection, leaf) not in _LEAF_TO_TORCH:
    raise ValueError(
        f'Variable {"/".join(path)} has no torchvision counterpart: the variables are not those '
        'of samjax.models.ResNet18.')
  names = []
  for module in modules:
    block = re.fullmatch(r'layer(\d+)_(\d+)', module)
    names.append(f'layer{block[1]}.{block[2]}' if block else _MODULE_TO_TORCH.get(module, module))
  return '.'.join(names + [_LEAF_TO_TORCH[(collection, leaf)]])


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  """torch layout to flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return array.T
  return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape whose :func:`_to_flax_layout` has ``flax_shape``."""
  if len(flax_shape) == 4:
    kh, kw, fan_in, fan_out = flax_shape
    return (fan_out, fan_in, kh, kw)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _resnet18_shapes(state_dict: StateDict) -> dict[str, Any]:
  """Shape-only ResNet-18 variables whose head has as many classes as ``fc.bias``."""
  fc_bias = state_dict.get('fc.bias')
  num_classes = int(fc_bias.shape[0]) if fc_bias is not None and fc_bias.ndim == 1 else 1000
  model = ResNet18(num_classes=num_classes)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False))


def state_dict_to_variables(state_dict: StateDict,
                            variables: Mapping[str, Any] | None = None,
                            *,
                            skip_head_if_shape_mismatch: bool = True) -> dict[str, Any]:
  """Converts a torchvision ResNet-18 state dict to flax variables.

  Args:
    state_dict: ``{torch key: array}`` (numpy arrays, or anything ``np.asarray`` accepts).
    variables: initialised variables of the target :class:`~samjax.models.resnet.ResNet` (from
      ``init_variables``): they fix the expected keys and shapes, and provide the head when the
      class counts differ. ``None``: a ResNet-18 with as many classes as ``fc.bias``, every array
      taken from the state dict.
    skip_head_if_shape_mismatch: when ``fc`` has another number of classes than the model's head
      (same feature dimension), keep the initialised head and log it (the usual fine-tuning
      case). False: that mismatch is an error.

  Returns:
    A new variables dict; every converted array replaces the initialised one (cast to its dtype),
    other collections in ``variables`` are passed through.

  Raises:
    ValueError: missing keys, unexpected keys or wrong shapes, all listed in one message.
  """
  state_dict = {key: np.asarray(value) for key, value in state_dict.items()}
  template = _resnet18_shapes(state_dict) if variables is None else unfreeze(variables)
  absent = [name for name in _COLLECTIONS if name not in template]
  if absent:
    raise ValueError(f'variables lack the collection(s) {absent}; pass the full variables of a '
                     'ResNet (init_variables(model, rng, shape)), not only its params.')
  flat_template = traverse_util.flatten_dict({name: template[name] for name in _COLLECTIONS})
  expected = {_torch_key(path): path for path in flat_template}

  provided = {key for key in state_dict if not key.endswith(_IGNORED_SUFFIX)}
  missing = sorted(set(expected) - provided)
  unexpected = sorted(provided - set(expected))
  wrong_shapes, head_mismatch = [], []
  for key in sorted(provided & set(expected)):
    want = _torch_shape(tuple(flat_template[expected[key]].shape))
    got = tuple(state_dict[key].shape)
    if got == want:
      continue
    same_feature_dim = key == 'fc.bias' or (len(got) == 2 and got[1:] == want[1:])
    if key in _HEAD_KEYS and same_feature_dim and skip_head_if_shape_mismatch:
      head_mismatch.append((key, got, want))
    else:
      wrong_shapes.append(f'{key}: got {got}, expected {want}')
  if head_mismatch and len(head_mismatch) != len(_HEAD_KEYS):
    # Only one of fc.weight / fc.bias disagrees: a broken file, not another class count.
    wrong_shapes += [f'{key}: got {got}, expected {want}' for key, got, want in head_mismatch]
    head_mismatch = []
  if missing or unexpected or wrong_shapes:
    problems = []
    if missing:
      problems.append(f'missing keys: {missing}')
    if unexpected:
      problems.append(f'unexpected keys: {unexpected}')
    if wrong_shapes:
      problems.append(f'wrong shapes (torch layout): {wrong_shapes}')
    raise ValueError('The state dict does not fit the flax ResNet-18:\n  ' + '\n  '.join(problems))

  keep_head = bool(head_mismatch)
  if keep_head:
    classes_in_file = state_dict['fc.bias'].shape[0] if 'fc.bias' in state_dict else '?'
    classes_in_model = flat_template[expected['fc.bias']].shape[0]
    logging.info(
        'Pretrained fc has %s classes, the model head has %s: keeping the initialised head '
        '(fine-tuning); every other array comes from the state dict.', classes_in_file,
        classes_in_model)

  converted = {}
  for key, path in expected.items():
    leaf = flat_template[path]
    if keep_head and key in _HEAD_KEYS:
      converted[path] = leaf
    else:
      converted[path] = jnp.asarray(_to_flax_layout(state_dict[key]), dtype=leaf.dtype)
  result = {name: value for name, value in template.items() if name not in _COLLECTIONS}
  result.update(traverse_util.unflatten_dict(converted))
  return result


def load_pretrained(path: str | os.PathLike,
                    variables: Mapping[str, Any],
                    *,
                    skip_head_if_shape_mismatch: bool = True) -> dict[str, Any]:
  """Loads a torchvision ResNet-18 state dict from ``path`` (``.npz`` or torch) into ``variables``.

  ``variables`` are the initialised ``{'params', 'batch_stats'}`` of the flax ResNet-18; the
  returned dict has every array of the file in their place, and the initialised head when the
  class count differs (see :func:`state_dict_to_variables`).

  Raises:
    ValueError: the file does not fit ResNet-18 (offending keys and shapes listed).
    ImportError: a torch file without PyTorch installed.
  """
  state_dict = load_state_dict(path)
  new_variables = state_dict_to_variables(
      state_dict, variables, skip_head_if_shape_mismatch=skip_head_if_shape_mismatch)
  logging.info('Loaded pretrained ResNet weights from %s.', os.fspath(path))
  return new_variables

"""Small array and pytree helpers shared by the transforms, the diagnostics and the application.

Each exists once here: whether a value can be read on the host (:func:`is_concrete`), whether a
tree holds only finite numbers (:func:`all_finite`), a tree's (masked) global L2 norm
(:func:`global_norm`), and a replicated global array as numpy (:func:`to_host`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_concrete(x: Any) -> bool:
  """True when ``x``'s values can be read on this host: not a tracer, and every shard local."""
  if isinstance(x, jax.core.Tracer):
    return False
  return bool(getattr(x, 'is_fully_addressable', True))


def to_host(x: Any) -> np.ndarray:
  """A replicated global array as numpy, also when other processes hold some of its devices."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def all_finite(tree: PyTree) -> bool:
  """No NaN or inf in any floating leaf of ``tree`` (concrete values; integer leaves pass)."""
  for leaf in jax.tree.leaves(tree):
    value = to_host(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
      return False
  return True


def global_norm(tree: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
  """``sqrt(sum of squares)`` over the leaves of ``tree`` in float32 (0 for an empty tree).

  ``mask``: a tree of the same structure of Python bools (a False leaf is left out of the
  program entirely) or boolean scalars (traced: the leaf counts where True).
  """
  leaves = jax.tree.leaves(tree)
  masks = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  total = jnp.zeros((), jnp.float32)
  for leaf, keep in zip(leaves, masks):
    if isinstance(keep, (bool, np.bool_)):
      if keep:
        total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    else:
      total = total + jnp.where(keep, jnp.sum(jnp.square(leaf.astype(jnp.float32))), 0.0)
  return jnp.sqrt(total)

"""samjax: Sharpness-Aware Minimization for JAX, and the study of how it balances features.

``import samjax`` needs only JAX, flax and optax: the SAM family (:mod:`samjax.transforms`) and
the gradients a SAM step needs in a user's own step (:mod:`samjax.gradients`). Real-data training
(``samjax.train``, TFDS, TensorFlow, orbax) comes with the ``train`` extra.
"""

from samjax.gradients import accumulated_grad, per_device_grad
from samjax.transforms import (SamState, cosine_similarity, head_mask, lsam, phantom_params,
                               resolve_mask, sam)

__version__ = '0.1.0'

__all__ = ['SamState', 'accumulated_grad', 'cosine_similarity', 'head_mask', 'lsam',
           'per_device_grad', 'phantom_params', 'resolve_mask', 'sam']

"""samjax: Sharpness-Aware Minimization for JAX, and the study of how it balances features."""

from samjax.sam import SamState, cosine_similarity, head_mask, lsam, phantom_params, sam

__version__ = '0.1.0'

__all__ = ['SamState', 'cosine_similarity', 'head_mask', 'lsam', 'phantom_params', 'sam']

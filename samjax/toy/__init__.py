"""The toy study of Springer et al. (2024): easy linear + hard spiral feature, SGD vs LSAM.

``samjax.toy.study.run(config, workdir)`` runs a whole study (see ``configs/toy.py``).
"""

from samjax.toy.study import run

__all__ = ['run']

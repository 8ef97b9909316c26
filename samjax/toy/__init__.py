"""The toy study of Springer et al. (2024): easy linear + hard spiral feature, SGD vs LSAM.

``samjax.toy.run(config, workdir)`` runs a whole study (see ``configs/toy.py``).
"""


def run(config, workdir: str) -> dict:
  """:func:`samjax.toy.study.run`. Imported on call: the schema (``samjax.config``) reads the
  toy's method names from :mod:`samjax.toy.train`, and the study imports the schema."""
  from samjax.toy import study  # pylint: disable=g-import-not-at-top
  return study.run(config, workdir)


__all__ = ['run']

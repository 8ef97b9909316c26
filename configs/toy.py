"""The toy study of Springer et al. (2024), Sections 5-6 and Appendix H.

    python -m samjax.main --config=configs/toy.py --workdir=/tmp/toy             # Figs. 1-6
    python -m samjax.main --config=configs/toy.py:noise --workdir=/tmp/noise     # Fig. 9
    python -m samjax.main --config=configs/toy.py:batch_size --workdir=/tmp/bs   # Fig. 10
    python -m samjax.main --config=configs/toy.py:sensitivity --workdir=/tmp/sens  # where claims hold

Every run of a sweep is one element of a vmapped, scanned computation (see
``samjax/toy/study.py``); the product seeds x rhos x complexities (x ratios,
x noise settings) is the sweep. The constants of the data and the training
(whose values the paper lost) are documented in ``docs/toy.md``; the fields,
their defaults (the main study) and ranges are declared in ``samjax/config.py``
(``docs/CONFIG.md``).
"""

import ml_collections

from samjax.config import base_toy_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None / 'main' (Figs. 1-6), 'noise' (App. H.1), 'batch_size' (App. H.2)
  or 'sensitivity' (where in the space of the lost constants each claim holds).

  Every field, its default (the main study) and its meaning: docs/CONFIG.md's toy section.
  """
  config = base_toy_config()
  if arg in (None, '', 'main'):
    return config
  # The other studies: one head, absolute radii, the old grid.
  config.heads = ()
  config.rho_unit = 'absolute'
  config.noflip_rhos = ()
  config.seeds = (0, 1, 2)
  config.complexities = (180.0, 360.0, 540.0, 720.0)
  if arg == 'noise':
    config.name = 'noise'
    config.methods = ('sgd', 'lsam')
    config.rhos = (1.0, 2.0, 2.5)
    config.complexities = (360.0,)
    config.figure_complexity = 360.0
    config.noise.label_noise = (0.025, 0.05, 0.1)
    config.noise.gaussian_noise = (0.1, 0.25, 0.5, 1.0)
    config.noise.dropout = (0.1, 0.2, 0.4)
    return config
  if arg == 'batch_size':
    config.name = 'batch_size'
    config.methods = ('sgd', 'lsam')
    config.rhos = (0.5, 1.0, 1.5, 2.0, 2.5)
    config.complexities = (360.0,)
    config.figure_complexity = 360.0
    config.batch_sizes = (2, 5, 20, 50)
    return config
  if arg == 'sensitivity':
    config.name = 'sensitivity'
    config.methods = ('sgd', 'lsam', 'lsam_noflip')
    config.rhos = (0.5, 1.0, 2.0, 2.5)
    config.complexities = (360.0, 540.0, 720.0)
    config.num_steps = 6000             # claims judged after 1000, 3000 and 6000 steps
    config.eval_every = 500
    config.sensitivity_steps = (1000, 3000, 6000)
    config.num_probe = 1000
    config.sensitivity = ml_collections.ConfigDict(dict(
        easy_scale=(0.5, 2.0), easy_margin=(0.02, 0.3), hard_scale=(0.5, 2.0),
        hard_noise=(0.0, 0.1), head_init=(0.5, 3.0), head_random=(True,),
        learning_rate=(0.02, 0.1)))
    return config
  raise ValueError(f"config: unknown argument {arg!r}; use 'main', 'noise', 'batch_size' or "
                   "'sensitivity'.")

"""The toy study of Springer et al. (2024), Sections 5-6 and Appendix H.

    python -m samjax.main --config=configs/toy.py --workdir=/tmp/toy             # Figs. 1-6
    python -m samjax.main --config=configs/toy.py:noise --workdir=/tmp/noise     # Fig. 9
    python -m samjax.main --config=configs/toy.py:batch_size --workdir=/tmp/bs   # Fig. 10
    python -m samjax.main --config=configs/toy.py:sensitivity --workdir=/tmp/sens  # where claims hold

Every run of a sweep is one element of a vmapped, scanned computation (see
``samjax/toy/study.py``); the product seeds x rhos x complexities (x ratios,
x noise settings) is the sweep. The constants of the data and the training
(whose values the paper lost) are documented in ``docs/toy.md``.
"""

import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None / 'main' (Figs. 1-6), 'noise' (App. H.1), 'batch_size' (App. H.2)
  or 'sensitivity' (where in the space of the lost constants each claim holds)."""
  config = ml_collections.ConfigDict()
  config.job = 'toy'
  config.name = 'main'

  # Sweep. Runs with the same seed share training set, init and batch order.
  config.seed = 0                     # base key: a run's key is fold_in(key(seed), run seed)
  config.seeds = tuple(range(10))    # >= 10: the paired t intervals of report.json
  config.methods = ('sgd', 'lsam', 'lsam_noflip', 'iw_only', 'lr_only', 'iw_lr')
  # Heads: 'constant' v_0 = head_init (1, 1); 'random' signed uniform +-head_init/sqrt(2)
  # (PyTorch's nn.Linear). () = the single head of head_random (the other studies).
  config.heads = ('constant', 'random')
  # LSAM radii; SGD is rho = 0. rho_unit 'initial_head': in units of the run's ||v_0||, so
  # the regime (does v~ flip a feature's sign?) is the same for every head. Below ~0.5 no
  # step of any seed flips with the constant head (flip-free; a signed random head, whose
  # coordinates can start near 0, flips at smaller radii); 1-1.8 is the flip regime. The regime
  # of each radius is measured per head and complexity (report.json's 'regimes').
  config.rho_unit = 'initial_head'
  config.rhos = (0.02, 0.05, 0.1, 0.2, 0.45, 1.0, 1.4, 1.8)
  config.noflip_rhos = (1.4, 1.8)               # LSAM-noflip where LSAM flips; () = all rhos
  config.sam_rhos = (0.1, 0.25, 0.5)            # full SAM's training collapses at 0.75 here
  config.complexities = (360.0, 540.0, 720.0)   # spiral rotation, degrees (SGD fails here)
  config.fixed_ratios = (2.0, 8.0, 32.0)        # c = v^_hard / v^_easy
  config.intervention_complexities = (360.0,)   # () = all complexities

  # Training (Appendix B: constant lr, batch 5, 300 points, no momentum or weight decay).
  config.num_train = 300
  config.batch_size = 5
  config.batch_sizes = ()             # non-empty: sweep these (SGD, LSAM) instead of batch_size
  config.learning_rate = 0.05
  config.num_steps = 3000             # 50 epochs of 60 steps
  config.eval_every = 200             # steps per scan chunk: probes, snapshots, progress
  config.hidden = 32                  # width of each 3-layer feature MLP
  config.head_init = 1.0              # v_easy = v_hard at init (scale of v)
  config.head_random = False          # True: v = head_init |z|, z ~ N(0, I_2) per seed
  # Interventions' v^: 'initial' = fixed for the run at the initial head's length
  # (Appendix C fixes v^), 'tracking' = ||v^|| = ||v|| at every step.
  config.intervention_norm = 'initial'
  config.num_probe = 2000             # fresh points for probe-train, -validation and -test
  config.curve_probe = 250            # of probe-train and -test for the per-chunk curves

  # Data constants (Appendix E; the paper's values are lost, these are ours).
  config.data = ml_collections.ConfigDict()
  config.data.easy_scale = 1.0
  config.data.easy_margin = 0.1
  config.data.hard_scale = 1.0
  config.data.hard_min_radius = 0.1
  config.data.hard_noise = 0.03

  # Appendix H corruptions of the training features. Besides the clean data,
  # every non-zero level of each kind is run alone, for each hard_only value.
  config.noise = ml_collections.ConfigDict()
  config.noise.label_noise = ()
  config.noise.gaussian_noise = ()
  config.noise.dropout = ()
  config.noise.hard_only = (False, True)

  # Figures: Figs. 1, 3 and 5 show this complexity and the first seed; None:
  # the complexity (and fitting radius) where LSAM's gain over SGD is largest.
  config.figure_complexity = None

  # Sensitivity study (configs/toy.py:sensitivity): knob -> values, each run
  # with every other knob at its default (one factor at a time); knobs are
  # data.<constant>, learning_rate, head_init, head_random. Claims are judged
  # after each of sensitivity_steps steps (read off the probe curves).
  config.sensitivity = ml_collections.ConfigDict()
  config.sensitivity_steps = ()

  # Persistent XLA compilation cache ('' = off): a second run of a study loads
  # its compiled programs instead of compiling them (docs/toy.md). Under
  # $XDG_CACHE_HOME when set (else ~/.cache), so that a fresh XDG_CACHE_HOME
  # really starts cold: a fixed ~/.cache path made such "cold" runs warm.
  config.compilation_cache_dir = os.path.join(
      os.environ.get('XDG_CACHE_HOME') or '~/.cache', 'samjax', 'jax')

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

"""The embedded real-data study (issue 22): SGD vs SAM (and LSAM) on ``digits_textures``.

    python -m experiments.table1 --embedded --out=/tmp/embedded                  # CPU budget
    python -m experiments.table1 --embedded --budget=paper --out=/tmp/paper      # accelerator

This file is the study's pre-registration: the primary endpoint, the grids, the budgets, the
number of seeds and the rule that decides whether the study counts as a test were written here
before the CPU-budget study ran (docs/real_data.md says how each was chosen). The analysis
(``experiments/embedded.py``) reads them from here.
"""

import ml_collections

# The paper's stacked-data grid (PAPER.md): lr {0.01, 0.05, 0.1} x rho {.01, .03, .05, .07, .1, .2}.
PAPER_LEARNING_RATES = (0.01, 0.05, 0.1)
PAPER_RHOS = (0.01, 0.03, 0.05, 0.07, 0.1, 0.2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: the budget, 'cpu' (default), 'paper' or 'tiny' (a smoke run for tests)."""
  budget = arg or 'cpu'
  config = ml_collections.ConfigDict()
  config.dataset = 'digits_textures'
  config.budget = budget

  # Primary endpoint, fixed before the study runs. Per seed: the hard-probe error of `method`
  # averaged over the rho grid at `learning_rate`, minus SGD's at the same learning rate and seed
  # (same initial parameters and example order). Claim: the difference is below 0 ('less').
  config.primary = ml_collections.ConfigDict(dict(
      metric='hard_probe_error', method='sam', baseline='sgd', learning_rate=0.05,
      rho='mean over the rho grid', direction='less'))
  # The paper's effect sizes a "no gain larger than X" verdict is held against: the SAM - SGD
  # probe-accuracy gains of its Table 2 (DomainBed; Table 1's numbers are lost) have median
  # 0.0135 and range 0.003-0.029.
  config.paper_effect = 0.0135
  config.paper_effect_name = 'median SAM gain in probe accuracy of the paper\'s Table 2 (DomainBed)'

  # Counts as a test only if SGD's hard probe beats the untrained net's (paired by seed, 95 %
  # interval below 0) and the three hand-made statistics do not solve the hard feature (their
  # probe errs on more than this share of probe_test).
  config.hand_made_solved_below = 0.10

  # Recipe shared by every budget (the paper's: batch 100, momentum 0.9, cosine, no weight decay).
  config.batch_size = 100
  config.momentum = 0.9
  if budget == 'paper':
    # The paper's conv net (width 32) for 2,000 steps (100 epochs of the 2,000-example train
    # split; the paper trains CIFAR-MNIST for 20 epochs of 50,000 examples, 10,000 steps).
    config.width = 32
    config.num_steps = 2000
    config.learning_rates = PAPER_LEARNING_RATES
    config.rhos = PAPER_RHOS
    config.methods = ('sgd', 'sam', 'lsam')
    config.num_seeds = 8
  elif budget == 'cpu':
    # SGD fits the easy digit in ~32 steps here (10-step mean batch loss < 0.1, pilot of 4 seeds
    # at width 16). In the toy, SGD fits the easy feature by step ~200 and LSAM's hard feature is
    # learned within ~2,000 steps: ~10x the fit time. 300 steps give ~270 steps after the fit,
    # ~9x the fit time, the same ratio. Width 16 is the widest whose grid fits 40 min on the
    # 2-core machine: a SAM run of 300 steps took 9 s at width 16 and 41 s at width 32 (same load).
    config.width = 16
    config.num_steps = 300
    config.learning_rates = (0.05,)
    config.rhos = (0.02, 0.05, 0.1)
    config.methods = ('sgd', 'sam')
    # Pilot (4 seeds, rho 0.05 and 0.1, this recipe): sd of the primary difference 0.0080, upper
    # 95 % confidence bound 0.023; samjax.stats.seeds_for_half_width(0.023, 0.02) = 8. 12 seeds:
    # half-width 0.015 and MDE (80 %, alpha 0.05) 0.021 at the upper bound, 0.007 at the pilot's
    # sd.
    config.num_seeds = 12
  elif budget == 'tiny':
    config.width = 8
    config.num_steps = 4
    config.learning_rates = (0.05,)
    config.rhos = (0.05,)
    config.methods = ('sgd', 'sam')
    config.num_seeds = 3
  else:
    raise ValueError(f'budget must be cpu, paper or tiny, got {budget!r}')
  config.max_train_examples = 0  # 0: the whole train split
  return config

"""The sections of ``python -m experiments.benchmark``, one module per thing measured.

* :mod:`bench.timing`: the one timing method every section uses (round-robin samples, medians,
  ratios, compile-ahead, structural facts of compiled programs).
* :mod:`bench.sizes`: the ``tiny`` / ``small`` / ``full`` sizes of every section.
* :mod:`bench.steps`: train steps (SGD, SAM, optax SAM, LSAM, ASAM, diagnostics) and scaling.
* :mod:`bench.toy`: the toy main job cold and warm, and its vmapped sweep vs one run at a time.
* :mod:`bench.grids`: the lr x rho x seed grid trainer, vmapped vs sequential.
* :mod:`bench.per_example`: per-example gradient norms, chunked vs unchunked (time, memory).
* :mod:`bench.input`: the input pipeline against the train step it feeds.

Each section module has ``bench(size, ...) -> dict`` (its JSON section), ``report_lines(result)``
(its part of the text report) and ``goal_values(result)`` (the measured values the CLI judges
against ``benchmark.GOALS``).
"""

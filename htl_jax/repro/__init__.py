"""The paper's experiments as data, run as Optuna studies (docs/design.md).

- :mod:`htl_jax.repro.storage`: where studies live (a SQLite file in the workdir, or a
  shared PostgreSQL server), shared by reproduction and tuning.
- :mod:`htl_jax.repro.experiments`: every table and figure as named variants.
- :mod:`htl_jax.repro.runner`: the runs of an experiment as trials of one study.
- :mod:`htl_jax.repro.report`: ``results.csv`` and ``table.md`` with significance.
- :mod:`htl_jax.repro.figures`: Fig. 5, 7 and 8.
- :mod:`htl_jax.repro.tuning`: Table 6's search space, tuned with Optuna per model.
"""

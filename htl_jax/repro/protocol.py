"""One experiment of the paper, end to end: its runs, then ``results.csv``, ``table.md`` and
its figure (DESIGN section 10). ``htl-reproduce`` calls :func:`reproduce`."""

from __future__ import annotations

import os

from htl_jax.data import default_cache_dir, load_dataset
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro import lockstep, report, runner


def reproduce(config, experiment_name: str, seeds: int, workdir: str, storage: str = '',
              variants=(), tuned_dir: str = '') -> str:
  """Runs the experiment and writes its report; returns ``table.md``'s text.

  Args:
    config: the dataset config (every run's base).
    experiment_name: a key of :data:`htl_jax.repro.experiments.EXPERIMENTS`.
    seeds: seeds ``0 .. seeds-1`` of every variant.
    workdir: run dirs, the SQLite study by default, and the report.
    storage: an Optuna RDB URL shared by several machines ('' = ``<workdir>/optuna.db``).
    variants: a subset of the experiment's variants (all when empty).
    tuned_dir: tuning workdirs (``htl-tune``), one per model, applied per variant.

  Returns:
    ``table.md``'s text ('' in the non-primary processes of a multi-process worker).
  """
  experiment = experiments_lib.get_experiment(experiment_name)
  os.makedirs(workdir, exist_ok=True)
  if not experiment.trains:
    if lockstep.is_follower():
      return ''
    data = load_dataset(config, config.cache_dir or default_cache_dir())
    text = report.dataset_table(data, f'{experiment.title} ({runner.dataset_tag(config)})')
    with open(os.path.join(workdir, 'table.md'), 'w') as f:
      f.write(text)
    return text
  chosen = list(experiments_lib.select_variants(experiment, list(variants)))
  results = runner.run_experiment(config, experiment_name, seeds, workdir, storage=storage,
                                  variants=chosen, tuned_dir=tuned_dir)
  if lockstep.is_follower():
    return ''
  text = report.write_report(workdir, results, experiment, chosen)
  if experiment.figure:
    path = report.draw_figure(experiment.figure, workdir, results)
    text += f'\nFigure: {path}\n'
  return text

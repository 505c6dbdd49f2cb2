"""One experiment of the paper, end to end, by the paper's protocol: tune, then seed.

:func:`reproduce` (``htl-reproduce``, docs/design.md):

1. **Tune** (``tune_trials > 0``): one Optuna study per tuning study of the experiment's
   variants (:meth:`htl_jax.repro.experiments.Experiment.study`: each model's variant its
   own, HTLNet's ablations HTLNet's), over Table 6 (:mod:`htl_jax.repro.table6`), with
   pruning, in ``<tuned_dir>/<study>/`` and the same storage as the runs, so it resumes after
   a kill and several machines share it. A study that already has its trials is not redone.
2. **Seed**: every variant, seeds ``0..N-1``, from its study's best configuration with its
   own overrides applied on top (an ablation's switch, Fig. 8's alpha and gamma). Seeds vary
   the model only; the split is the same for every run (``split_seed``).
3. **Report**: ``results.csv``, ``table.md`` (with the tuned values of every study listed),
   ``tuned.json`` (variant -> the overrides it started from) and the experiment's figure.

``tuned_dir`` also reads studies run separately: a folder of ``htl-tune`` workdirs, one per
study (``<tuned_dir>/<study>/best.json``) or per model (``<tuned_dir>/<model>/best.json``).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from absl import logging

from htl_jax.data import default_cache_dir, load_dataset
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro import lockstep, report, runner, tuning
from htl_jax.repro import storage as storage_lib
from htl_jax.train import run_files

TUNED = 'tuned.json'


def _best_overrides(tuned_dir: str, study: dict[str, Any]) -> Optional[dict[str, Any]]:
  """The best configuration of ``study`` in ``tuned_dir`` (None if it has none yet)."""
  model = study.get('model', '')
  for path in (os.path.join(tuned_dir, experiments_lib.study_slug(study), 'best.json'),
               os.path.join(tuned_dir, model, 'best.json'),
               os.path.join(tuned_dir, 'best.json')):
    if os.path.exists(path):
      with open(path) as f:
        best = json.load(f)
      if best.get('model', model) == model:
        return dict(best.get('overrides', {}))
  return None


def tuned_values(tuned_dir: str, experiment: experiments_lib.Experiment,
                 variants: list[str]) -> dict[str, dict[str, Any]]:
  """Per variant, the tuned overrides it starts from ({} where its study has none)."""
  if not tuned_dir:
    return {v: {} for v in variants}
  return {v: _best_overrides(tuned_dir, experiment.study(v)) or {} for v in variants}


def tune_studies(config, experiment: experiments_lib.Experiment, variants: list[str],
                 tuned_dir: str, storage: str, tune_trials: int, workdir: str) -> None:
  """Step 1: every study of ``variants`` reaches ``tune_trials`` finished trials."""
  studies = {}
  for variant in variants:
    study = experiment.study(variant)
    studies.setdefault(experiments_lib.study_slug(study), study)
  opened = None
  if not lockstep.is_follower():
    os.makedirs(workdir, exist_ok=True)
    opened = storage_lib.open_storage(storage_lib.storage_url(workdir, storage))
  for slug, study in studies.items():
    base = copy.deepcopy(config)
    for key, value in study.items():
      runner.assign(base, key, value)
    summary = tuning.run_study(base, os.path.join(tuned_dir, slug), opened,
                               n_trials=tune_trials,
                               study_name=f'tune:{runner.dataset_tag(config)}:{slug}')
    if not lockstep.is_follower():
      logging.info('tuned %s: %s', slug, json.dumps(summary['counts']))


def reproduce(config, experiment_name: str, seeds: int, workdir: str, storage: str = '',
              variants=(), tuned_dir: str = '', tune_trials: int = 0) -> str:
  """Runs the experiment by the paper's protocol (module docstring); returns ``table.md``.

  Args:
    config: the dataset config (every run's base).
    experiment_name: a key of :data:`htl_jax.repro.experiments.EXPERIMENTS`.
    seeds: seeds ``0 .. seeds-1`` of every variant; 0 = tune only (``tuned.json``, no runs).
    workdir: run dirs, the SQLite storage by default, the tuning studies by default
      (``<workdir>/tune``) and the report.
    storage: an Optuna RDB URL shared by several machines ('' = ``<workdir>/optuna.db``).
    variants: a subset of the experiment's variants (all when empty).
    tuned_dir: where the tuning studies live ('' = ``<workdir>/tune`` when tuning here,
      else no tuned values: every variant from the config's defaults).
    tune_trials: finished trials of every study before the seeds run (0 = no tuning).

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
  if tune_trials > 0:
    tuned_dir = tuned_dir or os.path.join(workdir, 'tune')
    tune_studies(config, experiment, chosen, tuned_dir, storage, tune_trials, workdir)
  tuned = tuned_values(tuned_dir, experiment, chosen)
  if seeds == 0:                  # tuning only
    if not lockstep.is_follower():
      run_files.write_json(os.path.join(workdir, TUNED), tuned)
    return ''
  results = runner.run_experiment(config, experiment_name, seeds, workdir, storage=storage,
                                  variants=chosen, tuned=tuned)
  if lockstep.is_follower():
    return ''
  run_files.write_json(os.path.join(workdir, TUNED), tuned)
  text = report.write_report(workdir, results, experiment, chosen, tuned)
  if experiment.figure:
    path = report.draw_figure(experiment.figure, workdir, results)
    text += f'\nFigure: {path}\n'
  return text

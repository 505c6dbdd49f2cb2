"""Delta_m's reference run: the DNN baseline at the dataset's defaults (docs/design.md, 10).

``selection='delta_m'`` (:mod:`htl_jax.selection`) compares every run's validation metrics
with a reference run's. The reference is DNN (one independent model per task: what the
tasks reach without sharing anything) with the dataset config's defaults, over the same
seeds as a tuning trial, run ONCE per study set and stored with it as
``<dir>/reference.json`` (:func:`htl_jax.selection.reference_record`: the mean over its
seeds of each split's metrics). Its runs are cells of their own study on the same storage
(``<dir>/reference/seed<k>``), so they resume after a kill and several machines share
them; they select by the core rule (there is no reference for the reference).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

from absl import logging

from htl_jax.errors import RunError
from htl_jax.repro import lockstep, runner
from htl_jax.repro.progress import Progress
from htl_jax.selection import read_reference, reference_record
from htl_jax import run_files

FILE = 'reference.json'
VARIANT = 'reference'
OVERRIDES = {'model': 'dnn', 'grad_process': 'auto', 'selection': 'core',
             'selection_reference': ''}


def find(directory: str) -> Optional[str]:
  """``<directory>/reference.json`` if it exists."""
  path = os.path.join(directory, FILE)
  return path if directory and os.path.isfile(path) else None


def runs_needed(config, directory: str, seeds: int) -> int:
  """The reference runs a study set in ``directory`` still needs (for a progress total):
  ``seeds`` under ``delta_m`` without a reference, else 0."""
  if config.selection != 'delta_m' or config.selection_reference or find(directory):
    return 0
  return seeds


def ensure(config, directory: str, storage_url: str, seeds: int,
           progress: Optional[Progress] = None) -> str:
  """The path of ``<directory>/reference.json``, running the reference first if needed.

  Args:
    config: the dataset config of the study set (its defaults are the reference's).
    directory: the study set's folder (a reproduction's ``tune/``, a ``htl-tune`` workdir).
    storage_url: the Optuna storage the study set shares.
    seeds: seeds ``config.seed .. + seeds - 1`` (a trial's seeds).
    progress: counts its runs (the caller has them in its total).

  Raises:
    RunError: an existing reference was run over other seeds.
  """
  path = os.path.join(directory, FILE)
  wanted = [int(config.seed) + k for k in range(seeds)]
  if os.path.isfile(path):
    stored = read_reference(path)
    if stored.get('seeds') != wanted:
      raise RunError(f'{path}: the reference was run over seeds {stored.get("seeds")}, this '
                     f'study set uses {wanted}; use another --workdir (or the same seeds)')
    return path
  base = copy.deepcopy(config)
  for key, value in OVERRIDES.items():
    runner.assign(base, key, value)
  logging.info('Delta_m reference: %s over seeds %s in %s', OVERRIDES['model'], wanted,
               directory)
  results = runner.run_cells(
      base, {VARIANT: {}}, wanted, directory,
      runner.CellStudy(f'reference:{runner.dataset_tag(config)}', storage_url),
      progress=progress)
  if not lockstep.is_follower():
    runs = [results[runner.cell_name(VARIANT, s)] for s in wanted]
    run_files.write_json(path, reference_record(runs, OVERRIDES['model'], wanted,
                                                _defaults(base)))
  lockstep.share(None)          # every process reads the file only once it is written
  return path


def _defaults(config) -> dict[str, Any]:
  """The reference's config fields that decide its runs, for the record."""
  return {key: config[key] for key in ('model', 'embed_dim', 'batch_size', 'learning_rate',
                                       'l2', 'num_epochs', 'eval_every', 'patience')}

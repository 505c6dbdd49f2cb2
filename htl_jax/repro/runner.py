"""The runs of an experiment as the trials of one Optuna study (docs/design.md).

Every (variant, seed) is a *cell*. The process that creates the study enqueues one WAITING
trial per cell; every process started with the same command and storage then takes waiting
trials one at a time (``study.optimize(n_trials=1)``: Optuna hands a waiting trial to exactly
one process, and keeps its heartbeat). A cell trains with ``train_and_evaluate`` in its own
run dir ``<workdir>/<variant>/seed<k>``:

- a finished cell (its ``metrics.json`` exists) is never trained again;
- a killed cell's trial goes stale, is marked FAIL and retried as a new waiting trial (see
  :mod:`htl_jax.repro.storage`), and the retry resumes from the run dir's checkpoint.

A process waits while other processes still run cells, so each one ends with every cell
done; the report is then written from the run dirs.

A worker may be several processes of one ``jax.distributed`` run (several hosts): its
primary process takes the cells and its other processes train each one with it, in
lockstep (:mod:`htl_jax.repro.lockstep`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import optuna
from optuna.trial import TrialState

from htl_jax.errors import PreemptedError
from htl_jax.repro import experiments as experiments_lib
# The cells' names and folders (imported by the report and figures without Optuna).
from htl_jax.repro.experiments import assign, cell_name, dataset_tag, parse_cell, run_dir
from htl_jax.repro import lockstep, table6
from htl_jax.repro.progress import Progress
from htl_jax.selection import selection
from htl_jax.repro import storage as storage_lib
from htl_jax import run_files
from htl_jax.train.checks import check_config
from htl_jax.train.loop import train_and_evaluate

RunCell = Callable[[Any, str], dict]          # (config, run_dir) -> metrics.json's dict
_CELL = 'cell'


def cell_config(base, overrides: dict[str, Any], seed: int,
                tuned: Optional[dict[str, Any]] = None):
  """The config of one cell: base, the variant's tuned values, its own overrides, the seed.

  A tuned batch size keeps the base schedule's numbers of examples per evaluation, as in
  the tuning trials (:func:`htl_jax.repro.table6.keep_examples_per_evaluation`).
  """
  config = copy.deepcopy(base)
  for key, value in {**(tuned or {}), **overrides}.items():
    assign(config, key, value)
  table6.keep_examples_per_evaluation(config, base)
  config.seed = seed
  check_config(config)
  return config


def train_cell(config, directory: str) -> dict:
  """The default cell: train and evaluate (resumes from the run dir's checkpoint)."""
  return train_and_evaluate(config, directory)


class CellObjective:
  """Runs the cell a waiting trial carries; returns its validation selection metric."""

  def __init__(self, base, cells: dict[str, dict[str, Any]], workdir: str,
               tuned: dict[str, dict[str, Any]], run_cell: RunCell,
               progress: Optional[Progress] = None):
    self.base, self.cells, self.workdir = base, cells, workdir
    self.tuned, self.run_cell = tuned, run_cell
    self.progress = progress or Progress()
    self.rule = selection(base)
    self.current: Optional[int] = None      # the trial this process runs

  def __call__(self, trial: optuna.Trial) -> float:
    self.current = trial.number
    cell = trial.user_attrs.get(_CELL)
    if cell is None:
      trial.set_user_attr('note', 'no waiting cell was left for this process')
      raise optuna.TrialPruned()
    if cell not in self.cells:       # another command's cell (other --variants): put it back
      trial.study.enqueue_trial({}, user_attrs={_CELL: cell})
      trial.set_user_attr('note', f'{cell} is not a cell of this process; put back')
      raise optuna.TrialPruned()
    if self._running_elsewhere(trial, cell):
      trial.set_user_attr('note', f'{cell} is running in another process')
      raise optuna.TrialPruned()
    variant, seed = parse_cell(cell)
    directory = run_dir(self.workdir, variant, seed)
    run_files.check_owner(directory, self.config_of(cell))   # a finished run of this config
    result = run_files.read_metrics(directory)
    if result is None:
      lockstep.announce({'cell': cell})
      self.progress.say(f'run {variant}, seed {seed}')
      result = self.train(cell)
      self.progress.finished()
    # A cell's value only informs the study's dashboard: the report reads the run dirs.
    value = self.rule.value(result['valid'])
    return float(value) if value is not None else 0.0

  def config_of(self, cell: str):
    variant, seed = parse_cell(cell)
    return cell_config(self.base, self.cells[cell], seed, self.tuned.get(variant))

  def train(self, cell: str) -> dict:
    """Trains one cell in its run dir (every process of a multi-process worker)."""
    variant, seed = parse_cell(cell)
    directory = run_dir(self.workdir, variant, seed)
    logging.info('reproduce: running %s in %s', cell, directory)
    return self.run_cell(self.config_of(cell), directory)

  @staticmethod
  def _running_elsewhere(trial: optuna.Trial, cell: str) -> bool:
    others = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return any(t.user_attrs.get(_CELL) == cell and t.number < trial.number for t in others)


def open_cell_study(name: str, storage, cells: list[str], direction: str = 'minimize'
                    ) -> optuna.Study:
  """The study called ``name``; its creator enqueues one waiting trial per cell.

  A later command with more cells (more seeds, another variant) adds the missing ones, and
  a cell whose every trial was pruned (none ran it) is waiting again.
  """
  try:
    study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    created = True
  except optuna.exceptions.DuplicatedStudyError:
    study = optuna.load_study(study_name=name, storage=storage)
    created = False
  if not created:
    _wait_until_ready(study)
  known = {t.user_attrs.get(_CELL) for t in study.get_trials(deepcopy=False)
           if t.state != TrialState.PRUNED}
  for cell in cells:
    if cell not in known:
      study.enqueue_trial({}, user_attrs={_CELL: cell})
  study.set_user_attr('ready', True)
  return study


def _wait_until_ready(study: optuna.Study, timeout: float = 60.0) -> None:
  """Lets the creator enqueue first, so two starts do not enqueue a cell twice."""
  deadline = time.monotonic() + timeout
  while not study.user_attrs.get('ready') and time.monotonic() < deadline:
    time.sleep(0.2)


def work(study: optuna.Study, objective: CellObjective) -> None:
  """Take waiting cells until none of this process's cells is waiting or running (a dead one
  is retried). Other commands' cells in the same study (other ``--variants``) are theirs."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  pause = max(0.2, storage_lib.heartbeat_seconds() / 4)
  while True:
    storage_lib.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get(_CELL) in objective.cells]
    if TrialState.WAITING in states:
      with storage_lib.quiet_experimental():
        try:
          study.optimize(objective, n_trials=1, catch=())
        except PreemptedError:      # the cell runs again at once, elsewhere or on restart
          storage_lib.retry_now(study, objective.current)
          raise
    elif TrialState.RUNNING in states:
      time.sleep(pause)
      lockstep.keep_waiting()
    else:
      lockstep.finish()
      return


def run_experiment(base, experiment_name: str, seeds: int, workdir: str, *,
                   storage: str = '', variants: Optional[list[str]] = None,
                   tuned: Optional[dict[str, dict[str, Any]]] = None,
                   run_cell: RunCell = train_cell, progress: Optional[Progress] = None
                   ) -> dict[str, dict]:
  """Runs (or joins) every cell of an experiment; returns ``{cell: metrics.json dict}``
  (``{}`` in the non-primary processes of a multi-process worker).

  Args:
    base: the dataset config (overrides for every run already applied).
    experiment_name: a key of :data:`htl_jax.repro.experiments.EXPERIMENTS`.
    seeds: seeds ``0 .. seeds-1`` for every variant.
    workdir: run dirs, the SQLite storage by default, and the report.
    storage: an RDB URL shared by several machines ('' = ``<workdir>/optuna.db``).
    variants: a subset of the experiment's variants (all when empty).
    tuned: per variant, its tuned overrides (applied under the variant's own).
    run_cell: what a cell does (tests pass a cheap one).
    progress: counts the cells (:class:`htl_jax.repro.progress.Progress`).
  """
  experiment = experiments_lib.get_experiment(experiment_name)
  chosen = experiments_lib.select_variants(experiment, list(variants or []))
  if seeds < 1:
    raise ValueError(f'--seeds must be >= 1, got {seeds}')
  return run_cells(base, chosen, range(seeds), workdir,
                   CellStudy(f'reproduce:{experiment_name}:{dataset_tag(base)}',
                             storage_lib.storage_url(workdir, storage)),
                   tuned=tuned, run_cell=run_cell, progress=progress)


@dataclasses.dataclass(frozen=True)
class CellStudy:
  """Where the cells of a set of runs are shared: the study's name and its storage URL."""

  name: str
  url: str


def run_cells(base, variants: dict[str, dict[str, Any]], seeds, workdir: str,
              study: CellStudy, *, tuned: Optional[dict[str, dict[str, Any]]] = None,
              run_cell: RunCell = train_cell, progress: Optional[Progress] = None
              ) -> dict[str, dict]:
  """Runs (or joins) the cells ``variants x seeds`` in ``<workdir>/<variant>/seed<k>``;
  returns ``{cell: metrics.json dict}`` (``{}`` in the non-primary processes of a
  multi-process worker). Every cell's config is checked before any runs, and so is every
  existing run dir: it must hold a run of its cell's config (a workdir belongs to one).
  ``progress`` counts the cells (the caller has them in its total)."""
  cells = {cell_name(v, s): overrides for v, overrides in variants.items() for s in seeds}
  tuned = tuned or {}
  objective = CellObjective(base, cells, workdir, tuned, run_cell, progress)
  for cell in cells:               # every cell's config is valid, and its own run dir's
    variant, seed = parse_cell(cell)
    directory = run_dir(workdir, variant, seed)
    run_files.check_owner(directory, objective.config_of(cell))
    objective.progress.skip(run_files.read_metrics(directory) is not None)
  if lockstep.is_follower():        # the primary process of this worker takes the cells
    lockstep.follow(lambda announced: objective.train(announced['cell']))
    return {}
  os.makedirs(workdir, exist_ok=True)
  optuna_study = open_cell_study(study.name, storage_lib.open_storage(study.url),
                                 list(cells), objective.rule.direction)
  work(optuna_study, objective)
  results = {}
  for cell in cells:
    variant, seed = parse_cell(cell)
    result = run_files.read_metrics(run_dir(workdir, variant, seed))
    if result is not None:
      results[cell] = result
  return results

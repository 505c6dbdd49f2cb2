"""Tune one model with Optuna over the paper's Table 6 (Appendix B.1; docs/design.md).

One study per (dataset, model) in an RDB storage (``htl_jax.repro.storage``: a SQLite file in
the workdir by default, PostgreSQL by URL, so the same command started on several machines
shares the work). Each trial:

1. draws the model's Table 6 hyperparameters (:func:`search_space`; categorical over the
   paper's grids) with a seeded TPE sampler (:class:`TrialSeededTPESampler`);
2. trains ``trial_seeds`` seeds of that configuration side by side in its own run dir
   ``<workdir>/trials/<number>/seed<k>`` (:mod:`htl_jax.repro.seeds`); after every round
   of evaluations the mean over the seeds of their best values so far is reported to the
   study and judged by a median pruner;
3. returns the mean over its seeds of the selection rule's validation value at each run's
   best checkpoint (:func:`htl_jax.selection.selection`: ``selection='core'``, the core
   task's ``best_metric``; ``selection='delta_m'``, Delta_m against a reference run), in
   the rule's direction; the std over seeds is stored on the trial.

A trial killed with its process (SIGKILL, a lost machine) is marked failed once its heartbeat
is stale and retried with the same hyperparameters by the storage's retry callback; the retry
resumes from the killed trial's latest checkpoint, in the killed trial's run dir. The study
ends when ``n_trials`` trials have finished (completed or pruned; failed ones do not count),
whichever process ran them. ``<workdir>/best.json`` and ``<workdir>/trials.csv`` are rewritten
after every trial (:mod:`htl_jax.repro.tuning_outputs`).

A worker may be several processes of one ``jax.distributed`` run (several hosts): its
primary process takes the trials and decides on pruning, and its other processes train each
trial with it, in lockstep (:mod:`htl_jax.repro.lockstep`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from typing import Any, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np
import optuna
from optuna.trial import TrialState

from htl_jax import selection as selection_lib
from htl_jax.data import default_cache_dir, load_dataset
from htl_jax.errors import ConfigError, NonFiniteError, PreemptedError
from htl_jax.repro import lockstep, reference
from htl_jax.repro import seeds as seeds_lib
from htl_jax.repro import storage as storage_lib
from htl_jax.repro import tuning_outputs
from htl_jax.repro.progress import Progress
from htl_jax.repro.study import has_heartbeat, open_study, trial_counts
from htl_jax.repro import table6
from htl_jax.repro.table6 import search_space
from htl_jax import run_files
from htl_jax.train.checks import check_config


def dataset_name(config) -> str:
  """A short name of the config's data for the study name (e.g. ``hillstrom``)."""
  if config.dataset == 'tabular':
    return os.path.splitext(os.path.basename(config.data.path))[0] or 'tabular'
  if config.dataset == 'kuairand' and not config.data_dir:
    return 'kuairand-sample'
  return config.dataset


# ----------------------------------------------------------------------------- one trial


@dataclasses.dataclass(frozen=True)
class TrialPlan:
  """A trial's config, its seeds, and how its evaluations map to the pruner's steps."""

  config: ml_collections.ConfigDict
  eval_every: int
  trial_seeds: int = 1

  def report_step(self, step: int) -> int:
    """The evaluation's index (1, 2, ...; a last partial interval counts as one more)."""
    return -(-step // self.eval_every)

  def configs(self) -> list[ml_collections.ConfigDict]:
    """One config per seed of the trial (:func:`htl_jax.repro.seeds.seed_configs`)."""
    return seeds_lib.seed_configs(self.config, self.trial_seeds)


def trial_plan(base, params: dict[str, Any], trial_seeds: int = 1) -> TrialPlan:
  """``base`` with a trial's ``params``; the step schedule keeps its numbers of examples.

  A trial whose batch size differs from the config's keeps the schedule's numbers of
  examples (:func:`htl_jax.repro.table6.keep_examples_per_evaluation`), so every trial is
  evaluated after the same numbers of training examples and the pruner compares like with
  like. The selection rule is the base config's (``selection``), so every run keeps the
  checkpoint that the objective scores.
  """
  config = base.copy_and_resolve_references()
  for name, value in params.items():
    config[name] = value
  table6.keep_examples_per_evaluation(config, base)
  return TrialPlan(config, int(config.eval_every), int(trial_seeds))


# The retry callback's helpers (static methods): which killed trial a retry continues.
_RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback


class SurplusTrial(Exception):
  """A trial started by a process racing another for the study's last open slot."""


def retry_origin(frozen: optuna.trial.FrozenTrial) -> Optional[int]:
  """The number of the killed trial that ``frozen`` retries (None for a fresh trial)."""
  with storage_lib.quiet_experimental():
    return _RETRY.retried_trial_number(frozen)


class TrialObjective:
  """``TrialObjective(study, base, workdir, space, n_trials)(trial) -> validation value``.

  The value is the mean over the trial's ``trial_seeds`` seeds (:mod:`htl_jax.repro.seeds`);
  the trial's user attributes keep its std, its runs at the step cap, and what stopped it.
  """

  def __init__(self, study: optuna.Study, base, workdir: str, space: dict[str, tuple],
               n_trials: int, trial_seeds: int = 1, progress: Optional[Progress] = None):
    self.study, self.base, self.workdir = study, base, workdir
    self.space, self.n_trials, self.trial_seeds = space, n_trials, trial_seeds
    self.progress = progress or Progress()
    self.rule = selection_lib.selection(base)
    self.current: Optional[int] = None      # the trial this process runs

  def __call__(self, trial: optuna.Trial) -> float:
    self.current = trial.number
    self._check_slot(trial)
    frozen = self.study.get_trials(deepcopy=False)[trial.number]
    origin = retry_origin(frozen)
    params = {name: trial.suggest_categorical(name, grid) for name, grid in self.space.items()}
    plan = trial_plan(self.base, params, self.trial_seeds)
    run_name = str(trial.number if origin is None else origin)
    trial_dir = os.path.join(self.workdir, 'trials', run_name)
    _prepare_trial_dir(trial_dir, plan, resume=origin is not None)
    trial.set_user_attr('run_dir', os.path.join('trials', run_name))
    trial.set_user_attr('host', socket.gethostname())
    trial.set_user_attr('pid', os.getpid())
    trial.set_user_attr('trial_seeds', self.trial_seeds)
    reported = self._inherit_reports(trial, frozen)
    logging.info('trial %d%s: %s', trial.number,
                 '' if origin is None else f' (retry of trial {origin}, resuming)', params)
    lockstep.announce({'params': params, 'trial_dir': trial_dir})
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in self.study.get_trials(deepcopy=False))
    self.progress.say(f'tune {os.path.basename(os.path.normpath(self.workdir))}: trial '
                      f'{trial.number} ({finished + 1} of {self.n_trials}), '
                      f'{self.trial_seeds} seed(s)')
    try:
      return self._train(trial, plan, trial_dir, reported)
    finally:
      self.progress.finished(self.trial_seeds)

  def _train(self, trial: optuna.Trial, plan: TrialPlan, trial_dir: str,
             reported: set[int]) -> float:
    """The trial's seeds, pruned or recorded; their mean value."""

    def after_round(index: int, mean: Optional[float]) -> None:
      _stop_if_pruned(lockstep.share(self._report(trial, reported, index, mean)))

    try:
      done = seeds_lib.train_seeds(plan.configs(), trial_dir, after_round, plan.report_step)
    except optuna.TrialPruned:
      trial.set_user_attr('stop', 'pruned')
      _drop_checkpoints(trial_dir)
      raise
    except (NonFiniteError, ConfigError) as error:
      # A diverging run, or hyperparameters this data cannot take (a batch larger than the
      # training split): a bad point of the space, counted as pruned so that TPE avoids it
      # (the base config itself was checked before the first trial).
      _drop_checkpoints(trial_dir)
      trial.set_user_attr('stop', 'diverged' if isinstance(error, NonFiniteError)
                          else 'config')
      trial.set_user_attr('stopped', str(error))
      logging.warning('trial %d stopped: %s', trial.number, error)
      raise optuna.TrialPruned(str(error)) from None
    _drop_checkpoints(trial_dir)
    self._record(trial, done)
    if done.mean is None:
      trial.set_user_attr('stopped', f'validation {self.rule.metric} undefined')
      raise optuna.TrialPruned(f'validation {self.rule.metric} is undefined')
    return done.mean

  @staticmethod
  def _record(trial: optuna.Trial, done: seeds_lib.SeedsResult) -> None:
    """The trial's spread over seeds, its budgets and how its runs ended."""
    trial.set_user_attr('value_std', done.std)
    trial.set_user_attr('seed_values', done.values)
    trial.set_user_attr('runs_at_cap', done.runs_at_cap)
    trial.set_user_attr('stop', ','.join(r.get('stop', '') for r in done.results))
    for key in ('steps', 'epochs', 'best_step', 'train_seconds', 'final_tau'):
      trial.set_user_attr(key, float(np.mean([r[key] for r in done.results])))

  def _report(self, trial: optuna.Trial, reported: set[int], index: int,
              mean: Optional[float]) -> str:
    """Reports the seeds' mean to the pruner; why the trial is pruned, or '' to go on."""
    if mean is None or index in reported:
      return ''
    trial.report(float(mean), index)
    reported.add(index)
    if not trial.should_prune():
      return ''
    return (f'mean {self.rule.metric} {mean:.6g} after evaluation {index} is worse than the '
            'median of finished trials')

  def _check_slot(self, trial: optuna.Trial) -> None:
    """Raise :class:`SurplusTrial` unless ``trial`` is among the study's first open slots."""
    alive = sorted(t.number for t in self.study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                TrialState.WAITING)))
    if trial.number not in alive[:self.n_trials]:
      trial.set_user_attr('surplus', True)
      raise SurplusTrial(f'trial {trial.number} not run: the study already has '
                         f'{self.n_trials} finished or running trials')

  def _inherit_reports(self, trial: optuna.Trial, frozen: optuna.trial.FrozenTrial
                       ) -> set[int]:
    """Re-report a retried trial's earlier evaluations (its runs resume after them)."""
    reported = set(frozen.intermediate_values)
    with storage_lib.quiet_experimental():
      history = _RETRY.retry_history(frozen)
    if history:
      killed = self.study.get_trials(deepcopy=False)[history[-1]]
      for index, value in sorted(killed.intermediate_values.items()):
        if index not in reported:
          trial.report(value, index)
          reported.add(index)
    return reported


def _stop_if_pruned(reason: str) -> None:
  if reason:
    raise optuna.TrialPruned(reason)


def follow_trials(base, trial_seeds: int = 1) -> None:
  """A non-primary process of a multi-process worker: trains the trials its primary takes.

  Each announced trial trains with the primary's hyperparameters in the primary's run dirs;
  after each round of evaluations every process stops if the primary's pruner stopped it.
  """
  def train(announced: dict) -> None:
    plan = trial_plan(base, announced['params'], trial_seeds)

    def after_round(index: int, mean: Optional[float]) -> None:
      _stop_if_pruned(lockstep.share(None))

    try:
      seeds_lib.train_seeds(plan.configs(), announced['trial_dir'], after_round,
                            plan.report_step)
    except (optuna.TrialPruned, NonFiniteError, ConfigError):
      pass                        # the primary records why

  lockstep.follow(train)


def _drop_checkpoints(trial_dir: str) -> None:
  """A finished trial keeps its metrics, not its checkpoints (a study would fill the disk;
  the protocol trains the best configuration again, seed by seed)."""
  if not os.path.isdir(trial_dir):
    return
  for name in os.listdir(trial_dir):
    shutil.rmtree(os.path.join(trial_dir, name, run_files.CHECKPOINTS), ignore_errors=True)


def _prepare_trial_dir(trial_dir: str, plan: TrialPlan, resume: bool) -> None:
  """Clear ``trial_dir`` unless it holds a killed trial's runs of this very config (then
  they resume)."""
  if not os.path.exists(trial_dir):
    return
  if resume and all(_same_config(seeds_lib.seed_dir(trial_dir, int(c.seed)), c)
                    for c in plan.configs()):
    return
  shutil.rmtree(trial_dir)


def _same_config(run_dir: str, config) -> bool:
  """True when ``run_dir`` is missing (not started yet) or was started with ``config``."""
  path = os.path.join(run_dir, run_files.CONFIG)
  if not os.path.exists(path):
    return True
  try:
    with open(path) as f:
      return json.load(f) == json.loads(config.to_json_best_effort())
  except (OSError, ValueError):
    return False


def _train_rows(base) -> int:
  """The training split's rows, when the tau_d grid scales with them (else 0, unread)."""
  if float(base.tau_grid_scale) > 0:
    return 0
  return len(load_dataset(base, base.cache_dir or default_cache_dir()).train)


@dataclasses.dataclass(frozen=True)
class StudyOptions:
  """How a study runs (``htl-tune``'s flags; ``htl-reproduce`` sets its own).

  Attributes:
    n_trials: finished (completed or pruned) trials the study must reach.
    trial_seeds: seeds of every trial; its value is their mean (:mod:`htl_jax.repro.seeds`).
    study_name: '' = ``<dataset>-<model>``.
    params: subset of the model's Table 6 hyperparameters to search (empty = all).
    random_trials: TPE's first trials, drawn at random before it models the space; 0 (auto)
      is a third of ``n_trials``, 3 to 10 (Optuna's default 10 would leave a study of 12
      trials nearly random).
    pruner_startup_trials: completed trials before the median pruner starts pruning.
    pruner_warmup_evals: evaluations every trial runs before it can be pruned (the first
      ones are noisy: on Hillstrom the first epoch's NRMSE did not predict the last one's).
    poll_seconds: wait between checks while the last trials run in other processes.
    progress: counts the study's runs, ``n_trials x trial_seeds`` (the caller has them in
      its total), and says which trial runs (:mod:`htl_jax.repro.progress`).
  """

  n_trials: int
  trial_seeds: int = 1
  study_name: str = ''
  params: Sequence[str] = ()
  random_trials: int = 0
  pruner_startup_trials: int = 3
  pruner_warmup_evals: int = 1
  poll_seconds: float = 2.0
  progress: Progress = dataclasses.field(default_factory=Progress)

  @property
  def random_startup(self) -> int:
    return self.random_trials or min(10, max(3, self.n_trials // 3))

  def check(self) -> None:
    if self.n_trials < 1:
      raise ConfigError(f'--trials must be >= 1, got {self.n_trials}')
    if self.trial_seeds < 1:
      raise ConfigError(f'--trial_seeds must be >= 1, got {self.trial_seeds}')


def run_study(base, workdir: str, storage, options: StudyOptions) -> dict[str, Any]:
  """Run trials until the study has ``options.n_trials`` finished ones (see module doc).

  Args:
    base: the experiment config (its ``model`` is the model tuned, its ``selection`` the
      objective).
    workdir: the study's directory (run dirs, ``best.json``, ``trials.csv``).
    storage: an Optuna storage (``htl_jax.repro.storage.open_storage``), shared by every
      process of the study (None in the non-primary processes of a multi-process worker,
      which never open it).
    options: :class:`StudyOptions`.

  Returns:
    ``{'study': name, 'counts': {state: n}, 'best': best.json's content or None,
    'wall_seconds': this call's wall time}``.
  """
  options.check()
  check_config(base)
  space = search_space(base, options.params, train_rows=_train_rows(base))
  study_name = options.study_name or f'{dataset_name(base)}-{base.model}'
  if lockstep.is_follower():       # the primary process of this worker takes the trials
    start = time.perf_counter()
    follow_trials(base, options.trial_seeds)
    return {'study': study_name, 'counts': {}, 'best': None,
            'wall_seconds': time.perf_counter() - start}
  # The study's folder belongs to the study in ONE storage: a second storage's study of the
  # same name (another --workdir's optuna.db with the same --tuned) would overwrite its
  # best.json and trials.csv with its own trials.
  url = getattr(storage, 'url', '')            # an in-memory storage (tests) has none
  run_files.claim(workdir, run_files.STUDY, {'study': study_name, 'model': base.model,
                                              'selection': base.selection,
                                              'storage': storage_lib.masked(url) if url
                                              else 'in memory'})
  study = open_study(base, storage, study_name=study_name, space=space,
                     pruner_startup_trials=options.pruner_startup_trials,
                     pruner_warmup_evals=options.pruner_warmup_evals,
                     trial_seeds=options.trial_seeds, random_trials=options.random_startup)
  objective = TrialObjective(study, base, workdir, space, options.n_trials,
                             options.trial_seeds, options.progress)
  counts = trial_counts(study)
  options.progress.skip(min(counts['COMPLETE'] + counts['PRUNED'], options.n_trials)
                        * options.trial_seeds)

  def write(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    tuning_outputs.write_outputs(study, workdir, base.model, objective.rule)

  start = time.perf_counter()
  while _take_trial(study, options, storage):
    try:
      study.optimize(objective, n_trials=1, catch=(SurplusTrial,), callbacks=[write],
                     gc_after_trial=False)
    except PreemptedError:        # the trial resumes at once, elsewhere or on restart
      storage_lib.retry_now(study, objective.current)
      raise
  lockstep.finish()
  best = tuning_outputs.write_outputs(study, workdir, base.model, objective.rule)
  return {'study': study_name, 'counts': trial_counts(study), 'best': best,
          'wall_seconds': time.perf_counter() - start}


def _take_trial(study: optuna.Study, options: StudyOptions, storage) -> bool:
  """True when this process should start a trial; False once the study has its finished
  trials (or the rest run elsewhere without heartbeats); waits while other processes run
  the last ones."""
  waiting_logged = False
  while True:
    storage_lib.fail_stale_trials(study)
    counts = trial_counts(study)
    finished = counts['COMPLETE'] + counts['PRUNED']
    if finished >= options.n_trials:
      return False
    if finished + counts['RUNNING'] + counts['WAITING'] < options.n_trials or counts['WAITING']:
      return True
    if not has_heartbeat(storage):
      logging.info('%d trial(s) still run in other processes', counts['RUNNING'])
      return False
    if not waiting_logged:
      logging.info('waiting for %d running trial(s) of other processes (or their '
                   'heartbeat to go stale)', counts['RUNNING'])
      waiting_logged = True
    time.sleep(options.poll_seconds)
    lockstep.keep_waiting()


def tune(base, workdir: str, options: StudyOptions, storage: str = '') -> dict[str, Any]:
  """``htl-tune``: opens the study's storage (``<workdir>/optuna.db`` unless ``storage``
  names a database) and runs :func:`run_study`.

  Raises:
    ConfigError: ``workdir`` is a file, or :func:`run_study`'s reasons.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory')
  url = storage_lib.storage_url(workdir, storage)
  if base.selection == 'delta_m' and not base.selection_reference:
    base = base.copy_and_resolve_references()
    base.selection_reference = reference.ensure(base, workdir, url, options.trial_seeds,
                                                options.progress)
  opened = None
  if not lockstep.is_follower():          # only the primary process talks to Optuna
    os.makedirs(workdir, exist_ok=True)     # the SQLite file goes there
    opened = storage_lib.open_storage(url)
  return run_study(base, workdir, opened, options)

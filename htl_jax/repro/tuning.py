"""Tune one model with Optuna over the paper's Table 6 (Appendix B.1; docs/design.md).

One study per (dataset, model) in an RDB storage (``htl_jax.repro.storage``: a SQLite file in
the workdir by default, PostgreSQL by URL, so the same command started on several machines
shares the work). Each trial:

1. draws the model's Table 6 hyperparameters (:func:`search_space`; categorical over the
   paper's grids) with a seeded TPE sampler (:class:`TrialSeededTPESampler`);
2. trains with ``train_and_evaluate`` in its own run dir ``<workdir>/trials/<number>``, every
   evaluation reported to the study and judged by a median pruner;
3. returns the validation value of the run's model-selection metric
   (:func:`htl_jax.metrics.selection_metric`: ``config.best_metric``, else NRMSE for the MSE
   head and Gini for the ZILN head) at the best checkpoint, in that metric's direction.

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
import math
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

from htl_jax import metrics as metrics_lib
from htl_jax.data import default_cache_dir, load_dataset
from htl_jax.errors import ConfigError, NonFiniteError, PreemptedError
from htl_jax.repro import lockstep
from htl_jax.repro import storage as storage_lib
from htl_jax.repro import tuning_outputs
from htl_jax.repro import table6
from htl_jax.repro.table6 import search_space
from htl_jax.train import run_files
from htl_jax.train.checks import check_config
from htl_jax.train.loop import train_and_evaluate


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
  """A trial's config and how its evaluations map to the steps reported to the pruner."""

  config: ml_collections.ConfigDict
  eval_every: int

  def report_step(self, step: int) -> int:
    """The evaluation's index (1, 2, ...; a last partial interval counts as one more)."""
    return -(-step // self.eval_every)


def trial_plan(base, params: dict[str, Any]) -> TrialPlan:
  """``base`` with a trial's ``params``; the step schedule keeps its numbers of examples.

  A trial whose batch size differs from the config's keeps the schedule's numbers of
  examples (:func:`htl_jax.repro.table6.keep_examples_per_evaluation`), so every trial is
  evaluated after the same numbers of training examples and the pruner compares like with
  like. ``best_metric`` is set to the selection metric
  (:func:`htl_jax.metrics.selection_metric`) so the run keeps the checkpoint that the
  objective scores.
  """
  config = base.copy_and_resolve_references()
  for name, value in params.items():
    config[name] = value
  table6.keep_examples_per_evaluation(config, base)
  config.best_metric = metrics_lib.selection_metric(base).name
  return TrialPlan(config, int(config.eval_every))


# The retry callback's helpers (static methods): which killed trial a retry continues.
_RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback


class SurplusTrial(Exception):
  """A trial started by a process racing another for the study's last open slot."""


def retry_origin(frozen: optuna.trial.FrozenTrial) -> Optional[int]:
  """The number of the killed trial that ``frozen`` retries (None for a fresh trial)."""
  with storage_lib.quiet_experimental():
    return _RETRY.retried_trial_number(frozen)


class TrialObjective:
  """``TrialObjective(study, base, workdir, space, n_trials)(trial) -> validation value``."""

  def __init__(self, study: optuna.Study, base, workdir: str, space: dict[str, tuple],
               n_trials: int):
    self.study, self.base, self.workdir = study, base, workdir
    self.space, self.n_trials = space, n_trials
    self.metric = metrics_lib.selection_metric(base)
    self.current: Optional[int] = None      # the trial this process runs

  def __call__(self, trial: optuna.Trial) -> float:
    self.current = trial.number
    self._check_slot(trial)
    frozen = self.study.get_trials(deepcopy=False)[trial.number]
    origin = retry_origin(frozen)
    params = {name: trial.suggest_categorical(name, grid) for name, grid in self.space.items()}
    plan = trial_plan(self.base, params)
    run_name = str(trial.number if origin is None else origin)
    run_dir = os.path.join(self.workdir, 'trials', run_name)
    _prepare_run_dir(run_dir, plan.config, resume=origin is not None)
    trial.set_user_attr('run_dir', os.path.join('trials', run_name))
    trial.set_user_attr('host', socket.gethostname())
    trial.set_user_attr('pid', os.getpid())
    reported = self._inherit_reports(trial, frozen)
    logging.info('trial %d%s: %s', trial.number,
                 '' if origin is None else f' (retry of trial {origin}, resuming)', params)
    lockstep.announce({'params': params, 'run_dir': run_dir})

    def on_eval(step: int, valid: dict) -> None:
      _stop_if_pruned(lockstep.share(self._report(trial, plan, reported, step, valid)))

    try:
      result = train_and_evaluate(plan.config, run_dir, on_eval=on_eval)
    except optuna.TrialPruned:
      _drop_checkpoints(run_dir)
      raise
    except (NonFiniteError, ConfigError) as error:
      # A diverging run, or hyperparameters this data cannot take (a batch larger than the
      # training split): a bad point of the space, counted as pruned so that TPE avoids it
      # (the base config itself was checked before the first trial).
      _drop_checkpoints(run_dir)
      trial.set_user_attr('stopped', str(error))
      logging.warning('trial %d stopped: %s', trial.number, error)
      raise optuna.TrialPruned(str(error)) from None
    _drop_checkpoints(run_dir)
    for key in ('steps', 'epochs', 'best_step', 'train_seconds'):
      trial.set_user_attr(key, result[key])
    value = self.metric.value(result['valid'])
    if value is None or not math.isfinite(value):
      trial.set_user_attr('stopped', f'validation {self.metric.name} undefined')
      raise optuna.TrialPruned(f'validation {self.metric.name} is undefined')
    return float(value)

  def _report(self, trial: optuna.Trial, plan: TrialPlan, reported: set[int], step: int,
              valid: dict) -> str:
    """Reports an evaluation to the pruner; why the trial is pruned, or '' to go on."""
    value = self.metric.value(valid)
    index = plan.report_step(step)
    if value is None or index in reported:
      return ''
    trial.report(float(value), index)
    reported.add(index)
    if not trial.should_prune():
      return ''
    return (f'{self.metric.name} {value:.6g} after evaluation {index} (step {step}) is worse '
            'than the median of finished trials')

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
    """Re-report a retried trial's earlier evaluations (its run resumes after them)."""
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


def follow_trials(base) -> None:
  """A non-primary process of a multi-process worker: trains the trials its primary takes.

  Each announced trial trains with the primary's hyperparameters in the primary's run dir;
  after each evaluation every process stops if the primary's pruner stopped the trial.
  """
  def train(announced: dict) -> None:
    plan = trial_plan(base, announced['params'])

    def on_eval(step: int, valid: dict) -> None:
      _stop_if_pruned(lockstep.share(None))

    try:
      train_and_evaluate(plan.config, announced['run_dir'], on_eval=on_eval)
    except (optuna.TrialPruned, NonFiniteError, ConfigError):
      pass                        # the primary records why

  lockstep.follow(train)


def _drop_checkpoints(run_dir: str) -> None:
  """A finished trial keeps its metrics, not its checkpoints (a study would fill the disk;
  the protocol trains the best configuration again, seed by seed)."""
  shutil.rmtree(os.path.join(run_dir, run_files.CHECKPOINTS), ignore_errors=True)


def _prepare_run_dir(run_dir: str, config, resume: bool) -> None:
  """Clear ``run_dir`` unless it is a killed trial's run of this very config (then resume)."""
  if not os.path.exists(run_dir):
    return
  if resume:
    try:
      with open(os.path.join(run_dir, 'config.json')) as f:
        if json.load(f) == json.loads(config.to_json_best_effort()):
          return
    except (OSError, ValueError):
      pass
  shutil.rmtree(run_dir)


# ----------------------------------------------------------------------------- sampler


class TrialSeededTPESampler(optuna.samplers.BaseSampler):
  """Optuna's TPE whose random numbers for trial ``n`` come from the seed ``(seed, n)``.

  One process gives the same study for the same seed, and processes sharing a study never
  draw the same "random" startup trials (a plain seeded TPESampler in each would). TPE keeps
  no state between trials besides its random generator (it refits on the study's history at
  every trial), so a fresh TPE per trial number is the same algorithm.
  """

  def __init__(self, seed: int, **tpe_options):
    self._seed, self._options = int(seed), tpe_options
    self._by_trial: dict[int, optuna.samplers.TPESampler] = {}

  def _tpe(self, number: int) -> optuna.samplers.TPESampler:
    if number not in self._by_trial:
      if len(self._by_trial) >= 8:      # trials that never reached after_trial
        self._by_trial.pop(next(iter(self._by_trial)))
      seed = int(np.random.SeedSequence([self._seed, number]).generate_state(1)[0])
      self._by_trial[number] = optuna.samplers.TPESampler(seed=seed, **self._options)
    return self._by_trial[number]

  def infer_relative_search_space(self, study, trial):
    return self._tpe(trial.number).infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._tpe(trial.number).sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, param_distribution):
    return self._tpe(trial.number).sample_independent(study, trial, param_name,
                                                      param_distribution)

  def before_trial(self, study, trial) -> None:
    self._tpe(trial.number).before_trial(study, trial)

  def after_trial(self, study, trial, state, values) -> None:
    self._tpe(trial.number).after_trial(study, trial, state, values)
    self._by_trial.pop(trial.number, None)


# ----------------------------------------------------------------------------- the study


# Config fields that may differ between the processes of one study: machine-local paths, and
# how often a run writes checkpoints (not what it computes).
_LOCAL_FIELDS = ('cache_dir', 'data_dir', 'checkpoint_seconds')


def study_fingerprint(base, space: dict[str, tuple]) -> str:
  """What must agree between the runs of one study: the config minus searched and local fields."""
  fields = json.loads(base.to_json_best_effort())
  for name in (*space, *_LOCAL_FIELDS):
    fields.pop(name, None)
  fields.get('data', {}).pop('path', None)
  return json.dumps({'config': fields, 'space': {k: list(v) for k, v in space.items()}},
                    sort_keys=True)


def open_study(base, storage, *, study_name: str, space: dict[str, tuple],
               pruner_startup_trials: int = 5, pruner_warmup_evals: int = 1) -> optuna.Study:
  """Create or load the study; refuse one that was created for a different config.

  The median pruner prunes a trial whose best value so far is worse than the median of the
  completed trials' values at the same evaluation, once ``pruner_startup_trials`` trials
  have completed and the trial is past its first ``pruner_warmup_evals`` evaluations.

  Raises:
    ConfigError: the stored study's config or search space differs from ``base``'s.
  """
  study = optuna.create_study(
      storage=storage, study_name=study_name, load_if_exists=True,
      direction=metrics_lib.selection_metric(base).direction,
      sampler=TrialSeededTPESampler(base.seed),
      pruner=optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                         n_warmup_steps=pruner_warmup_evals + 1))
  expected = study_fingerprint(base, space)
  stored = study.user_attrs.get('fingerprint')
  if stored is None:
    study.set_user_attr('fingerprint', expected)
  elif stored != expected:
    diff = _first_difference(json.loads(stored), json.loads(expected))
    raise ConfigError(
        f'study {study_name!r} in this storage was made for another config or search space '
        f'({diff}); use another --workdir, --storage or --study_name')
  return study


def _first_difference(stored: dict, wanted: dict, prefix: str = '') -> str:
  for key in sorted(set(stored) | set(wanted)):
    a, b = stored.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      if a != b:
        return _first_difference(a, b, f'{prefix}{key}.')
    elif a != b:
      return f'{prefix}{key}: stored {a!r}, now {b!r}'
  return 'no difference'


def trial_counts(study: optuna.Study) -> dict[str, int]:
  """``{state name: number of trials}`` of the study."""
  counts = {state.name: 0 for state in TrialState}
  for trial in study.get_trials(deepcopy=False):
    counts[trial.state.name] += 1
  return counts


def _has_heartbeat(storage) -> bool:
  """Whether ``storage`` fails the trials of dead processes (an RDB storage with heartbeat)."""
  interval = getattr(storage, 'get_heartbeat_interval', None)
  return interval is not None and interval() is not None


def _train_rows(base) -> int:
  """The training split's rows, when the tau_d grid scales with them (else 0, unread)."""
  if float(base.tau_grid_scale) > 0:
    return 0
  return len(load_dataset(base, base.cache_dir or default_cache_dir()).train)


def run_study(base, workdir: str, storage, *, n_trials: int, study_name: str = '',
              params: Sequence[str] = (), pruner_startup_trials: int = 5,
              pruner_warmup_evals: int = 1, poll_seconds: float = 2.0) -> dict[str, Any]:
  """Run trials until the study has ``n_trials`` finished ones (see module doc).

  Args:
    base: the experiment config (its ``model`` is the model tuned).
    workdir: the study's directory (run dirs, ``best.json``, ``trials.csv``).
    storage: an Optuna storage (``htl_jax.repro.storage.open_storage``), shared by every
      process of the study (None in the non-primary processes of a multi-process worker,
      which never open it).
    n_trials: finished (completed or pruned) trials the study must reach.
    study_name: '' = ``<dataset>-<model>``.
    params: subset of the model's Table 6 hyperparameters to search ('' / empty = all).
    pruner_startup_trials: completed trials before the median pruner starts pruning.
    pruner_warmup_evals: evaluations every trial runs before it can be pruned (the first
      ones are noisy: on Hillstrom the first epoch's NRMSE did not predict the last one's).
    poll_seconds: wait between checks while the last trials run in other processes.

  Returns:
    ``{'study': name, 'counts': {state: n}, 'best': best.json's content or None,
    'wall_seconds': this call's wall time}``.
  """
  if n_trials < 1:
    raise ConfigError(f'--trials must be >= 1, got {n_trials}')
  check_config(base)
  space = search_space(base, params, train_rows=_train_rows(base))
  study_name = study_name or f'{dataset_name(base)}-{base.model}'
  if lockstep.is_follower():       # the primary process of this worker takes the trials
    start = time.perf_counter()
    follow_trials(base)
    return {'study': study_name, 'counts': {}, 'best': None,
            'wall_seconds': time.perf_counter() - start}
  study = open_study(base, storage, study_name=study_name, space=space,
                     pruner_startup_trials=pruner_startup_trials,
                     pruner_warmup_evals=pruner_warmup_evals)
  os.makedirs(workdir, exist_ok=True)
  objective = TrialObjective(study, base, workdir, space, n_trials)
  metric = metrics_lib.selection_metric(base)

  def write(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    tuning_outputs.write_outputs(study, workdir, base.model, metric.name)

  start, waiting_logged = time.perf_counter(), False
  while True:
    storage_lib.fail_stale_trials(study)
    counts = trial_counts(study)
    finished = counts['COMPLETE'] + counts['PRUNED']
    if finished >= n_trials:
      break
    if finished + counts['RUNNING'] + counts['WAITING'] >= n_trials and not counts['WAITING']:
      if not _has_heartbeat(storage):
        logging.info('%d trial(s) still run in other processes', counts['RUNNING'])
        break
      if not waiting_logged:
        logging.info('waiting for %d running trial(s) of other processes (or their '
                     'heartbeat to go stale)', counts['RUNNING'])
        waiting_logged = True
      time.sleep(poll_seconds)
      lockstep.keep_waiting()
      continue
    try:
      study.optimize(objective, n_trials=1, catch=(SurplusTrial,), callbacks=[write],
                     gc_after_trial=False)
    except PreemptedError:        # the trial resumes at once, elsewhere or on restart
      storage_lib.retry_now(study, objective.current)
      raise
  lockstep.finish()
  best = tuning_outputs.write_outputs(study, workdir, base.model, metric.name)
  return {'study': study_name, 'counts': trial_counts(study), 'best': best,
          'wall_seconds': time.perf_counter() - start}


def tune(base, workdir: str, *, storage: str = '', n_trials: int, study_name: str = '',
         params: Sequence[str] = (), pruner_startup_trials: int = 5,
         pruner_warmup_evals: int = 1) -> dict[str, Any]:
  """``htl-tune``: opens the study's storage (``<workdir>/optuna.db`` unless ``storage``
  names a database) and runs :func:`run_study`.

  Raises:
    ConfigError: ``workdir`` is a file, or :func:`run_study`'s reasons.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory')
  opened = None
  if not lockstep.is_follower():          # only the primary process talks to Optuna
    os.makedirs(workdir, exist_ok=True)     # the SQLite file goes there
    opened = storage_lib.open_storage(storage_lib.storage_url(workdir, storage))
  return run_study(base, workdir, opened, n_trials=n_trials, study_name=study_name,
                   params=params, pruner_startup_trials=pruner_startup_trials,
                   pruner_warmup_evals=pruner_warmup_evals)

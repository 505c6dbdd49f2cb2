"""A tuning study: created or loaded with its sampler and pruner, and checked against its
config (:func:`open_study`).

- :class:`TrialSeededTPESampler`: Optuna's TPE whose random numbers for trial ``n`` come
  from the seed ``(seed, n)``, so processes sharing a study never draw the same startup
  trials;
- :func:`study_fingerprint`: what must agree between the processes of one study (the config
  minus searched and machine-local fields, the search space, the seeds of a trial): a study
  made for another config is refused with one line.
"""

from __future__ import annotations

import json

import numpy as np
import optuna
from optuna.trial import TrialState

from htl_jax.errors import ConfigError
from htl_jax.selection import selection


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


def study_fingerprint(base, space: dict[str, tuple], trial_seeds: int = 1) -> str:
  """What must agree between the runs of one study: the config minus searched and local
  fields, the search space and the seeds of a trial."""
  fields = json.loads(base.to_json_best_effort())
  for name in (*space, *_LOCAL_FIELDS):
    fields.pop(name, None)
  fields.get('data', {}).pop('path', None)
  return json.dumps({'config': fields, 'space': {k: list(v) for k, v in space.items()},
                     'trial_seeds': trial_seeds}, sort_keys=True)


def open_study(base, storage, *, study_name: str, space: dict[str, tuple],
               pruner_startup_trials: int = 3, pruner_warmup_evals: int = 1,
               trial_seeds: int = 1, random_trials: int = 10) -> optuna.Study:
  """Create or load the study; refuse one that was created for a different config.

  The median pruner prunes a trial whose best value so far is worse than the median of the
  completed trials' values at the same evaluation, once ``pruner_startup_trials`` trials
  have completed and the trial is past its first ``pruner_warmup_evals`` evaluations.

  Raises:
    ConfigError: the stored study's config or search space differs from ``base``'s.
  """
  study = optuna.create_study(
      storage=storage, study_name=study_name, load_if_exists=True,
      direction=selection(base).direction,
      sampler=TrialSeededTPESampler(base.seed, n_startup_trials=random_trials),
      pruner=optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                         n_warmup_steps=pruner_warmup_evals + 1))
  expected = study_fingerprint(base, space, trial_seeds)
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


def has_heartbeat(storage) -> bool:
  """Whether ``storage`` fails the trials of dead processes (an RDB storage with heartbeat)."""
  interval = getattr(storage, 'get_heartbeat_interval', None)
  return interval is not None and interval() is not None

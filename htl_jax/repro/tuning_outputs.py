"""What a tuning study leaves in its workdir: ``best.json`` and ``trials.csv``.

``best.json`` (read by ``experiments.reproduce --tuned=DIR`` as ``DIR/<model>/best.json``)::

  {"model": "htlnet", "overrides": {"embed_dim": 16, "learning_rate": 0.001, ...},
   "valid": {task: {metric: value}}, "value": 0.93, "metric": "nrmse",
   "direction": "minimize", "trial": 12, "run_dir": "trials/12", "study": "hillstrom-htlnet"}

``overrides`` are the best completed trial's hyperparameters as config fields (apply them
with ``config[key] = value``); ``valid`` are its validation metrics at its best checkpoint
(``<run_dir>/metrics.json`` also has its test metrics). ``trials.csv`` is the study's history,
one row per trial, with the columns of Optuna's ``Study.trials_dataframe()`` (number, value,
datetime_start, datetime_complete, duration, params_*, user_attrs_*, state) plus the
intermediate values reported to the pruner as JSON ``{evaluation: value}``; it is written
with the csv module because ``trials_dataframe`` needs pandas, which nothing else here uses.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Optional

import optuna
from optuna.trial import TrialState


def write_json(path: str, obj: Any) -> None:
  """Writes strict JSON atomically, with a temporary name of its own per process."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, allow_nan=False)
  os.replace(tmp, path)


def best_record(study: optuna.Study, workdir: str, model: str, metric: str
                ) -> Optional[dict[str, Any]]:
  """``best.json``'s content, or None while the study has no completed trial."""
  completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if not completed:
    return None
  best = study.best_trial
  run_dir = best.user_attrs.get('run_dir', os.path.join('trials', str(best.number)))
  with open(os.path.join(workdir, run_dir, 'metrics.json')) as f:
    valid = json.load(f)['valid']
  return {'model': model, 'overrides': dict(best.params), 'valid': valid,
          'value': best.value, 'metric': metric,
          'direction': study.direction.name.lower(), 'trial': best.number,
          'run_dir': run_dir, 'study': study.study_name}


def _cell(value: Any) -> Any:
  """A CSV cell: '' for missing or non-finite numbers, JSON for containers."""
  if value is None:
    return ''
  if isinstance(value, float) and not math.isfinite(value):
    return ''
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value)
  return value


def trial_rows(study: optuna.Study) -> tuple[list[str], list[dict[str, Any]]]:
  """The columns and rows of ``trials.csv``."""
  rows, params, attrs = [], [], []
  for trial in study.get_trials(deepcopy=False):
    row = {'number': trial.number, 'value': trial.value,
           'datetime_start': trial.datetime_start, 'datetime_complete': trial.datetime_complete,
           'duration': (trial.datetime_complete - trial.datetime_start).total_seconds()
                       if trial.datetime_start and trial.datetime_complete else None,
           'state': trial.state.name,
           'intermediate_values': {str(k): v for k, v in sorted(trial.intermediate_values.items())}}
    for name, value in trial.params.items():
      row[f'params_{name}'] = value
      params += [name] if name not in params else []
    for name, value in trial.user_attrs.items():
      row[f'user_attrs_{name}'] = value
      attrs += [name] if name not in attrs else []
    rows.append({key: _cell(value) for key, value in row.items()})
  columns = (['number', 'value', 'datetime_start', 'datetime_complete', 'duration']
             + [f'params_{name}' for name in params] + [f'user_attrs_{name}' for name in attrs]
             + ['state', 'intermediate_values'])
  return columns, rows


def write_trials_csv(study: optuna.Study, path: str) -> None:
  """Writes ``trials.csv`` atomically (several processes of one study may write it)."""
  columns, rows = trial_rows(study)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def write_outputs(study: optuna.Study, workdir: str, model: str, metric: str
                  ) -> Optional[dict[str, Any]]:
  """Rewrites ``trials.csv`` and (once a trial completed) ``best.json``; returns the latter."""
  write_trials_csv(study, os.path.join(workdir, 'trials.csv'))
  best = best_record(study, workdir, model, metric)
  if best is not None:
    write_json(os.path.join(workdir, 'best.json'), best)
  return best

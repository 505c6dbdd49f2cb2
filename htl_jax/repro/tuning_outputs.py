"""What a tuning study leaves in its workdir: ``best.json`` and ``trials.csv``.

``best.json`` (read by ``htl-reproduce --tuned=DIR`` as ``DIR/<model>/best.json``)::

  {"model": "htlnet", "overrides": {"embed_dim": 16, "learning_rate": 0.001, ...},
   "valid": {task: {metric: mean over the trial's seeds}}, "value": 0.93,
   "value_std": 0.002, "seeds": 3, "metric": "nrmse", "selection": "core",
   "direction": "minimize", "trial": 12, "run_dir": "trials/12", "study": "hillstrom-htlnet",
   "runs": 60, "runs_at_cap": 2}

``overrides`` are the best completed trial's hyperparameters as config fields (apply them
with ``config[key] = value``); ``valid`` are its validation metrics at each seed's best
checkpoint, averaged over the seeds (``<run_dir>/seed<k>/metrics.json`` have every seed's,
test included); ``runs`` and ``runs_at_cap`` count the study's finished runs and those that
ended at their step budget rather than by early stopping. ``trials.csv`` is the study's
history, one row per trial, with the columns of Optuna's ``Study.trials_dataframe()``
(number, value, datetime_start, datetime_complete, duration, params_*, user_attrs_* (among
them ``value_std``, ``runs_at_cap``, ``stop``, ``final_tau``), state) plus the intermediate
values reported to the pruner as JSON ``{evaluation: value}``; it is written with the csv
module because ``trials_dataframe`` needs pandas, which nothing else here uses.
"""

from __future__ import annotations

import csv
import io
import glob
import json
import math
import os
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from htl_jax.selection import Selection, mean_metrics
from htl_jax.run_files import write_json, write_text


def _seed_metrics(workdir: str, run_dir: str) -> list[dict[str, Any]]:
  """The ``metrics.json`` of every seed of a trial's run dir (a 0.2 trial dir holds one)."""
  paths = sorted(glob.glob(os.path.join(workdir, run_dir, 'seed*', 'metrics.json')))
  paths = paths or [os.path.join(workdir, run_dir, 'metrics.json')]
  out = []
  for path in paths:
    with open(path) as f:
      out.append(json.load(f))
  return out


def best_record(study: optuna.Study, workdir: str, model: str, rule: Selection
                ) -> Optional[dict[str, Any]]:
  """``best.json``'s content, or None while the study has no completed trial."""
  trials = study.get_trials(deepcopy=False)
  completed = [t for t in trials if t.state == TrialState.COMPLETE]
  if not completed:
    return None
  best = study.best_trial
  run_dir = best.user_attrs.get('run_dir', os.path.join('trials', str(best.number)))
  seeds = _seed_metrics(workdir, run_dir)
  finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
  return {'model': model, 'overrides': dict(best.params),
          'valid': mean_metrics([m['valid'] for m in seeds]),
          'value': best.value, 'value_std': best.user_attrs.get('value_std'),
          'seeds': len(seeds), 'metric': rule.metric, 'selection': rule.rule,
          'direction': study.direction.name.lower(), 'trial': best.number,
          'run_dir': run_dir, 'study': study.study_name,
          'runs': sum(int(t.user_attrs.get('trial_seeds', 1)) for t in finished),
          'runs_at_cap': sum(int(t.user_attrs.get('runs_at_cap', 0)) for t in finished)}


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
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=columns, restval='')
  writer.writeheader()
  writer.writerows(rows)
  write_text(path, text.getvalue())


def write_outputs(study: optuna.Study, workdir: str, model: str, rule: Selection
                  ) -> Optional[dict[str, Any]]:
  """Rewrites ``trials.csv`` and (once a trial completed) ``best.json``; returns the latter."""
  write_trials_csv(study, os.path.join(workdir, 'trials.csv'))
  best = best_record(study, workdir, model, rule)
  if best is not None:
    write_json(os.path.join(workdir, 'best.json'), best)
  return best

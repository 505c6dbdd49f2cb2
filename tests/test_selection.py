"""The selection rule (htl_jax.selection): Delta_m and the one function every part calls.

- Delta_m of the reference against itself is 0; its signs follow each metric's direction;
  it is LibMTL's mean over tasks of the mean over each task's metrics; a missing (null)
  metric is skipped and named;
- ``selection(config)`` gives the core rule's metric and direction, or Delta_m against the
  reference file, and a config that cannot select is one ConfigError;
- in a tiny study where one configuration wins the core metric by less than the seed noise
  and loses clearly on the binary tasks, ``selection=delta_m`` with 3 seeds a trial picks
  the other one, while ``selection=core`` with one seed picks the core's noisy winner.
"""

from __future__ import annotations

import json
import os

import optuna
import pytest

from conftest import tiny_config
from htl_jax import selection as selection_lib
from htl_jax.errors import ConfigError
from htl_jax.repro import seeds as seeds_lib
from htl_jax.repro import table6, tuning
from htl_jax import run_files

REFERENCE = {'click': {'auc': 0.70, 'logloss': 0.40},
             'watch_time': {'nrmse': 0.95, 'gini': 0.60}}


def test_delta_m_of_the_reference_against_itself_is_zero():
  assert selection_lib.delta_m(REFERENCE, REFERENCE) == 0.0


def test_delta_m_signs_follow_each_metrics_direction():
  better = {'click': {'auc': 0.77, 'logloss': 0.36},          # +10 %, -10 % (lower better)
            'watch_time': {'nrmse': 0.855, 'gini': 0.66}}      # -10 % (lower better), +10 %
  assert selection_lib.delta_m(better, REFERENCE) == pytest.approx(10.0)
  worse = {'click': {'auc': 0.63, 'logloss': 0.44},
           'watch_time': {'nrmse': 1.045, 'gini': 0.54}}
  assert selection_lib.delta_m(worse, REFERENCE) == pytest.approx(-10.0)


def test_delta_m_weighs_every_task_alike():
  """LibMTL: the mean over tasks of each task's mean, so a task with one metric counts as
  much as a task with two."""
  reference = {'a': {'auc': 1.0, 'logloss': 1.0}, 'core': {'nrmse': 1.0}}
  metrics = {'a': {'auc': 1.2, 'logloss': 1.0}, 'core': {'nrmse': 0.7}}
  # task a: (+20 % + 0 %) / 2 = 10 %; core: +30 %; mean 20 %.
  assert selection_lib.delta_m(metrics, reference) == pytest.approx(20.0)


def test_a_missing_metric_is_skipped_and_said():
  metrics = {'click': {'auc': 0.77, 'logloss': None},
             'watch_time': {'nrmse': 0.855, 'gini': 0.66, 'xauc': 0.6}}
  skipped = []
  value = selection_lib.delta_m(metrics, REFERENCE, skipped)
  assert value == pytest.approx(10.0)       # click: auc only; watch_time: nrmse and gini
  assert skipped == ['click logloss', 'watch_time xauc']
  assert selection_lib.delta_m({'click': {'auc': None}}, REFERENCE) is None


def test_selection_of_a_config(tmp_path, cache_dir):
  config = tiny_config(cache_dir)
  rule = selection_lib.selection(config)
  assert (rule.rule, rule.metric, rule.direction, rule.mode) == ('core', 'nrmse',
                                                                 'minimize', 'min')
  config.head, config.model = 'ziln', 'htlnet'
  assert selection_lib.selection(config).metric == 'gini'
  config.selection = 'delta_m'
  with pytest.raises(ConfigError, match='selection_reference'):
    selection_lib.selection(config)
  path = str(tmp_path / 'reference.json')
  run_files.write_json(path, selection_lib.reference_record(
      [{'valid': REFERENCE, 'test': REFERENCE}], 'dnn', [0], {}))
  config.selection_reference = path
  rule = selection_lib.selection(config)
  assert (rule.metric, rule.direction) == ('delta_m', 'maximize')
  assert rule.value(REFERENCE) == 0.0
  assert rule.better(0.1, 0.0) and not rule.better(None, 0.0)
  with open(path, 'w') as f:
    f.write('{"format": 99}')
  with pytest.raises(ConfigError, match='reference.json of this version'):
    selection_lib.selection(config)


# ----------------------------------------------------------------------------- a tiny study

NOISY, SOUND = 1e-3, 5e-3          # the two configurations (their learning rates)
# Validation metrics by configuration and seed: NOISY wins the core NRMSE on seed 0 by
# less than one seed's spread (0.002) and loses on average; it loses the binary tasks
# clearly on every seed.
_NRMSE = {NOISY: (0.9490, 0.9540, 0.9545), SOUND: (0.9500, 0.9505, 0.9510)}
_AUC = {NOISY: 0.70, SOUND: 0.76}


def _fake_seeds(configs, trial_dir, after_round, report_index):
  """What a trial's seeds "gave": metrics.json written per seed, no training."""
  results = []
  for config in configs:
    lr, seed = float(config.learning_rate), int(config.seed)
    valid = {'click': {'auc': _AUC[lr] + 0.001 * seed, 'logloss': 0.4},
             'watch_time': {'nrmse': _NRMSE[lr][seed], 'gini': 0.6}}
    result = {'valid': valid, 'test': valid, 'stop': 'early_stopping', 'steps': 10,
              'epochs': 1.0, 'best_step': 10, 'train_seconds': 1.0, 'final_tau': 10.0}
    os.makedirs(seeds_lib.seed_dir(trial_dir, seed), exist_ok=True)
    run_files.write_json(os.path.join(seeds_lib.seed_dir(trial_dir, seed), 'metrics.json'),
                         result)
    results.append(result)
  rule = selection_lib.selection(configs[0])
  return seeds_lib.SeedsResult(results, [rule.value(r['valid']) for r in results])


def _best(tmp_path, cache_dir, monkeypatch, name: str, trial_seeds: int, **config):
  monkeypatch.setattr(seeds_lib, 'train_seeds', _fake_seeds)
  monkeypatch.setitem(table6.TABLE6, 'learning_rate', (NOISY, SOUND))
  base = tiny_config(cache_dir, **config)
  workdir = str(tmp_path / name)
  storage = optuna.storages.InMemoryStorage()
  space = table6.search_space(base, ['learning_rate'])
  study = tuning.open_study(base, storage, study_name=name, space=space,
                            trial_seeds=trial_seeds)
  for lr in (NOISY, SOUND):
    study.enqueue_trial({'learning_rate': lr})
  summary = tuning.run_study(base, workdir, storage, tuning.StudyOptions(
      n_trials=2, trial_seeds=trial_seeds, study_name=name, params=('learning_rate',)))
  with open(os.path.join(workdir, 'best.json')) as f:
    assert json.load(f) == summary['best']
  return summary['best']


def test_delta_m_over_three_seeds_picks_the_sound_configuration(tmp_path, cache_dir,
                                                               monkeypatch):
  reference = str(tmp_path / 'reference.json')
  run_files.write_json(reference, selection_lib.reference_record(
      [{'valid': {'click': {'auc': 0.72, 'logloss': 0.4},
                  'watch_time': {'nrmse': 0.955, 'gini': 0.6}},
        'test': {}}], 'dnn', [0, 1, 2], {}))
  core = _best(tmp_path, cache_dir, monkeypatch, 'core', 1)
  assert core['overrides'] == {'learning_rate': NOISY}      # seed 0's noisy NRMSE
  assert (core['selection'], core['metric'], core['seeds']) == ('core', 'nrmse', 1)
  delta = _best(tmp_path, cache_dir, monkeypatch, 'delta_m', 3, selection='delta_m',
                selection_reference=reference)
  assert delta['overrides'] == {'learning_rate': SOUND}
  assert (delta['selection'], delta['metric'], delta['seeds']) == ('delta_m', 'delta_m', 3)
  assert delta['value_std'] > 0 and delta['runs'] == 6 and delta['runs_at_cap'] == 0
  assert delta['valid']['click']['auc'] == pytest.approx(_AUC[SOUND] + 0.001)  # seed mean

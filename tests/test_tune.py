"""Tuning with Optuna (``htl_jax.repro.tuning``, ``experiments.tune``).

The search space per model and its table in docs/tuning.md, the trial schedule, the sampler's
seeds and the stored-config guard need no training. One in-process study shows a hopeless trial
being pruned; the command-line tests kill a study mid-trial with SIGKILL and rerun it, and
run two processes on one storage (SQLite, and a real local PostgreSQL where its binaries
exist). The subprocesses share a persistent JAX compilation cache so that each distinct
trial compiles once for the whole module.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest

from conftest import REPO, TINY_ARG, cli_overrides, tiny_config
from htl_jax.configs import hillstrom
from htl_jax.repro import study as study_lib
from htl_jax.repro import table6, tuning
from htl_jax.selection import selection
from htl_jax.errors import ConfigError

_BASE = ('embed_dim', 'batch_size', 'learning_rate', 'l2')
_LEU = ('label_embed_dim', 'tau_decay_steps')


def _config(**overrides):
  config = hillstrom.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


# ----------------------------------------------------------------------------- no training


@pytest.mark.parametrize('overrides, expected', [
    ({'model': 'htlnet'}, _BASE + _LEU + ('alpha', 'gamma', 'clip')),
    ({'model': 'shared_bottom'}, _BASE),
    ({'model': 'dnn'}, _BASE),
    ({'model': 'mmoe', 'grad_process': 'metabalance'}, _BASE + ('metabalance_relax',)),
    ({'model': 'shared_bottom', 'grad_process': 'htl'}, _BASE + ('alpha', 'gamma', 'clip')),
    ({'model': 'htlnet', 'grad_process': 'none'}, _BASE + _LEU),
    ({'model': 'htlnet', 'use_label_embedding': False}, _BASE + ('alpha', 'gamma', 'clip')),
    ({'model': 'htlnet', 'grad_magnitude': False}, _BASE + _LEU + ('alpha',)),
    ({'model': 'htlnet', 'grad_conflict': False}, _BASE + _LEU + ('gamma', 'clip')),
], ids=lambda v: '-'.join(map(str, v.values())) if isinstance(v, dict) else None)
def test_search_space_has_only_the_models_hyperparameters(overrides, expected):
  space = table6.search_space(_config(**overrides),
                              train_rows=table6.KUAIRAND_PURE_TRAIN_ROWS)
  assert tuple(space) == expected
  for name, grid in space.items():
    assert grid == {**table6.TABLE6, **table6.OWN_KNOBS}[name]
    assert _config()[name] in grid or name == 'tau_decay_steps', name   # defaults included


def test_tau_grid_scales_with_the_training_rows():
  """Hillstrom's 51,200 training rows: tau_d's grid times 51,200 / 948,847 (docs/design.md)."""
  config = _config()
  assert config.tau_grid_scale == 0
  assert table6.search_space(config, ['tau_decay_steps'], train_rows=51_200) == {
      'tau_decay_steps': (54, 270, 540, 809, 1079)}
  config.tau_grid_scale = 0.5
  assert table6.search_space(config, ['tau_decay_steps'])['tau_decay_steps'] == (
      500, 2500, 5000, 7500, 10000)
  config.tau_grid_scale = 0.0
  with pytest.raises(ConfigError, match='tau_grid_scale'):
    table6.search_space(config, ['tau_decay_steps'])


def test_search_space_subset_and_unknown_names():
  config = _config(model='shared_bottom')
  assert tuple(table6.search_space(config, ['l2', 'learning_rate'])) == ('learning_rate', 'l2')
  with pytest.raises(ConfigError, match='alpha'):
    table6.search_space(config, ['alpha'])


def test_docs_print_table6():
  """docs/tuning.md's search-space table is Table 6 as the code searches it."""
  with open(os.path.join(REPO, 'docs', 'tuning.md')) as f:
    doc = f.read()
  rows = dict(re.findall(r'^\| [^|]+ \| `(\w+)` \| ([^|]+) \|', doc, re.MULTILINE))
  searched = {**table6.TABLE6, **table6.OWN_KNOBS}
  assert set(rows) == set(searched)
  for name, grid in searched.items():
    assert [float(v) for v in rows[name].split(',')] == [float(v) for v in grid], name


def test_objective_metric_and_direction():
  assert selection(_config()).name == 'nrmse'
  assert selection(_config(head='ziln')).name == 'gini'
  assert selection(_config(best_metric='nmae', head='ziln')).name == 'nmae'
  assert selection(_config()).direction == 'minimize'
  assert selection(_config(head='ziln')).direction == 'maximize'


def test_trial_plan_keeps_examples_per_evaluation():
  base = _config(max_steps=1000, eval_every=100, checkpoint_every=100)   # batch 512
  plan = tuning.trial_plan(base, {'batch_size': 2048, 'learning_rate': 0.01})
  assert plan.config.batch_size == 2048 and plan.config.learning_rate == 0.01
  assert (plan.config.eval_every, plan.config.checkpoint_every, plan.config.max_steps) == (
      25, 25, 250)
  assert plan.config.selection == 'core' and plan.trial_seeds == 1
  assert [plan.report_step(s) for s in (25, 50, 60)] == [1, 2, 3]
  assert base.batch_size == 512 and base.eval_every == 100       # base untouched
  assert [c.seed for c in tuning.trial_plan(base, {}, trial_seeds=3).configs()] == [0, 1, 2]


def _sample(sampler, study, trials: int) -> list:
  def objective(trial):
    return trial.suggest_categorical('x', list(range(1000))) + trial.suggest_float('y', 0, 1)
  study.sampler = sampler
  study.optimize(objective, n_trials=trials)
  return [t.params for t in study.trials]


def test_sampler_seeds_per_trial_number():
  one = _sample(study_lib.TrialSeededTPESampler(7), optuna.create_study(), 4)
  assert one == _sample(study_lib.TrialSeededTPESampler(7), optuna.create_study(), 4)
  assert one != _sample(study_lib.TrialSeededTPESampler(8), optuna.create_study(), 4)
  # Two processes on one study: each draws from its trial's number, not from its own
  # generator, so the second process does not repeat the first one's startup draws.
  shared = optuna.create_study()
  first = _sample(study_lib.TrialSeededTPESampler(7), shared, 2)
  both = _sample(study_lib.TrialSeededTPESampler(7), shared, 2)
  assert both[:2] == first and both[2:] == one[2:]


def test_stored_study_of_another_config_is_refused(tmp_path):
  storage = optuna.storages.RDBStorage(f'sqlite:///{tmp_path}/optuna.db')
  base = _config(model='shared_bottom')
  space = table6.search_space(base)
  tuning.open_study(base, storage, study_name='s', space=space)
  tuning.open_study(_config(model='shared_bottom', cache_dir='/elsewhere'), storage,
                    study_name='s', space=space)          # machine-local paths may differ
  with pytest.raises(ConfigError, match='num_epochs'):
    tuning.open_study(_config(model='shared_bottom', num_epochs=2), storage, study_name='s',
                      space=space)


# ----------------------------------------------------------------------------- pruning


def test_hopeless_trial_is_pruned(cache_dir, tmp_path, monkeypatch):
  # Two good trials (learning rate 1e-2) complete; then one at 1e-5, all with 40 steps.
  monkeypatch.setitem(table6.TABLE6, 'learning_rate', (1e-5, 1e-2))
  base = tiny_config(cache_dir, model='shared_bottom', max_steps=40, eval_every=10)
  storage = optuna.storages.RDBStorage(f'sqlite:///{tmp_path}/optuna.db')
  study = tuning.open_study(base, storage, study_name='prune',
                            space=table6.search_space(base, ['learning_rate']))
  for rate in (1e-2, 1e-2, 1e-5):
    study.enqueue_trial({'learning_rate': rate})
  summary = tuning.run_study(base, str(tmp_path), storage, tuning.StudyOptions(
      n_trials=3, study_name='prune', params=('learning_rate',), pruner_startup_trials=2,
      pruner_warmup_evals=1))
  good, _, hopeless = study.get_trials()
  assert [t.state.name for t in study.get_trials()] == ['COMPLETE', 'COMPLETE', 'PRUNED']
  assert summary['counts']['PRUNED'] == 1 and summary['best']['trial'] == 0
  assert list(good.intermediate_values) == [1, 2, 3, 4]
  assert list(hopeless.intermediate_values) == [1, 2]    # stopped after its warm-up
  assert hopeless.intermediate_values[2] > good.intermediate_values[2]
  assert not os.path.exists(tmp_path / 'trials' / '2' / 'seed0' / 'metrics.json')
  assert good.user_attrs['stop'] in ('cap', 'early_stopping')
  assert hopeless.user_attrs['stop'] == 'pruned'


# ----------------------------------------------------------------------------- command line


def _tune_command(workdir, cache_dir: str, trials: int, storage: str = '') -> list[str]:
  overrides = [flag for flag in cli_overrides(cache_dir)
               if not flag.startswith(('--config.max_steps', '--config.eval_every',
                                       '--config.checkpoint_every', '--config.patience'))]
  return [sys.executable, '-m', 'experiments.tune', f'--config=configs/kuairand.py:{TINY_ARG}',
          *overrides, '--config.max_steps=160', '--config.eval_every=20',
          '--config.checkpoint_every=20', '--config.patience=100', '--model=shared_bottom',
          f'--trials={trials}',
          f'--workdir={workdir}', '--params=learning_rate', '--pruner_startup_trials=1000',
          *([f'--storage={storage}'] if storage else [])]


@pytest.fixture(scope='module')
def tune_env(tmp_path_factory) -> dict[str, str]:
  """Subprocess environment: a JAX compilation cache shared by the module's processes."""
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': cache,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0', 'HTL_JAX_HEARTBEAT_SECONDS': '1'}


def _start(command: list[str], env: dict, log_path) -> subprocess.Popen:
  with open(log_path, 'w') as log:       # the child keeps its own copy of the descriptor
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _trial_states(db_path) -> dict[int, str]:
  if not os.path.exists(db_path):
    return {}
  try:
    with sqlite3.connect(db_path, timeout=5) as db:
      return dict(db.execute('SELECT number, state FROM trials').fetchall())
  except sqlite3.OperationalError:        # tables not created yet, or locked
    return {}


def _saved_steps(run_dir) -> list[int]:
  """Steps of the finished checkpoints in ``run_dir/checkpoints/latest``."""
  try:
    return [int(name) for name in os.listdir(run_dir / 'checkpoints' / 'latest')
            if name.isdigit()]
  except FileNotFoundError:
    return []


def _wait(process: subprocess.Popen, log_path, timeout: float = 300) -> str:
  try:
    process.wait(timeout=timeout)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  with open(log_path) as f:
    output = f.read()
  assert process.returncode == 0, output[-3000:]
  logs = re.search(r'^logs: (.*)$', output, re.M)          # the library's logs
  if logs:
    with open(logs.group(1)) as f:
      output += f.read()
  return output


def _load_study(storage) -> optuna.Study:
  return optuna.load_study(study_name='kuairand-sample-shared_bottom', storage=storage)


def test_killed_study_resumes_and_reaches_its_trials(cache_dir, tmp_path, tune_env):
  workdir = tmp_path / 'tune'
  db = workdir / 'optuna.db'
  command = _tune_command(workdir, cache_dir, trials=3)
  first = _start(command, tune_env, tmp_path / 'first.log')
  deadline = time.time() + 300
  # Kill it (SIGKILL) once trial 0 has completed and trial 1 has saved a checkpoint.
  while time.time() < deadline and first.poll() is None:
    states = _trial_states(db)
    if (states.get(0) == 'COMPLETE' and states.get(1) == 'RUNNING'
        and _saved_steps(workdir / 'trials' / '1' / 'seed0')):
      os.killpg(first.pid, signal.SIGKILL)
      break
    time.sleep(0.05)
  first.wait(timeout=60)
  assert first.returncode == -signal.SIGKILL, open(tmp_path / 'first.log').read()[-3000:]
  finished_0 = os.path.getmtime(workdir / 'trials' / '0' / 'seed0' / 'metrics.json')

  output = _wait(_start(command, tune_env, tmp_path / 'second.log'), tmp_path / 'second.log')
  study = _load_study(f'sqlite:///{db}')
  states = [t.state.name for t in study.trials]
  assert states[:2] == ['COMPLETE', 'FAIL'] and states.count('COMPLETE') == 3, states
  # The retry of trial 1: trial 2, or trial 3 when the restarted process began a fresh trial
  # before the killed one's heartbeat went stale (it cannot tell a dead process from a slow
  # one until then).
  retries = [t for t in study.trials if tuning.retry_origin(t) == 1]
  assert len(retries) == 1 and retries[0].state.name == 'COMPLETE', states
  retry = retries[0]
  assert retry.user_attrs['run_dir'] == os.path.join('trials', '1')     # same run dir...
  assert retry.params == study.trials[1].params
  assert 'resumed from step' in output                                   # ...resumed
  assert retry.user_attrs['steps'] == 160
  assert os.path.getmtime(workdir / 'trials' / '0' / 'seed0' / 'metrics.json') == finished_0
  with open(workdir / 'trials' / '1' / 'seed0' / 'metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == list(range(20, 161, 20))              # no evaluation lost or repeated

  with open(workdir / 'best.json') as f:
    best = json.load(f)
  best_trial = study.best_trial
  assert best['model'] == 'shared_bottom' and best['metric'] == 'nrmse'
  assert best['overrides'] == best_trial.params and best['value'] == best_trial.value
  assert best['valid']['watch_time']['nrmse'] == pytest.approx(best_trial.value)
  with open(workdir / 'trials.csv') as f:
    rows = list(csv.DictReader(f))
  assert [row['state'] for row in rows] == states
  assert {'number', 'value', 'params_learning_rate', 'intermediate_values'} <= set(rows[0])


def test_a_preempted_worker_marks_its_trial_for_an_immediate_retry(cache_dir, tmp_path,
                                                                   tune_env):
  """SIGTERM in trial 1: the worker saves, marks the trial FAIL with a WAITING retry (no
  heartbeat to wait for) and exits 75; the same command resumes the trial at once."""
  workdir = tmp_path / 'tune'
  db = workdir / 'optuna.db'
  env = {**tune_env, 'HTL_JAX_HEARTBEAT_SECONDS': '600'}      # staleness would take 20 min
  command = _tune_command(workdir, cache_dir, trials=2)
  first = _start(command, env, tmp_path / 'first.log')
  deadline = time.time() + 300
  while time.time() < deadline and first.poll() is None:
    if (_trial_states(db).get(1) == 'RUNNING'
        and _saved_steps(workdir / 'trials' / '1' / 'seed0')):
      os.killpg(first.pid, signal.SIGTERM)
      break
    time.sleep(0.05)
  first.wait(timeout=120)
  assert first.returncode == 75, open(tmp_path / 'first.log').read()[-3000:]
  assert _trial_states(db) == {0: 'COMPLETE', 1: 'FAIL', 2: 'WAITING'}
  started = time.time()
  output = _wait(_start(command, env, tmp_path / 'second.log'), tmp_path / 'second.log')
  assert time.time() - started < 300
  study = _load_study(f'sqlite:///{db}')
  assert [t.state.name for t in study.trials] == ['COMPLETE', 'FAIL', 'COMPLETE']
  assert tuning.retry_origin(study.trials[2]) == 1
  assert 'retry of trial 1, resuming' in output and 'resumed from step' in output


def _two_processes(workdir, cache_dir: str, tmp_path, env: dict, storage: str,
                   trials: int = 4) -> None:
  command = _tune_command(workdir, cache_dir, trials=trials, storage=storage)
  processes = [_start(command, env, tmp_path / f'worker{i}.log') for i in range(2)]
  try:
    for i, process in enumerate(processes):
      _wait(process, tmp_path / f'worker{i}.log')
  finally:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  rdb = optuna.storages.RDBStorage(storage or f'sqlite:///{workdir}/optuna.db')
  try:
    found = _load_study(rdb).trials
  finally:
    rdb.engine.dispose()            # its connections closed now, not at some later GC
  trials_run = [t for t in found if not t.user_attrs.get('surplus')]
  assert [t.state.name for t in trials_run] == ['COMPLETE'] * trials
  run_dirs = [t.user_attrs['run_dir'] for t in trials_run]
  assert len(set(run_dirs)) == trials                      # no trial ran twice
  assert len({t.user_attrs['pid'] for t in trials_run}) == 2  # both processes worked
  for run_dir in run_dirs:
    with open(workdir / run_dir / 'seed0' / 'metrics.jsonl') as f:
      assert [json.loads(line)['step'] for line in f] == list(range(20, 161, 20))


def test_two_processes_share_a_sqlite_study(cache_dir, tmp_path, tune_env):
  _two_processes(tmp_path / 'tune', cache_dir, tmp_path, tune_env, storage='')


def test_two_processes_share_a_postgresql_study(cache_dir, tmp_path, tune_env, postgres_url):
  _two_processes(tmp_path / 'tune', cache_dir, tmp_path, tune_env, storage=postgres_url)


def test_cli_bad_params_is_one_line(cache_dir, tmp_path, tune_env):
  command = _tune_command(tmp_path / 'tune', cache_dir, trials=1) + ['--params=alpha']
  result = subprocess.run(command, cwd=REPO, env=tune_env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: cannot search alpha')
  assert 'Traceback' not in result.stderr

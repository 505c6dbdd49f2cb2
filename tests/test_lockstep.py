"""A multi-process worker of ``experiments.reproduce`` and ``experiments.tune`` (lockstep).

Two processes x 1 CPU device on 127.0.0.1 (``jax.distributed``, gloo) act as ONE worker: the
primary takes the cells / trials from Optuna and the other trains each one with it. The
results must equal a single process's with the same global batch, and only the primary
writes the report.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import REPO, TINY_ARG, cli_overrides
from htl_jax.train import parallel

_TIMEOUT = 600
_REPRODUCE = ['-m', 'experiments.reproduce', '--experiment=table3', '--variants=HTLNet',
              '--seeds=2']
_TUNE = ['-m', 'experiments.tune', '--model=shared_bottom', '--trials=2',
         '--params=learning_rate', '--pruner_startup_trials=1', '--pruner_warmup_evals=0']


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(program: list[str], workdir: str, cache_dir: str, log: str, env: dict,
           process: tuple[int, int] | None = None) -> subprocess.Popen:
  args = [*program, f'--workdir={workdir}', f'--config=configs/kuairand.py:{TINY_ARG}',
          *cli_overrides(cache_dir), '--config.grad_process=htl']
  if process is not None:
    port, index = process
    args += [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={index}']
  with open(log, 'w') as out:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, log: str) -> str:
  try:
    process.wait(timeout=_TIMEOUT)
  finally:
    if process.poll() is None:
      process.kill()
  with open(log) as f:
    output = f.read()
  assert process.returncode == 0, output[-3000:]
  return output


def _worker_and_reference(program: list[str], root: str, name: str, cache_dir: str,
                          env: dict) -> dict[str, object]:
  """Runs ``program`` as one 2-process worker and, meanwhile, as one plain process."""
  port = _free_port()
  group_dir, single_dir = os.path.join(root, f'{name}_group'), os.path.join(root,
                                                                           f'{name}_single')
  logs = [os.path.join(root, f'{name}_{i}.txt') for i in range(3)]
  launches = [_start(program, group_dir, cache_dir, logs[i], env, (port, i)) for i in range(2)]
  launches.append(_start(program, single_dir, cache_dir, logs[2], env))
  outputs = [_wait(p, log) for p, log in zip(launches, logs)]
  return {'group': group_dir, 'single': single_dir, 'outputs': outputs}


@pytest.fixture(scope='module')
def workers(tmp_path_factory, cache_dir):
  root = str(tmp_path_factory.mktemp('lockstep'))
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_'))}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             HTL_JAX_HEARTBEAT_SECONDS='1',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return {'reproduce': _worker_and_reference(_REPRODUCE, root, 'reproduce', cache_dir, env),
          'tune': _worker_and_reference(_TUNE, root, 'tune', cache_dir, env)}


def _rows(path: str, drop: tuple[str, ...]) -> list[dict[str, str]]:
  with open(path) as f:
    return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _assert_same_rows(a: list[dict], b: list[dict], is_value) -> None:
  """Equal rows; the keys where ``is_value(key)`` may differ by float rounding."""
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert {k: v for k, v in x.items() if not is_value(k)} == {
        k: v for k, v in y.items() if not is_value(k)}
    for key in filter(is_value, x):
      if x[key] in ('', 'None') or y[key] in ('', 'None'):
        assert x[key] == y[key]
      else:
        assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-4, abs=1e-6), (key, x, y)


def test_reproduce_worker_of_two_processes_equals_one_process(workers):
  run = workers['reproduce']
  group = _rows(os.path.join(run['group'], 'results.csv'), ('train_seconds_per_epoch',))
  single = _rows(os.path.join(run['single'], 'results.csv'), ('train_seconds_per_epoch',))
  _assert_same_rows(group, single, lambda key: key == 'value')
  primary, follower, _ = run['outputs']
  summary = 'table3: 2 of 2 runs in the table'      # the primary's last line on stdout
  assert summary in primary and summary not in follower
  assert 'jax.distributed: process 1 of 2' in follower
  for seed in (0, 1):            # the follower trained every cell with the primary
    assert f'running HTLNet|seed{seed}' in follower
  with sqlite3.connect(os.path.join(run['group'], 'optuna.db')) as db:
    states = [s for (s,) in db.execute(
        "SELECT trials.state FROM trials JOIN studies USING (study_id) "
        "WHERE studies.study_name LIKE 'reproduce:%'")]
  assert states.count('COMPLETE') == 2, states     # (the Delta_m reference has its own)


def test_tune_worker_of_two_processes_equals_one_process(workers):
  run = workers['tune']
  drop = ('datetime_start', 'datetime_complete', 'duration', 'user_attrs_host',
          'user_attrs_pid', 'user_attrs_train_seconds', 'user_attrs_seed_values')
  group = _rows(os.path.join(run['group'], 'trials.csv'), drop)
  single = _rows(os.path.join(run['single'], 'trials.csv'), drop)
  for rows in (group, single):      # every evaluation was reported, in order
    for row in rows:
      reported = json.loads(row.pop('intermediate_values'))
      row.update({f'eval_{k}': str(v) for k, v in reported.items()})
  _assert_same_rows(group, single, lambda key: key == 'value' or key.startswith('eval_'))
  # With --pruner_startup_trials=1 the second trial is pruned after its first evaluation:
  # the follower stopped at the same step as the primary (else the run would hang or fail).
  assert [row['state'] for row in group] == ['COMPLETE', 'PRUNED']
  assert not os.path.exists(os.path.join(run['group'], 'optuna.db-journal'))
  assert os.path.exists(os.path.join(run['group'], 'trials', '0', 'seed0', 'metrics.json'))


def test_broadcast_json_with_one_process_is_the_identity():
  assert parallel.process_count() == 1
  message = {'run': {'cell': 'HTLNet|seed0', 'params': {'learning_rate': 1e-3}}}
  assert parallel.broadcast_json(message) is message

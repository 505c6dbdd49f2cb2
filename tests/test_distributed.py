"""Many processes on the loopback interface: same run as one process, failures, resume.

One module-scoped set of runs of the tiny HTLNet config (``conftest.TINY_OVERRIDES``,
``grad_process=htl``, 8 steps, same global batch and seed), shared by the assertions:

- 1 process x 1 device (in this process),
- 1 process x 2 devices (``XLA_FLAGS``) and 2 processes x 1 device (``jax.distributed``
  on 127.0.0.1 with CPU gloo collectives), subprocesses of ``experiments.main``, at once;
- 2 processes x 1 device where process 1 is killed (SIGKILL, injected by this test) right
  after its step-4 checkpoint; then both restarted, this time as the 2 tasks of a
  simulated SLURM ``srun`` step with no distributed flags (JAX's auto-detection);
- 2 processes x 1 device where process 1 alone gets SIGTERM mid-run (its own test): both
  stop at one step with a checkpoint, and the same command resumes them.

Start-up decisions (flags, cluster detection) and the per-process batch parts are tested
directly, without launching anything.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_ARG, cli_overrides, tiny_config
from htl_jax.data import load_dataset, pipeline
from htl_jax.data.schema import Split
from htl_jax.errors import ConfigError, PreemptedError
from htl_jax.losses import CoreTransform
from htl_jax.runtime import distributed
from htl_jax.train import loop as loop_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.state import init_state, make_setup

_HEARTBEAT_TIMEOUT = 30         # seconds; the bound on how long a survivor may wait
_TIMEOUT = 600                  # seconds for any launch to finish (a hang fails the test)
_CLUSTER_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID',
                      'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'OMPI_MCA_orte_hnp_uri',
                      'OMPI_COMM_WORLD_SIZE', 'KUBERNETES_SERVICE_HOST',
                      'JOB_COMPLETION_INDEX', 'JAX_COORDINATOR_ADDRESS',
                      'JAX_COORDINATOR_PORT')
# Runs experiments.main with Checkpoints.save_latest patched to SIGKILL the process right
# after it saved step {step}: a process dying mid-run, at a known point.
_DIE_AFTER_CHECKPOINT = '''
import os, runpy, signal, sys
from htl_jax.train import checkpoint
save_latest = checkpoint.Checkpoints.save_latest
def save_latest_then_die(self, step, state, loop):
  save_latest(self, step, state, loop)
  if step >= {step}:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpoints.save_latest = save_latest_then_die
sys.argv = ['experiments.main'] + sys.argv[1:]
runpy.run_module('experiments.main', run_name='__main__', alter_sys=True)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Launch:
  """One ``experiments.main`` subprocess with its output in a file."""

  def __init__(self, workdir: str, cache_dir: str, log: str, *, devices: int = 1,
               process: tuple[int, int, int] | None = None, die_after: int | None = None,
               slurm: bool = False, flags: tuple[str, ...] = ()):
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARIABLES}
    env.update(JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    args = [f'--config=configs/kuairand.py:{TINY_ARG}', f'--workdir={workdir}',
            *cli_overrides(cache_dir), '--config.grad_process=htl',
            f'--heartbeat_timeout={_HEARTBEAT_TIMEOUT}', *flags]
    if process is not None and slurm:    # what srun sets for task `index` on one node
      port, index, count = process
      env.update(SLURM_JOB_ID='1', SLURM_STEP_NODELIST='localhost', SLURM_NTASKS=str(count),
                 SLURM_STEP_NUM_TASKS=str(count), SLURM_PROCID=str(index),
                 SLURM_LOCALID=str(index), JAX_COORDINATOR_PORT=str(port))
    elif process is not None:
      port, index, count = process
      args += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={count}',
               f'--process_id={index}']
    program = (['-c', _DIE_AFTER_CHECKPOINT.format(step=die_after)] if die_after
               else ['-m', 'experiments.main'])
    self.log = log
    with open(log, 'w') as out:    # a file, not a pipe that could fill up and block
      self.proc = subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)

  def wait(self) -> tuple[int, str]:
    try:
      code = self.proc.wait(timeout=_TIMEOUT)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    with open(self.log) as f:
      return code, f.read()


def _two_processes(workdir, cache_dir, root, name, die_after=None, slurm=False, flags=()
                   ) -> list[_Launch]:
  port = _free_port()
  return [_Launch(workdir, cache_dir, os.path.join(root, f'{name}{i}.txt'),
                  process=(port, i, 2), die_after=die_after if i == 1 else None, slurm=slurm,
                  flags=flags)
          for i in range(2)]


def _latest_state(config, workdir):
  data = load_dataset(config, config.cache_dir)
  setup = make_setup(config, data.spec, CoreTransform.fit(config.core_transform,
                                                          data.train.core))
  ckpt = Checkpoints(workdir, 'min')
  state, _ = ckpt.restore_latest(init_state(setup, config))
  ckpt.close()
  return state


def _metrics(workdir):
  """metrics.json without its wall-clock training time."""
  with open(os.path.join(workdir, 'metrics.json')) as f:
    result = json.load(f)
  assert result.pop('train_seconds') > 0
  return result


def _jsonl_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, cache_dir):
  """name -> workdir (and exit codes and outputs) of every run described in the doc."""
  root = str(tmp_path_factory.mktemp('distributed'))
  work = {name: os.path.join(root, name) for name in ('one', 'two_devices', 'two_processes',
                                                      'crash')}
  config = tiny_config(cache_dir, grad_process='htl')
  # Fill the data cache first, so the subprocesses below do not all build it.
  load_dataset(config, cache_dir)
  launches = {'two_devices': [_Launch(work['two_devices'], cache_dir,
                                      os.path.join(root, 'two_devices.txt'), devices=2)],
              'two_processes': _two_processes(work['two_processes'], cache_dir, root, 'p')}
  assert jax.local_device_count() == 1
  loop_lib.train_and_evaluate(config, work['one'])     # meanwhile, 1 process x 1 device
  done = {name: [launch.wait() for launch in group] for name, group in launches.items()}
  crash = _two_processes(work['crash'], cache_dir, root, 'crash', die_after=4)
  done['crash'] = [launch.wait() for launch in crash]
  done['crash_latest'] = _latest_state(config, work['crash'])
  restart = _two_processes(work['crash'], cache_dir, root, 'restart', slurm=True)
  done['restart'] = [launch.wait() for launch in restart]
  return config, work, done


def test_two_processes_and_two_devices_run(runs):
  _, _, done = runs
  for name, expected in (('two_devices', '2 device(s) in 1 process(es)'),
                         ('two_processes', '2 device(s) in 2 process(es)')):
    for code, output in done[name]:
      assert code == 0, output[-3000:]
      assert expected in output


def test_same_parameters_after_n_steps(runs):
  config, work, _ = runs
  one = _latest_state(config, work['one'])
  assert int(one.step) == 8
  for name in ('two_devices', 'two_processes'):
    other = _latest_state(config, work[name])
    assert int(other.step) == 8
    assert float(other.tau) == float(one.tau)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(other.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_same_metrics_json(runs):
  """Same valid/test metrics: evaluation covers every row once, whoever predicts it."""
  _, work, _ = runs
  one = _metrics(work['one'])
  for name in ('two_devices', 'two_processes'):
    other = _metrics(work[name])
    assert (other['best_step'], other['steps']) == (one['best_step'], one['steps'])
    for split in ('valid', 'test'):
      for task, values in one[split].items():
        assert other[split][task].keys() == values.keys()
        for metric, value in values.items():
          assert other[split][task][metric] == pytest.approx(value, rel=1e-3, abs=1e-4)


def test_only_the_primary_writes(runs):
  _, work, _ = runs
  # Two writers would append every line twice.
  assert _jsonl_steps(work['two_processes']) == _jsonl_steps(work['one']) == [4, 8]
  with open(os.path.join(work['two_processes'], 'config.json')) as f:
    assert json.load(f)['grad_process'] == 'htl'


def test_dead_process_stops_the_other_with_one_error(runs):
  _, _, done = runs
  (code_0, output_0), (code_1, _) = done['crash']
  assert code_1 == -9                        # killed after its step-4 checkpoint
  assert code_0 == distributed.PEER_FAILURE_EXIT_CODE, output_0[-3000:]
  errors = [line for line in output_0.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, output_0[-3000:]
  assert 'process 0 of 2 lost contact with another process' in errors[0]
  assert 'Restart every process' in errors[0]
  assert 'Traceback' not in output_0
  assert int(done['crash_latest'].step) == 4


def test_restart_under_srun_resumes_from_the_last_checkpoint(runs):
  _, work, done = runs
  for i, (code, output) in enumerate(done['restart']):
    assert code == 0, output[-3000:]
    assert f'jax.distributed: process {i} of 2 (slurm)' in output
    assert 'resumed from step 4' in output
  assert _jsonl_steps(work['crash']) == [4, 8]
  assert _metrics(work['crash']) == _metrics(work['two_processes'])


def test_sigterm_to_one_process_stops_all_at_one_step_and_they_resume(tmp_path, cache_dir):
  """JAX's preemption sync: SIGTERM reaches process 1 only; both processes save the same
  step and exit 75; the same command resumes them to the metrics of an uninterrupted run."""
  flags = ('--config.max_steps=40',)
  config = tiny_config(cache_dir, grad_process='htl', max_steps=40)
  loop_lib.train_and_evaluate(config, str(tmp_path / 'one'))
  workdir = str(tmp_path / 'run')
  first = _two_processes(workdir, cache_dir, str(tmp_path), 'term', flags=flags)
  deadline = time.monotonic() + _TIMEOUT
  while not os.path.exists(os.path.join(workdir, 'checkpoints', 'latest', '4')):
    assert time.monotonic() < deadline and first[1].proc.poll() is None
    time.sleep(0.05)
  first[1].proc.send_signal(signal.SIGSTOP)     # the signal arrives mid-run, not after it
  first[1].proc.send_signal(signal.SIGTERM)
  first[1].proc.send_signal(signal.SIGCONT)
  stopped = [launch.wait() for launch in first]
  steps = set()
  for code, output in stopped:
    assert code == PreemptedError.exit_code, output[-3000:]
    line = [line for line in output.splitlines() if line.startswith('error:')][-1]
    assert line.startswith('error: SIGTERM: stopped after step '), line
    steps.add(int(line.split('stopped after step ')[1].split()[0]))
  (step,) = steps                                # the same step in both processes
  assert 4 <= step < 40
  assert int(_latest_state(config, workdir).step) == step
  again = [launch.wait() for launch in _two_processes(workdir, cache_dir, str(tmp_path),
                                                      'again', flags=flags)]
  for code, output in again:
    assert code == 0, output[-3000:]
    assert f'resumed from step {step}' in output
  one, resumed = _metrics(str(tmp_path / 'one')), _metrics(workdir)
  assert (resumed['best_step'], resumed['steps']) == (one['best_step'], one['steps'])
  for split in ('valid', 'test'):
    for task, values in one[split].items():
      for metric, value in values.items():
        assert resumed[split][task][metric] == pytest.approx(value, rel=1e-3, abs=1e-4)


# ----------------------------------------------------------------------- without launches


@pytest.fixture
def no_cluster(monkeypatch):
  for name in _CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_detected_cluster(no_cluster):
  assert distributed.detected_cluster() is None
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_PROCID': '1',
           'SLURM_LOCALID': '0'}
  for name, value in slurm.items():
    no_cluster.setenv(name, value)
  no_cluster.setenv('SLURM_STEP_NUM_TASKS', '1')     # srun -n 1: one plain process
  assert distributed.detected_cluster() is None
  no_cluster.setenv('SLURM_STEP_NUM_TASKS', '2')
  assert distributed.detected_cluster() == 'slurm'
  no_cluster.delenv('SLURM_STEP_NODELIST')            # an sbatch script outside srun
  assert distributed.detected_cluster() is None
  no_cluster.setenv('OMPI_MCA_orte_hnp_uri', '1531576320.0;tcp://10.0.0.1:34911')
  no_cluster.setenv('OMPI_COMM_WORLD_SIZE', '2')
  assert distributed.detected_cluster() == 'ompi'
  no_cluster.delenv('OMPI_MCA_orte_hnp_uri')
  no_cluster.setenv('KUBERNETES_SERVICE_HOST', '10.0.0.1')   # any pod: not a cluster run
  assert distributed.detected_cluster() is None
  no_cluster.setenv('JOB_COMPLETION_INDEX', '0')              # a pod of an indexed Job
  assert distributed.detected_cluster() == 'k8s'


def test_initialize_decisions(no_cluster):
  assert distributed.initialize() is False            # a plain single-process run
  assert distributed.initialize(num_processes=1) is False
  assert not distributed.is_multiprocess()
  with pytest.raises(ConfigError, match='--num_processes, --process_id'):
    distributed.initialize(coordinator_address='127.0.0.1:1234')
  with pytest.raises(ConfigError, match=r'in \[0, 2\)'):
    distributed.initialize('127.0.0.1:1234', 2, 2)
  with pytest.raises(ConfigError, match='--num_processes=1'):
    distributed.initialize(num_processes=1, process_id=1)


def test_batch_parts_make_the_whole_batch():
  n = 11
  split = Split(np.arange(n, dtype=np.int32)[:, None], np.zeros((n, 1), np.float32),
                np.arange(n, dtype=np.float32))
  for shuffle, drop in ((True, True), (False, False)):   # train, and padded evaluation
    kwargs = dict(shuffle=shuffle, seed=3, epoch=1, drop_remainder=drop)
    whole = list(pipeline.batches(split, 4, **kwargs))
    parts = [list(pipeline.batches(split, 4, part=(p, 2), **kwargs)) for p in range(2)]
    for b, batch in enumerate(whole):
      for key, value in batch.items():
        np.testing.assert_array_equal(
            np.concatenate([parts[0][b][key], parts[1][b][key]]), value)
  with pytest.raises(ValueError, match='part 0 of 3'):
    next(pipeline.batches(split, 4, part=(0, 3), **kwargs))

"""Faults a real user meets (docs/design.md): real processes, real signals, real files.

- one owner per workdir: a second process stops with one line (exit 2), the first is
  unaffected, and a holder killed with SIGKILL never blocks the restart;
- SIGTERM / SIGINT: the run saves a checkpoint and exits 75; the same command resumes it
  to the metrics of an uninterrupted run;
- a damaged checkpoint is set aside and the newest readable one used (the same metrics as
  an uninterrupted run when the latest was damaged); none readable: one line, exit 2;
- a checkpoint save that fails for lack of space is one line, and the previous checkpoint
  stays readable (a small tmpfs; skipped where none can be mounted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_ARG, cli_overrides, tiny_config
from htl_jax.errors import RunError, WorkdirBusyError
from htl_jax.serve.run import load_run
from htl_jax.train import loop as loop_lib
from htl_jax import run_files


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted tiny run (8 steps, evaluations at 4 and 8) every fault compares to."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  config = tiny_config(cache_dir)
  return config, workdir, loop_lib.train_and_evaluate(config, workdir)


def _main(workdir: str, cache_dir: str, *flags: str, log: str = '') -> subprocess.Popen:
  """``experiments.main`` on the tiny config, output in ``log`` (``<workdir>.log``)."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  with open(log or workdir + '.log', 'w') as output:      # the child keeps its own copy
    return subprocess.Popen(
        [sys.executable, '-m', 'experiments.main',
         f'--config=configs/kuairand.py:{TINY_ARG}', f'--workdir={workdir}',
         *cli_overrides(cache_dir), *flags],
        cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def _output(workdir: str, log: str = '') -> str:
  with open(log or workdir + '.log') as f:
    return f.read()


def _wait_for(predicate, timeout: float = 300.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError('condition not reached')
    time.sleep(0.05)


def _holds_lock(workdir: str, pid: int) -> bool:
  try:
    with open(os.path.join(workdir, run_files.LOCK)) as f:
      return f'pid {pid}' in f.read()
  except OSError:
    return False


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


# ----------------------------------------------------------------------------- one owner


def test_a_second_run_on_a_busy_workdir_stops_and_the_first_is_unaffected(reference,
                                                                          tmp_path):
  config, _, result = reference
  workdir = str(tmp_path / 'run')
  first = _main(workdir, config.cache_dir)
  try:
    _wait_for(lambda: _holds_lock(workdir, first.pid))
    first.send_signal(signal.SIGSTOP)          # hold it mid-run while the second starts
    second_log = str(tmp_path / 'second.log')
    second = _main(workdir, config.cache_dir, log=second_log)
    assert second.wait(timeout=300) == 2
    line = _last_line(_output(workdir, second_log))
    assert line.startswith('error: ') and workdir in line
    assert f'pid {first.pid}' in line and 'in use' in line
  finally:
    first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=300) == 0
  assert run_files.read_metrics(workdir)['test'] == result['test']
  with open(os.path.join(workdir, run_files.METRICS_LOG)) as f:
    assert [json.loads(line)['step'] for line in f] == [4, 8]      # no line twice


def test_the_lock_dies_with_its_holder(reference, tmp_path):
  """kill -9 the owner: the restart takes the workdir at once and resumes the run."""
  config, _, result = reference
  workdir = str(tmp_path / 'run')
  first = _main(workdir, config.cache_dir)
  _wait_for(lambda: _holds_lock(workdir, first.pid))
  first.kill()
  first.wait(timeout=60)
  with pytest.raises(WorkdirBusyError):       # a live holder is refused in-process too
    with run_files.owned(workdir):
      with run_files.owned(workdir):
        pass
  assert loop_lib.train_and_evaluate(tiny_config(config.cache_dir), workdir)['test'] == (
      result['test'])


# ----------------------------------------------------------------------------- preemption


@pytest.fixture(scope='module')
def long_reference(tmp_path_factory, cache_dir):
  """An uninterrupted 40-step run: long enough to be stopped in the middle."""
  workdir = str(tmp_path_factory.mktemp('long'))
  config = tiny_config(cache_dir, max_steps=40)
  return config, workdir, loop_lib.train_and_evaluate(config, workdir)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_saves_stops_with_75_and_the_same_command_resumes(long_reference, tmp_path,
                                                                   sig):
  config, _, result = long_reference
  workdir = str(tmp_path / 'run')
  first = _main(workdir, config.cache_dir, '--config.max_steps=40')
  _wait_for(lambda: os.path.exists(os.path.join(workdir, 'checkpoints', 'latest', '4')))
  first.send_signal(signal.SIGSTOP)        # the signal arrives mid-run, not after its end
  first.send_signal(sig)
  first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=300) == 75, _output(workdir)[-2000:]
  line = _last_line(_output(workdir))
  assert line.startswith(f'error: {sig.name}: stopped after step ')
  assert 'run the same command again to resume' in line
  assert run_files.read_metrics(workdir) is None            # not finished, files valid
  with open(os.path.join(workdir, run_files.METRICS_LOG)) as f:
    assert all(json.loads(line) for line in f)
  again = _main(workdir, config.cache_dir, '--config.max_steps=40')
  assert again.wait(timeout=300) == 0, _output(workdir)[-2000:]
  assert 'resumed from step' in _output(workdir)
  assert run_files.read_metrics(workdir)['test'] == result['test']


# ----------------------------------------------------------------------------- damage

# A restore or save that orbax abandons midway leaves TensorStore callbacks that fire on its
# closed asyncio loop ("Exception ignored"); they are noise here, not failures.
_ORBAX_ABANDONED = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _truncate_a_file(directory: str) -> None:
  """Cuts every data file of a checkpoint to half (a partial copy, a disk that filled):
  orbax spreads the arrays over its files differently from run to run."""
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and '_METADATA' not in name:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)


@_ORBAX_ABANDONED
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_ends_the_same(reference,
                                                                           tmp_path,
                                                                           caplog):
  config, done, result = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(done, workdir)
  os.remove(os.path.join(workdir, run_files.METRICS))    # as if it had died after step 8
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  assert sorted(os.listdir(latest)) == ['4', '8']
  _truncate_a_file(os.path.join(latest, '8'))
  resumed = loop_lib.train_and_evaluate(tiny_config(config.cache_dir), workdir)
  assert resumed['test'] == result['test']
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'damaged', 'latest-8'))
  assert any('checkpoint step 8' in r.getMessage() and 'does not read' in r.getMessage()
             for r in caplog.records)


@_ORBAX_ABANDONED
def test_no_readable_checkpoint_is_one_line_with_exit_2(reference, tmp_path):
  config, done, _ = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(done, workdir)
  os.remove(os.path.join(workdir, run_files.METRICS))
  for step in ('4', '8'):
    _truncate_a_file(os.path.join(workdir, 'checkpoints', 'latest', step))
  run = _main(workdir, config.cache_dir)
  assert run.wait(timeout=300) == 2
  line = _last_line(_output(workdir))
  assert line.startswith('error: ') and 'no checkpoint reads completely' in line
  assert os.path.join(workdir, 'checkpoints', 'latest') in line
  assert 'Traceback' not in _output(workdir)     # orbax's abandoned reads print nothing


@_ORBAX_ABANDONED
def test_a_damaged_best_checkpoint_gives_way_to_the_one_before(long_reference, tmp_path):
  """Prediction and export use the second best; with neither readable, one line."""
  _, done, _ = long_reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(done, workdir)
  best = os.path.join(workdir, 'checkpoints', 'best')
  steps = sorted(os.listdir(best), key=int)
  assert len(steps) == 2, steps           # the run improved at both evaluations
  _truncate_a_file(os.path.join(best, steps[-1]))
  assert load_run(workdir).best_step == int(steps[0])
  _truncate_a_file(os.path.join(best, steps[0]))
  with pytest.raises(RunError, match='no checkpoint reads completely'):
    load_run(workdir)


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs, or a skip where this machine cannot mount one."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})')
  yield str(mount)
  subprocess.run(['umount', '-l', str(mount)], check=False)


@_ORBAX_ABANDONED
def test_a_save_without_space_is_one_error_and_the_last_checkpoint_reads(reference,
                                                                         small_disk):
  config, _, result = reference
  workdir = os.path.join(small_disk, 'run')
  filler = os.path.join(small_disk, 'filler')

  def fill_the_disk(step: int, valid: dict) -> None:
    if step == 4:                 # leave room for the small files, none for a checkpoint
      stat = os.statvfs(small_disk)
      with open(filler, 'wb') as f:
        f.write(b'\0' * max(0, stat.f_bavail * stat.f_frsize - 16 * 1024))

  with pytest.raises(RunError, match='cannot save the checkpoint of step 8') as error:
    loop_lib.train_and_evaluate(tiny_config(config.cache_dir), workdir,
                                on_eval=fill_the_disk)
  assert 'the previous one (step 4) is intact' in str(error.value)
  os.remove(filler)
  resumed = loop_lib.train_and_evaluate(tiny_config(config.cache_dir), workdir)
  assert resumed['test'] == result['test']

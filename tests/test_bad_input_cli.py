"""Bad input through the command line: a clear one-line error, no traceback, nothing damaged.

Each case runs ``python -m experiments.main`` on a small bad CSV (or a bad config) with a
pre-existing workdir and cache dir, and checks the exit code, that the output ends with one
line naming the file, the column and the bad-row count, that no traceback is printed, and
that every file already in the workdir and the cache dir is byte-for-byte untouched. The
subprocesses run a few at a time, since each one pays the JAX import; so the data cases
are one per stage (file, parsing, values, split, config), and every other bad-cell case is
tested in-process in ``test_tabular.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PARALLEL = 4
_HEADER = 'user,item,price,click,buy,amount\n'
_COLUMNS = ['--config.data.categorical=user,item', '--config.data.numeric=price',
            '--config.data.tasks=click,buy', '--config.data.core=amount']

# name: (CSV text or None for no file, extra flags, texts the error line must contain).
# Data errors exit with 2 and print 'error: <file>: ...'.
DATA_CASES = {
    'missing_file': (None, [], ['missing_file.csv', 'file not found']),
    'non_numeric_label': (_HEADER + 'a,1,1,yes,0,0\nb,1,1,no,0,0\n', [],
                          ['non_numeric_label.csv', "'click'", '2 rows']),
    'inf_core': (_HEADER + 'a,1,1,1,1,inf\nb,1,1,1,1,-inf\n', [],
                 ['inf_core.csv', "'amount'", '2 rows']),
    'empty_split': (_HEADER + 'a,1,1,1,0,0\n' * 5, [], ['empty_split.csv', 'empty', '5 rows']),
    'missing_tasks': (_HEADER + 'a,1,1,1,0,0\n', ['--config.data.tasks='],
                      ['--config.data.tasks']),
}
# Config errors: any non-zero exit, a short message naming the culprit, no traceback.
CONFIG_CASES = {
    'unknown_key_argument': (':bogus_key=1', [], 'bogus_key'),
    'unknown_key_flag': ('', ['--config.bogus_key=1'], 'bogus_key'),
    'bad_value': ('', ['--config.batch_size=abc'], 'batch_size'),
}


def _prepopulate(workdir: str, cache_dir: str) -> None:
  """A workdir and a cache of an earlier run, which a failed run must leave alone."""
  os.makedirs(os.path.join(workdir, 'checkpoints', '100'))
  os.makedirs(os.path.join(cache_dir, 'abc123'))
  for path, text in [(os.path.join(workdir, 'metrics.jsonl'), '{"step": 100}\n'),
                     (os.path.join(workdir, 'checkpoints', '100', 'state'), 'weights'),
                     (os.path.join(cache_dir, 'abc123', 'spec.json'), '{}')]:
    with open(path, 'w') as f:
      f.write(text)


def _command(config_arg: str, data_path: str, flags: list[str], workdir: str,
             cache_dir: str) -> list[str]:
  return [sys.executable, '-m', 'experiments.main', f'--config=configs/tabular.py{config_arg}',
          f'--workdir={workdir}', f'--config.cache_dir={cache_dir}',
          f'--config.data.path={data_path}', *_COLUMNS, *flags]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs every case (a few at a time); name -> (returncode, output, dirs, snapshots)."""
  jobs = {}
  for name, (text, flags, _) in DATA_CASES.items():
    jobs[name] = ('', text, flags)
  for name, (config_arg, flags, _) in CONFIG_CASES.items():
    jobs[name] = (config_arg, _HEADER + 'a,1,1,1,0,0\n' * 20, flags)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  pending, running, results = list(jobs.items()), {}, {}
  while pending or running:
    while pending and len(running) < _PARALLEL:
      name, (config_arg, text, flags) = pending.pop(0)
      root = str(tmp_path_factory.mktemp(name))
      data_path = os.path.join(root, f'{name}.csv')
      if text is not None:
        with open(data_path, 'w') as f:
          f.write(text)
      workdir, cache_dir = os.path.join(root, 'workdir'), os.path.join(root, 'cache')
      _prepopulate(workdir, cache_dir)
      before = (snapshot(workdir), snapshot(cache_dir))
      log = os.path.join(root, 'output.txt')  # a file, not a pipe that could fill up
      with open(log, 'w') as output:
        process = subprocess.Popen(
            _command(config_arg, data_path, flags, workdir, cache_dir), cwd=REPO, env=env,
            stdout=output, stderr=subprocess.STDOUT)
      running[name] = (process, log, workdir, cache_dir, before)
    for name, (process, log, workdir, cache_dir, before) in list(running.items()):
      if process.poll() is not None:
        with open(log) as f:
          results[name] = (process.returncode, f.read(), (workdir, cache_dir), before)
        del running[name]
    time.sleep(0.05)
  return results


def _last_line(output: str) -> str:
  lines = [line for line in output.splitlines() if line.strip()]
  return lines[-1] if lines else ''


@pytest.mark.parametrize('name', sorted(DATA_CASES))
def test_data_error_is_one_clear_line(runs, name):
  returncode, output, _, _ = runs[name]
  assert returncode == 2, output
  assert 'Traceback' not in output
  line = _last_line(output)
  assert line.startswith('error: '), output
  for text in DATA_CASES[name][2]:
    assert text in line, line
  assert sum(line.startswith('error: ') for line in output.splitlines()) == 1


@pytest.mark.parametrize('name', sorted(CONFIG_CASES))
def test_config_error_is_clear(runs, name):
  returncode, output, _, _ = runs[name]
  assert returncode != 0, output
  assert 'Traceback' not in output, output
  assert CONFIG_CASES[name][2] in output


@pytest.mark.parametrize('name', sorted(DATA_CASES) + sorted(CONFIG_CASES))
def test_existing_workdir_and_cache_untouched(runs, name):
  _, output, (workdir, cache_dir), before = runs[name]
  assert (snapshot(workdir), snapshot(cache_dir)) == before, output


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  data_path = tmp_path / 'ok.csv'
  data_path.write_text(_HEADER + 'a,1,1,1,0,0\nb,2,2,0,0,0\n' * 20)
  workdir = tmp_path / 'notes.txt'
  workdir.write_text('my notes')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run(_command(':smoke=True', str(data_path), [], str(workdir),
                                 str(tmp_path / 'cache')),
                        cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == 2, done.stderr
  assert 'Traceback' not in done.stderr
  assert _last_line(done.stderr) == (
      f'error: --workdir {workdir} is an existing file, not a directory')
  assert workdir.read_text() == 'my notes'


def test_degenerate_split_writes_null_and_skips_it(tmp_path, caplog):
  """One class in every split (buy) and a constant core (amount): valid JSON with nulls."""
  import json
  from htl_jax.configs import tabular as tabular_config
  from htl_jax.train import loop as loop_lib

  rng = __import__('numpy').random.default_rng(0)
  rows = ''.join(f'u{i % 9},{i % 4},{rng.random():.3f},{int(rng.random() < 0.4)},0,0\n'
                 for i in range(400))
  data_path = tmp_path / 'flat.csv'
  data_path.write_text(_HEADER + rows)
  config = tabular_config.get_config('smoke=True')
  config.data.path, config.data.categorical = str(data_path), 'user,item'
  config.data.numeric, config.data.tasks, config.data.core = 'price', 'click,buy', 'amount'
  config.cache_dir, config.max_steps, config.eval_every = str(tmp_path / 'cache'), 4, 2
  config.batch_size, config.patience = 64, 1
  with caplog.at_level('WARNING'):
    result = loop_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['steps'] == 4          # undefined values never count toward early stopping
  assert result['best_step'] == 0      # ... nor select a checkpoint
  with open(tmp_path / 'run' / 'metrics.json') as f:
    saved = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f'{c} in JSON'))
  assert saved['test']['buy']['auc'] is None and saved['test']['amount']['nrmse'] is None
  assert saved['test']['click']['auc'] is not None
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in f]
  assert [line['valid']['amount']['nrmse'] for line in lines] == [None, None]
  warnings = [r.getMessage() for r in caplog.records if 'undefined' in r.getMessage()]
  assert any('buy auc is undefined on the valid split: the split has one class only' in w
             for w in warnings), warnings
  assert len(warnings) == len(set(warnings))     # once per task, split and metric

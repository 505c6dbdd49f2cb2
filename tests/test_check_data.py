"""``htl_jax.data.check`` and ``htl-check-data``: a local dataset against its published facts.

Small fake copies are built in ``tmp_path`` (no network): a KuaiRand-format folder cut from
the embedded sample, whose sizes must then DIFFER (exit code 1); a missing column stops with
one ``error:`` line (exit code 2). Hillstrom, when the shared data folder is beside the clone,
passes every check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import polars as pl
import pytest

from conftest import HILLSTROM, REPO
from htl_jax.configs import hillstrom, kaggle_revenue as kaggle_config, kuairand, tabular
from htl_jax.data import check
from htl_jax.data import kuairand as kuairand_data
from htl_jax.errors import ConfigError, DataError

_ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
_TRANSACTIONS = (
    'id,chain,dept,category,company,brand,date,productsize,productmeasure,purchasequantity,'
    'purchaseamount\n'
    '1,10,5,501,10000,100,2012-03-02,16,OZ,1,2.5\n'
    '1,10,5,501,10000,100,2012-03-20,16,OZ,1,3.0\n'
    '1,10,5,501,10000,100,2012-08-20,16,OZ,1,1.0\n'
    '2,10,5,502,101200010,101,2012-04-01,1,CT,1,5.0\n'
    '2,10,5,502,101200010,101,2013-07-28,1,CT,1,5.0\n'
    '3,10,5,502,999,101,2013-07-28,1,CT,1,5.0\n')


def _cli(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'htl_jax.cli.check_data', '--compilation_cache=none', *flags],
      cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)


def _fake_kuairand(root, rows: int = 20, drop: tuple[str, ...] = ()) -> str:
  """The first ``rows`` log rows of the embedded sample (without ``drop``) and its side files."""
  sample = kuairand_data.SAMPLE_DIR
  log = pl.read_csv(os.path.join(sample, kuairand_data.LOG_FILE), n_rows=rows,
                    infer_schema=False)
  log.drop(list(drop)).write_csv(os.path.join(root, kuairand_data.LOG_FILE))
  for name in (kuairand_data.USER_FILE, kuairand_data.VIDEO_FILE):
    shutil.copy(os.path.join(sample, name), os.path.join(root, name))
  return str(root)


def _lines(report: check.Report) -> dict[str, check.Check]:
  return {item.name: item for item in report.checks}


def test_embedded_sample_passes_its_file_and_column_checks():
  report = check.check_dataset(kuairand.get_config())
  assert report.exit_code == 0, report.lines()
  assert report.dataset == 'KuaiRand-Pure (embedded sample)'
  assert len(report.checks) == 6                       # 3 files, 3 column lists
  assert 'embedded sample' in report.notes[0] and "not the paper's" in report.notes[0]
  assert 'log rows' not in _lines(report)


def test_small_kuairand_copy_differs_in_size(tmp_path):
  config = kuairand.get_config(f'data_dir={_fake_kuairand(tmp_path)}')
  report = check.check_dataset(config)
  assert report.exit_code == 1
  found = _lines(report)
  for name in ('log rows', 'users in the log', 'videos in the log'):
    assert not found[name].ok
  assert found['log rows'].line() == 'DIFFERS  log rows: expected 1,186,059, found 20'
  assert all(found[f'columns of {name}'].ok for name in check.KUAIRAND_COLUMNS)
  assert report.summary().startswith(f'summary  KuaiRand-Pure: {len(report.differences)} of '
                                     f'{len(report.checks)} checks DIFFER')
  assert 'rates within 0.5 percentage points' in report.summary()


def test_empty_kuairand_log_differs_without_values(tmp_path):
  report = check.check_dataset(kuairand.get_config(f'data_dir={_fake_kuairand(tmp_path, 0)}'))
  found = _lines(report)
  assert found['log rows'].found == '0' and found['log dates'].found == 'none'
  assert found['click rate (is_click)'].line().endswith('found none')


def test_kuairand_cli_reports_differences_with_exit_code_1(tmp_path):
  result = _cli('--config=kuairand', f'--config.data_dir={_fake_kuairand(tmp_path)}')
  assert result.returncode == 1, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == f'checking KuaiRand-Pure: {tmp_path}'
  assert 'DIFFERS  log rows: expected 1,186,059, found 20' in lines
  assert lines[-1].startswith('summary  KuaiRand-Pure: ') and 'DIFFER' in lines[-1]
  assert all(line.split()[0] in ('checking', 'ok', 'DIFFERS', 'summary') for line in lines)


def test_missing_read_column_is_one_error_line_with_exit_code_2(tmp_path):
  result = _cli('--config=kuairand',
                f'--config.data_dir={_fake_kuairand(tmp_path, drop=("play_time_ms",))}')
  assert result.returncode == 2
  assert result.stdout == ''
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr
  assert kuairand_data.LOG_FILE in errors[0] and "'play_time_ms'" in errors[0]


@pytest.mark.parametrize('column, value', [('is_click', '7'), ('long_view', 'nan'),
                                           ('play_time_ms', '-5')])
def test_a_label_training_rejects_is_the_same_error_here(tmp_path, column, value):
  """is_click=7 (a count of clicks, say): training stops with exit 2, and so does this
  check, with training's line (not a click rate of 1.3 and exit 1)."""
  (tmp_path / 'data').mkdir()
  root = _fake_kuairand(tmp_path / 'data')
  log = os.path.join(root, kuairand_data.LOG_FILE)
  frame = pl.read_csv(log, infer_schema=False)
  frame.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(value))
                     .otherwise(pl.col(column)).alias(column)).write_csv(log)
  result = _cli('--config=kuairand', f'--config.data_dir={root}')
  assert result.returncode == 2, result.stdout
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and f"column '{column}': 1 rows" in errors[0]
  from htl_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError) as training:
    load_dataset(kuairand.get_config(f'data_dir={root}'), str(tmp_path / 'cache'))
  assert errors[0] == f'error: {training.value}'


def test_missing_unread_column_differs(tmp_path):
  config = kuairand.get_config(f'data_dir={_fake_kuairand(tmp_path, drop=("is_hate",))}')
  report = check.check_dataset(config)
  columns = _lines(report)[f'columns of {kuairand_data.LOG_FILE}']
  assert not columns.ok and columns.found == 'is_hate missing (not read by the loader)'


def test_missing_file_is_a_data_error(tmp_path):
  _fake_kuairand(tmp_path)
  os.remove(tmp_path / kuairand_data.VIDEO_FILE)
  with pytest.raises(DataError, match=f'{kuairand_data.VIDEO_FILE}: file not found'):
    check.check_dataset(kuairand.get_config(f'data_dir={tmp_path}'))


def test_published_none_checks_files_and_columns_only(tmp_path):
  config = kuairand.get_config(f'data_dir={_fake_kuairand(tmp_path)}')
  report = check.check_dataset(config, published='none')
  assert report.exit_code == 0 and len(report.checks) == 6


def test_hillstrom_passes_every_check():
  if not os.path.isfile(HILLSTROM):
    pytest.skip(f'{HILLSTROM} is absent (the shared data folder is not beside this clone)')
  report = check.check_dataset(hillstrom.get_config(f'data.path={HILLSTROM},'
                                                    'data.max_rows=100'))
  assert report.exit_code == 0, report.lines()
  found = _lines(report)
  assert found['md5'].found == 'b47bbd55d239c433f84e2fec6d6a1938'
  assert found['rows'].found == '64,000'                 # max_rows is ignored
  assert found['visit rate'].found == '14.68%' and found['spend mean'].found == '1.05'
  assert found['8:1:1 split'].found == '64,000 rows: train 51,200, valid 6,400, test 6,400'
  assert report.seconds < 10


def test_hillstrom_cli_exit_code_0():
  if not os.path.isfile(HILLSTROM):
    pytest.skip(f'{HILLSTROM} is absent (the shared data folder is not beside this clone)')
  start = time.perf_counter()
  result = _cli('--config=hillstrom', f'--config.data.path={HILLSTROM}')
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines()[-1].startswith('summary  Hillstrom: all 12 checks ok')
  assert time.perf_counter() - start < 60


def test_hillstrom_by_flag_on_another_file(tmp_path):
  path = tmp_path / 'emails.csv'
  header = ','.join(check.HILLSTROM_COLUMNS)
  path.write_text(header + '\n' + '\n'.join(
      f'{i % 12 + 1},1) $0 - $100,10.0,1,0,Urban,1,Web,No E-Mail,{int(i < 4)},'
      f'{int(i < 1)},{30.0 if i < 1 else 0}' for i in range(20)) + '\n')
  config = hillstrom.get_config(f'data.path={path}')
  assert 'md5' not in _lines(check.check_dataset(config))   # auto: not named hillstrom.csv
  report = check.check_dataset(config, published='hillstrom')
  assert report.dataset == 'Hillstrom' and report.exit_code == 1
  found = _lines(report)
  assert not found['md5'].ok
  assert found['rows'].line() == 'DIFFERS  rows: expected 64,000, found 20'
  assert found['visit rate'].found == '20.00%' and not found['visit rate'].ok
  assert found['conversion rate'].found == '5.00%' and found['labels nested (visit >= '
                                                            'conversion)'].ok


def _tabular_config(path) -> object:
  return tabular.get_config(f'data.path={path},data.categorical=user,data.tasks=click,buy,'
                            'data.core=amount')


def test_tabular_nesting_violation_differs(tmp_path):
  path = tmp_path / 'logs.csv'
  path.write_text('user,click,buy,amount\n' + 'a,1,1,2.5\n' * 8 + 'b,0,1,3\nc,0,0,0\n')
  report = check.check_dataset(_tabular_config(path))
  assert report.dataset == 'tabular file' and report.exit_code == 1
  nesting = _lines(report)['labels nested (click >= buy)']
  assert nesting.found.startswith('1 rows out of order')
  assert _lines(report)['8:1:1 split'].found == '10 rows: train 8, valid 1, test 1'


@pytest.mark.parametrize('text, message', [
    ('user,click,buy,amount\n' + 'a,1,2,1\n' * 10, "'buy': 10 rows are not 0 or 1"),
    ('user,click,buy,amount\n' + 'a,1,1,-1\n' * 10, "'amount': 10 rows are negative"),
    ('user,click,buy\n' + 'a,1,1\n' * 10, "missing column(s) 'amount'"),
    ('user,click,buy,amount\n' + 'a,1,1,1\n' * 5, 'split would be empty'),
])
def test_tabular_data_training_would_stop_on_is_a_data_error(tmp_path, text, message):
  path = tmp_path / 'logs.csv'
  path.write_text(text)
  with pytest.raises(DataError, match=message.replace('(', r'\(').replace(')', r'\)')):
    check.check_dataset(_tabular_config(path))


def test_kaggle_reports_rows_and_dates_and_compares_the_ziln_statistics(tmp_path):
  (tmp_path / 'transactions.csv').write_text(_TRANSACTIONS)
  report = check.check_dataset(kaggle_config.get_config(f'data_dir={tmp_path}'))
  assert report.exit_code == 1
  assert report.notes[0].startswith('transactions.csv: 6 rows, dates 2012-03-02 to 2013-07-28')
  found = _lines(report)
  assert found['(customer, company) rows after the ZILN preprocessing'].found == '2'
  assert found['repurchase within 1 year'].found == '50.00%'
  assert found['30-day amount mean'].found == '1.50'
  assert found['columns of transactions.csv'].ok
  quick = check.check_dataset(kaggle_config.get_config(f'data_dir={tmp_path}'), 'none')
  assert quick.exit_code == 0 and len(quick.checks) == 2 and not quick.notes


def test_kaggle_missing_columns(tmp_path):
  frame = pl.read_csv(_TRANSACTIONS.encode(), infer_schema=False)
  frame.drop('purchasequantity').write_csv(tmp_path / 'transactions.csv')
  config = kaggle_config.get_config(f'data_dir={tmp_path}')
  columns = _lines(check.check_dataset(config, 'none'))['columns of transactions.csv']
  assert columns.found == 'purchasequantity missing (not read by the loader)'
  frame.drop('purchaseamount').write_csv(tmp_path / 'transactions.csv')
  with pytest.raises(DataError, match="missing column.*'purchaseamount'"):
    check.check_dataset(config)
  with pytest.raises(DataError, match='needs --config.data_dir'):
    check.check_dataset(kaggle_config.get_config())


def test_tolerances():
  rate = check.Stat('click', 'click rate', 'rate', 0.1762)
  assert check.compare(rate, 0.1812).ok and not check.compare(rate, 0.1813).ok
  assert check.compare(rate, 0.1712).ok and not check.compare(rate, 0.1711).ok
  mean = check.Stat('mean', 'mean', 'relative', 6.94)
  assert check.compare(mean, 6.94 * 1.02).ok and not check.compare(mean, 6.94 * 1.021).ok
  empty = check.compare(check.Stat('rows', 'rows', 'count', 10), None)
  assert empty.line() == 'DIFFERS  rows: expected 10, found none'


def test_bad_arguments():
  with pytest.raises(ConfigError, match='tabular'):
    check.check_dataset(kuairand.get_config(), published='hillstrom')
  with pytest.raises(ConfigError, match='published'):
    check.check_dataset(kuairand.get_config(), published='paper')
  config = kuairand.get_config()
  config.dataset = 'synthetic'
  with pytest.raises(DataError, match='no files to check'):
    check.check_dataset(config)


def test_the_library_does_not_import_jax():
  code = 'import sys, htl_jax.data.check; assert "jax" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], cwd=REPO, env=_ENV, check=True, timeout=120)

"""Tests for scoring new data with a trained run (:mod:`htl_jax.serve.predict`).

One tiny KuaiRand run (the session fixture ``trained_run``) is shared by these tests and
by ``test_export.py``; one tiny tabular run is trained here for the tabular loader.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from conftest import REPO, tiny_config
from htl_jax.configs import tabular as tabular_config
from htl_jax import metrics as metrics_lib
from htl_jax.data import kuairand, load_dataset, pipeline, tabular
from htl_jax.errors import ConfigError, DataError, RunError
from htl_jax import run_files
from htl_jax.serve.predict import predict_file
from htl_jax.serve.run import load_run
from htl_jax.train.loop import train_and_evaluate

TINY_LOG_ROWS = 2000          # conftest.TINY_ARG's data.max_rows


def _metrics_equal(computed: dict, stored: dict) -> None:
  """Equal metric by metric; an undefined metric is NaN computed, null in metrics.json."""
  assert computed.keys() == stored.keys()
  for task, values in stored.items():
    assert computed[task].keys() == values.keys()
    for name, value in values.items():
      np.testing.assert_equal(computed[task][name], np.nan if value is None else value,
                              err_msg=f'{task} {name}')


def _shifted_side_table(name: str, key: str, directory) -> None:
  """Copies a side table, reversed, plus a row whose text sorts first in every column.

  The loader numbers each column's distinct strings in sorted order, so every code shifts:
  predictions only match if the encoder maps strings, not codes. ('-1' is also a valid
  numeric cell: negative numbers are null.)
  """
  table = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, name), infer_schema=False)
  extra = {c: '-1' for c in table.columns}
  extra[key] = str(10**9)
  extra.update({c: '2022-01-01' for c in table.columns if c == 'upload_dt'})
  pl.concat([table.reverse(), pl.DataFrame([extra])]).write_csv(directory / name)


def _kuairand_test_rows(directory) -> pl.DataFrame:
  """Writes the raw log rows of the tiny run's test split (time order) plus side tables."""
  log = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, kuairand.LOG_FILE), n_rows=TINY_LOG_ROWS,
                    infer_schema=False)
  order, n_train, n_valid = pipeline.split_order(
      log.height, log['time_ms'].cast(pl.Int64).to_numpy(), seed=0)
  test = log[order[n_train + n_valid:]]
  os.makedirs(directory, exist_ok=True)
  test.write_csv(directory / kuairand.LOG_FILE)
  _shifted_side_table(kuairand.USER_FILE, 'user_id', directory)
  _shifted_side_table(kuairand.VIDEO_FILE, 'video_id', directory)
  return test


def _kuairand_labels(log: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
  """Nested labels and the core (seconds) of raw log rows, as the loader computes them."""
  y = log.select(pl.col('is_click', 'long_view').cast(pl.Float64)).to_numpy()
  y = np.minimum.accumulate(y.astype(np.float32), axis=1)
  core = (log['play_time_ms'].cast(pl.Float64).to_numpy() / 1000.0).astype(np.float32)
  return y, core


def test_run_stores_the_preprocessing_it_fitted(trained_run, cache_dir):
  stored = run_files.load_preprocessing(trained_run)
  config = tiny_config(cache_dir)
  data = load_dataset(config, cache_dir)
  assert stored.dataset == 'kuairand'
  assert stored.spec == data.spec
  assert stored.encoder.vocab_sizes == data.spec.vocab_sizes
  user = stored.encoder.fields[stored.spec.fields.index('user_id')]
  assert user.values.dtype == np.int64 and np.all(np.diff(user.values) > 0)
  degree = stored.encoder.fields[stored.spec.fields.index('user_active_degree')]
  assert degree.values.dtype == object and 'full_active' in set(degree.values)
  duration = stored.encoder.fields[stored.spec.fields.index('duration_ms')]
  assert duration.encoding == 'quantile' and len(duration.edges) == duration.size - 2
  # the stored encoder, applied to the raw rows, gives the ids the model was trained on
  raw = kuairand.load_raw(config)
  columns, _ = stored.encoder.encode(raw.features, raw.codes, raw.source)
  order, _, _ = pipeline.split_order(len(raw.core), raw.time, config.seed)
  prepared = np.concatenate([data.train.x, data.valid.x, data.test.x])
  np.testing.assert_array_equal(np.stack(columns, axis=1)[order], prepared)


def test_kuairand_test_rows_reproduce_the_test_metrics(trained_run, tmp_path, caplog):
  test = _kuairand_test_rows(tmp_path / 'in')
  out = str(tmp_path / 'predictions.parquet')
  with caplog.at_level(logging.INFO):
    summary = predict_file(trained_run, str(tmp_path / 'in'), out, chunk_rows=64)
  predictions = pl.read_parquet(out)
  assert predictions.columns == ['user_id', 'video_id', 'prob_click', 'prob_long_view',
                                 'pred_watch_time']
  assert summary.rows == predictions.height == test.height
  assert predictions['user_id'].to_list() == test['user_id'].cast(pl.Int64).to_list()
  y, core = _kuairand_labels(test)
  computed = metrics_lib.evaluate_tasks(
      y, predictions.select('prob_click', 'prob_long_view').to_numpy(), core,
      predictions['pred_watch_time'].to_numpy(), ('click', 'long_view', 'watch_time'),
      group=predictions['user_id'].to_numpy())
  with open(os.path.join(trained_run, 'metrics.json')) as f:
    _metrics_equal(computed, json.load(f)['test'])
  # videos first seen after the training window are OOV, and counted in the log
  assert summary.unseen['video_id'] > 0
  assert f'video_id {summary.unseen["video_id"]}' in caplog.text


def test_chunk_size_does_not_change_predictions(trained_run, tmp_path):
  source = tmp_path / 'in'
  source.mkdir()
  for name in (kuairand.LOG_FILE, kuairand.USER_FILE, kuairand.VIDEO_FILE):
    shutil.copy(os.path.join(kuairand.SAMPLE_DIR, name), source)
  run = load_run(trained_run)
  whole = predict_file(trained_run, str(source), str(tmp_path / 'whole.parquet'), run=run)
  chunked = predict_file(trained_run, str(source), str(tmp_path / 'chunked.csv'),
                         chunk_rows=777, run=run)
  assert whole.rows == chunked.rows == pl.scan_csv(source / kuairand.LOG_FILE).select(
      pl.len()).collect().item()
  a = pl.read_parquet(tmp_path / 'whole.parquet')
  b = pl.read_csv(tmp_path / 'chunked.csv', schema=a.schema)
  assert a.equals(b)
  assert whole.unseen == chunked.unseen


def test_unseen_ids_map_to_oov_and_are_counted(trained_run, tmp_path):
  test = _kuairand_test_rows(tmp_path / 'in')
  test.with_columns(pl.when(pl.int_range(pl.len()) < 5).then(pl.lit('999999999'))
                    .otherwise(pl.col('user_id')).alias('user_id')).write_csv(
                        tmp_path / 'in' / kuairand.LOG_FILE)
  summary = predict_file(trained_run, str(tmp_path / 'in'), str(tmp_path / 'p.parquet'),
                         passthrough='user_id,time_ms')
  assert summary.unseen['user_id'] == 5
  predictions = pl.read_parquet(tmp_path / 'p.parquet')
  assert predictions.columns[:2] == ['user_id', 'time_ms']
  assert predictions['user_id'][:5].to_list() == [999999999] * 5
  assert np.isfinite(predictions['pred_watch_time'].to_numpy()).all()


def test_missing_feature_column_is_a_data_error(trained_run, tmp_path):
  test = _kuairand_test_rows(tmp_path / 'in')
  test.drop('duration_ms').write_csv(tmp_path / 'in' / kuairand.LOG_FILE)
  with pytest.raises(DataError, match=r"missing column\(s\) \['duration_ms'\]"):
    predict_file(trained_run, str(tmp_path / 'in'), str(tmp_path / 'p.parquet'))
  assert not os.path.exists(tmp_path / 'p.parquet')
  assert [p for p in os.listdir(tmp_path) if p.startswith('.predict-')] == []


def test_workdir_without_a_finished_run_is_a_run_error(tmp_path):
  with pytest.raises(RunError, match='no finished run'):
    load_run(str(tmp_path))


def _cli_error(workdir: str, data: str, out: str, *flags: str) -> str:
  """Runs ``experiments.predict``; asserts exit code 2 and one error line, returns it."""
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.predict', f'--workdir={workdir}', f'--data={data}',
       f'--out={out}', *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr
  return errors[0]


def _leftovers(directory) -> list[str]:
  """Temporary output folders left in ``directory``."""
  return [p for p in os.listdir(directory) if p.startswith('.predict-')]


@pytest.mark.parametrize('case', ['no_run', 'missing_column'])
def test_cli_errors_are_one_line_with_exit_code_2(trained_run, tmp_path, case):
  if case == 'no_run':
    (tmp_path / 'run').mkdir()
    workdir, data = str(tmp_path / 'run'), str(tmp_path / 'run')
  else:
    test = _kuairand_test_rows(tmp_path / 'in')
    test.drop('tab').write_csv(tmp_path / 'in' / kuairand.LOG_FILE)
    workdir, data = trained_run, str(tmp_path / 'in')
  error = _cli_error(workdir, data, str(tmp_path / 'p.csv'))
  assert ('no finished run' if case == 'no_run' else "'tab'") in error


# ----------------------------------------------------------------------------- --out


def _read_only_dir(path) -> str:
  """A directory this process cannot write in; skips where permissions do not bind (root)."""
  path.mkdir()
  path.chmod(0o555)
  if os.access(path, os.W_OK):
    path.chmod(0o755)
    pytest.skip('running as root: a read-only directory stays writable')
  return str(path)


@pytest.mark.parametrize('case', ['directory', 'missing_parent', 'read_only_parent'])
def test_a_bad_out_is_one_line_before_any_scoring(trained_run, tmp_path, case):
  _kuairand_test_rows(tmp_path / 'in')
  if case == 'directory':
    (tmp_path / 'out').mkdir()
    out, expected, watched = str(tmp_path / 'out'), 'is a directory', tmp_path / 'out'
  elif case == 'missing_parent':
    out, expected, watched = str(tmp_path / 'nowhere' / 'p.parquet'), 'does not exist', tmp_path
  else:
    parent = _read_only_dir(tmp_path / 'locked')
    out, expected, watched = os.path.join(parent, 'p.parquet'), 'not writable', tmp_path / 'locked'
  before = sorted(os.listdir(watched))
  try:
    error = _cli_error(trained_run, str(tmp_path / 'in'), out)
  finally:
    os.chmod(watched, 0o755)
  assert out in error and expected in error
  assert sorted(os.listdir(watched)) == before
  assert not os.path.exists(tmp_path / 'nowhere')


def test_out_is_checked_before_the_run_and_the_data(tmp_path):
  with pytest.raises(ConfigError, match='is a directory'):
    predict_file(str(tmp_path / 'no_run'), str(tmp_path / 'no_data'), str(tmp_path))
  with pytest.raises(ConfigError, match='does not exist'):
    predict_file(str(tmp_path / 'no_run'), str(tmp_path / 'no_data'),
                 str(tmp_path / 'a' / 'b' / 'p.csv'))
  with pytest.raises(ConfigError, match='is a directory'):
    predict_file(str(tmp_path / 'no_run'), str(tmp_path / 'no_data'), str(tmp_path / 'new') + '/')
  (tmp_path / 'file').write_text('')
  with pytest.raises(ConfigError, match='is not a directory'):
    predict_file(str(tmp_path / 'no_run'), str(tmp_path / 'no_data'),
                 str(tmp_path / 'file' / 'p.csv'))


# ----------------------------------------------------------------------------- not numbers


def _with_cells(log: pl.DataFrame, column: str, rows: dict[int, str]) -> pl.DataFrame:
  """``log`` (text columns) with the cells ``rows`` (index -> text) of ``column`` replaced."""
  values = log[column].to_list()
  for index, text in rows.items():
    values[index] = text
  return log.with_columns(pl.Series(column, values, dtype=pl.String))


def test_kuairand_cells_that_are_not_numbers_are_counted_and_scored_as_missing(
    trained_run, tmp_path, caplog):
  test = _kuairand_test_rows(tmp_path / 'in')
  bad = {0: 'abc', 3: 'abc', 7: '12s', test.height - 1: 'n/a'}
  _with_cells(test, 'duration_ms', bad).write_csv(tmp_path / 'in' / kuairand.LOG_FILE)
  run = load_run(trained_run)
  with caplog.at_level(logging.INFO):
    summary = predict_file(trained_run, str(tmp_path / 'in'), str(tmp_path / 'bad.parquet'),
                           chunk_rows=50, run=run)
  assert summary.unparseable == {'duration_ms': 4}
  assert summary.rows == test.height
  assert "duration_ms 4 (e.g. 'abc')" in caplog.text
  # scored exactly as an empty (missing) cell
  _with_cells(test, 'duration_ms', {i: None for i in bad}).write_csv(
      tmp_path / 'in' / kuairand.LOG_FILE)
  missing = predict_file(trained_run, str(tmp_path / 'in'), str(tmp_path / 'empty.parquet'),
                         chunk_rows=50, run=run)
  assert missing.unparseable == {}
  assert pl.read_parquet(tmp_path / 'bad.parquet').equals(pl.read_parquet(tmp_path /
                                                                         'empty.parquet'))


def test_strict_rejects_cells_that_are_not_numbers_in_one_line(trained_run, tmp_path):
  test = _kuairand_test_rows(tmp_path / 'in')
  _with_cells(test, 'duration_ms', {2: 'abc', 5: 'abc'}).write_csv(
      tmp_path / 'in' / kuairand.LOG_FILE)
  out = tmp_path / 'p.parquet'
  error = _cli_error(trained_run, str(tmp_path / 'in'), str(out), '--strict')
  assert kuairand.LOG_FILE in error
  assert "column 'duration_ms': 2 rows are not a number (e.g. 'abc')" in error
  assert not out.exists() and _leftovers(tmp_path) == []


def test_strict_counts_the_whole_input_and_leaves_nothing_behind(trained_run, tmp_path):
  """The bad cells lie in later chunks, after scoring has started writing."""
  source = tmp_path / 'in'
  source.mkdir()
  for name in (kuairand.USER_FILE, kuairand.VIDEO_FILE):
    shutil.copy(os.path.join(kuairand.SAMPLE_DIR, name), source)
  log = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, kuairand.LOG_FILE), infer_schema=False)
  _with_cells(log, 'duration_ms', {3000: 'abc', 9000: 'x', 9001: 'y'}).write_csv(
      source / kuairand.LOG_FILE)
  out = tmp_path / 'p.csv'
  with pytest.raises(DataError, match=r"'duration_ms': 3 rows are not a number \(e.g. 'abc'"):
    predict_file(trained_run, str(source), str(out), chunk_rows=1000, strict=True)
  assert not out.exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- tabular


def _tabular_frame(n: int) -> pl.DataFrame:
  """Rows with an id, two categorical and two numeric fields, click -> buy -> amount."""
  rng = np.random.default_rng(3)
  user = rng.integers(0, 60, n)
  price = rng.lognormal(1.0, 0.6, n)
  score = 0.02 * user - 0.3 * np.log(price) + rng.normal(0, 0.5, n)
  click = (rng.random(n) < 1 / (1 + np.exp(-score))).astype(np.int64)
  buy = click * (rng.random(n) < 0.5)
  return pl.DataFrame({
      'order_id': np.arange(n) + 10_000,
      'user': [f'u{u}' for u in user],
      'channel': rng.choice(['web', 'app', 'mail'], n),
      'price': np.where(rng.random(n) < 0.05, np.nan, np.round(price, 3)),
      'age': rng.integers(18, 70, n),
      'click': click, 'buy': buy,
      'amount': np.round(buy * price * rng.lognormal(0, 0.3, n), 3),
  })


def _tabular_config(path: str, cache_dir: str):
  config = tabular_config.get_config(
      'smoke=True,max_steps=6,eval_every=3,checkpoint_every=3,batch_size=128,'
      'eval_batch_size=256,hidden_dims=(8,4),embed_dim=4,fusion_dim=4,label_embed_dim=4,'
      'core_transform=log1p,model=shared_bottom')
  config.data.update(path=path, categorical='user,channel', numeric='price,age',
                     tasks='click,buy', core='amount', passthrough='order_id')
  config.cache_dir = cache_dir
  return config


@pytest.fixture(scope='module')
def tabular_run(tmp_path_factory, cache_dir) -> tuple[str, pl.DataFrame, dict]:
  """A finished tiny tabular run: its workdir, its test rows and its result."""
  root = tmp_path_factory.mktemp('tabular_run')
  frame = _tabular_frame(1500)
  train_file = str(root / 'train.csv')
  frame.write_csv(train_file)
  config = _tabular_config(train_file, cache_dir)
  workdir = str(root / 'run')
  result = train_and_evaluate(config, workdir)
  # no time column: the seeded random split
  order, n_train, n_valid = pipeline.split_order(frame.height, None, config.seed)
  return workdir, frame[order[n_train + n_valid:]], result


def test_tabular_test_rows_reproduce_the_test_metrics(tabular_run, tmp_path):
  workdir, test, result = tabular_run
  test.drop('click', 'buy', 'amount').write_parquet(tmp_path / 'new.parquet')
  summary = predict_file(workdir, str(tmp_path / 'new.parquet'), str(tmp_path / 'p.csv'),
                         chunk_rows=50)
  predictions = pl.read_csv(tmp_path / 'p.csv', schema_overrides={
      'prob_click': pl.Float32, 'prob_buy': pl.Float32, 'pred_amount': pl.Float32})
  assert predictions['order_id'].to_list() == test['order_id'].to_list()
  assert summary.rows == test.height
  y = test.select('click', 'buy').to_numpy().astype(np.float32)
  computed = metrics_lib.evaluate_tasks(
      y, predictions.select('prob_click', 'prob_buy').to_numpy(),
      test['amount'].to_numpy().astype(np.float32), predictions['pred_amount'].to_numpy(),
      ('click', 'buy', 'amount'))
  _metrics_equal(computed, result['test'])
  test.drop('price').write_csv(tmp_path / 'bad.csv')
  with pytest.raises(DataError, match=r"bad.csv: missing column\(s\) 'price'"):
    predict_file(workdir, str(tmp_path / 'bad.csv'), str(tmp_path / 'q.csv'))


def test_tabular_cells_that_are_not_numbers_are_counted_per_column(tabular_run, tmp_path,
                                                                   caplog):
  workdir, test, _ = tabular_run
  text = test.cast(pl.String)          # labels kept: training reads the same file below
  bad = _with_cells(_with_cells(text, 'price', {1: 'abc', 4: ' abc ', 9: '1.2.3'}), 'age',
                    {0: 'forty'})
  bad.write_csv(tmp_path / 'bad.csv')
  with caplog.at_level(logging.INFO):
    summary = predict_file(workdir, str(tmp_path / 'bad.csv'), str(tmp_path / 'p.csv'),
                           chunk_rows=40)
  assert summary.unparseable == {'price': 3, 'age': 1}
  assert summary.rows == test.height
  assert "price 3 (e.g. 'abc'), age 1 (e.g. 'forty')" in caplog.text
  predictions = pl.read_csv(tmp_path / 'p.csv')
  assert predictions['order_id'].to_list() == test['order_id'].to_list()
  with pytest.raises(DataError, match=r"bad.csv: column 'price': 3 rows are not a number "
                     r"\(e.g. 'abc'\); column 'age': 1 row is not a number \(e.g. 'forty'\)"):
    predict_file(workdir, str(tmp_path / 'bad.csv'), str(tmp_path / 'q.csv'), strict=True)
  assert not os.path.exists(tmp_path / 'q.csv') and _leftovers(tmp_path) == []
  # training rejects the same file
  with pytest.raises(DataError, match="column 'price': 3 rows are not a number"):
    tabular.load_raw(_tabular_config(str(tmp_path / 'bad.csv'), ''))

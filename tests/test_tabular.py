"""Tests for the bring-your-own-data loader :mod:`htl_jax.data.tabular`."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from conftest import HILLSTROM
from htl_jax.configs import hillstrom
from htl_jax.configs import tabular as tabular_config
from htl_jax.data import pipeline, tabular
from htl_jax.errors import DataError

_ROWS = 30


def _frame(n: int = _ROWS) -> pl.DataFrame:
  """A small table with every column role: click -> buy -> amount, time ``ts``."""
  rng = np.random.default_rng(0)
  click = (rng.random(n) < 0.5).astype(np.int64)
  buy = click * (rng.random(n) < 0.5)
  return pl.DataFrame({
      'user': [f'u{i % 7}' for i in range(n)],
      'item': rng.integers(0, 5, n),
      'price': np.round(rng.random(n) * 10, 2),
      'ts': np.arange(n)[::-1] * 10,
      'click': click,
      'buy': buy,
      'amount': np.round(buy * rng.random(n) * 100, 2),
  })


def _config(path, **data):
  config = tabular_config.get_config()
  config.data.path = str(path)
  config.data.categorical = 'user,item'
  config.data.numeric = 'price'
  config.data.tasks = 'click,buy'
  config.data.core = 'amount'
  config.data.time_column = 'ts'
  for key, value in data.items():
    config.data[key] = value
  return config


def _write_csv(tmp_path, text: str, name: str = 'data.csv') -> str:
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('suffix', ['.csv', '.tsv', '.parquet', '.pq'])
def test_round_trip(tmp_path, suffix):
  frame = _frame()
  path = str(tmp_path / f'data{suffix}')
  if suffix in ('.parquet', '.pq'):
    frame.write_parquet(path)
  else:
    frame.write_csv(path, separator='\t' if suffix == '.tsv' else ',')
  raw = tabular.load_raw(_config(path))
  assert raw.source == path
  assert raw.binary_tasks == ('click', 'buy') and raw.core_task == 'amount'
  assert raw.label_columns == ('click', 'buy', 'amount')
  assert raw.features.columns == ['user', 'item', 'price'] and raw.numeric == ('price',)
  assert raw.features['user'].to_list() == frame['user'].to_list()
  assert raw.features['item'].to_list() == [str(v) for v in frame['item']]
  np.testing.assert_allclose(raw.features['price'].to_numpy(), frame['price'].to_numpy())
  np.testing.assert_array_equal(raw.labels, frame.select('click', 'buy').to_numpy())
  assert raw.labels.dtype == np.float32 and raw.core.dtype == np.float32
  np.testing.assert_allclose(raw.core, frame['amount'].to_numpy(), rtol=1e-6)
  np.testing.assert_array_equal(raw.time, frame['ts'].to_numpy())


def test_chronological_split_by_date_strings(tmp_path):
  dates = [f'2024-01-{day:02d}' for day in range(30, 0, -1)]
  frame = _frame().with_columns(pl.Series('ts', dates))
  path = str(tmp_path / 'dated.csv')
  frame.write_csv(path)
  raw = tabular.load_raw(_config(path))
  data = pipeline.prepare(raw, _config(path))
  # Rows are written newest first: the 24 oldest (the file's last 24) are train, the 3
  # newest (the file's first 3) are test, each in chronological order.
  np.testing.assert_allclose(data.test.core, raw.core[:3][::-1], rtol=1e-6)
  np.testing.assert_allclose(data.train.core, raw.core[6:][::-1], rtol=1e-6)


def test_random_split_is_drawn_from_split_seed_not_seed(tmp_path):
  """Seeds vary the model only (docs/design.md): two seeds see the same test rows, two
  split seeds do not."""
  path = str(tmp_path / 'data.csv')
  _frame(100).with_columns(pl.Series('amount', np.arange(100.0))).write_csv(path)
  config = _config(path, time_column='')
  raw = tabular.load_raw(config)
  assert raw.time is None
  first = pipeline.prepare(raw, config)
  again = pipeline.prepare(tabular.load_raw(config), config)
  config.seed = 1
  other_seed = pipeline.prepare(raw, config)
  config.split_seed = 1
  other_split = pipeline.prepare(raw, config)
  assert (len(first.train), len(first.valid), len(first.test)) == (80, 10, 10)
  np.testing.assert_array_equal(first.test.core, again.test.core)
  np.testing.assert_array_equal(first.test.core, other_seed.test.core)
  assert not np.array_equal(first.test.core, other_split.test.core)
  # A random split, not the file order.
  assert not np.array_equal(first.test.core, np.arange(90.0, 100.0))


def test_float_after_many_zeros(tmp_path):
  # polars infers int from the first rows; the loader must not fail on row 201.
  lines = ['user,item,price,click,buy,amount']
  lines += [f'u{i},{i % 3},0,1,0,0' for i in range(200)]
  lines += ['u200,1,19.5,1,1,195.83', 'u201,2,3.25,1,1,0.5']
  path = _write_csv(tmp_path, '\n'.join(lines) + '\n')
  raw = tabular.load_raw(_config(path, time_column=''))
  assert raw.core.shape == (202,)
  np.testing.assert_allclose(raw.core[-2:], [195.83, 0.5], rtol=1e-6)
  np.testing.assert_allclose(raw.features['price'].to_numpy()[-2:], [19.5, 3.25])


def test_missing_feature_cells_become_null(tmp_path):
  text = 'user,item,price,click,buy,amount\n,1,,1,0,0\nu1,,nan,0,0,0\n'
  raw = tabular.load_raw(_config(_write_csv(tmp_path, text), time_column=''))
  assert raw.features['user'].to_list() == [None, 'u1']
  assert raw.features['item'].to_list() == ['1', None]
  assert raw.features['price'].to_list() == [None, None]


def test_hillstrom_config_and_rates():
  config = hillstrom.get_config(f'data.path={HILLSTROM}')
  if not os.path.isfile(config.data.path):
    pytest.skip(f'{config.data.path} is absent (the shared data folder is not beside '
                'this clone)')
  raw = tabular.load_raw(config)
  assert raw.labels.shape == (64000, 2) and raw.time is None
  visit, conversion = raw.labels.mean(axis=0)
  assert visit == pytest.approx(0.1468, abs=5e-4)
  assert conversion == pytest.approx(0.0090, abs=5e-4)
  assert raw.core.max() == pytest.approx(499.0) and raw.core.mean() == pytest.approx(1.05,
                                                                                     abs=0.01)
  data = pipeline.prepare(raw, config)
  assert (len(data.train), len(data.valid), len(data.test)) == (51200, 6400, 6400)
  assert data.spec.binary_tasks == ('visit', 'conversion') and data.spec.core_task == 'spend'
  assert data.spec.num_fields == 9


_GOOD = 'user,item,price,click,buy,amount\n'
_BAD_FILES = {
    # case: (file text, column named in the message, count in the message)
    'non_numeric_label': (_GOOD + 'a,1,1,yes,0,0\nb,1,1,1,0,0\nc,1,1,no,0,0\n', 'click',
                          '2 rows'),
    'nan_label': (_GOOD + 'a,1,1,1,,0\nb,1,1,1,nan,0\nc,1,1,1,1,3\n', 'buy', '2 rows'),
    'label_two': (_GOOD + 'a,1,1,2,0,0\nb,1,1,1,1,3\n', 'click', '1 row'),
    'negative_core': (_GOOD + 'a,1,1,1,1,-3\nb,1,1,1,1,-0.5\nc,1,1,1,1,3\n', 'amount',
                      '2 rows'),
    'inf_core': (_GOOD + 'a,1,1,1,1,inf\nb,1,1,1,1,3\n', 'amount', '1 row'),
    'nan_core': (_GOOD + 'a,1,1,1,1,\nb,1,1,1,1,3\n', 'amount', '1 row'),
    'non_numeric_core': (_GOOD + 'a,1,1,1,1,$3\nb,1,1,1,1,x\nc,1,1,1,1,4\n', 'amount',
                         '2 rows'),
    'non_numeric_feature': (_GOOD + 'a,1,cheap,1,1,3\n', 'price', '1 row'),
}


@pytest.mark.parametrize('case', sorted(_BAD_FILES))
def test_bad_cells_raise(tmp_path, case):
  text, column, count = _BAD_FILES[case]
  path = _write_csv(tmp_path, text, name=f'{case}.csv')
  with pytest.raises(DataError) as error:
    tabular.load_raw(_config(path, time_column=''))
  message = str(error.value)
  assert '\n' not in message
  assert f'{case}.csv' in message and repr(column) in message and count in message


def test_missing_file(tmp_path):
  path = str(tmp_path / 'nowhere.csv')
  with pytest.raises(DataError, match='nowhere.csv: file not found'):
    tabular.load_raw(_config(path))


def test_missing_columns_are_all_named(tmp_path):
  path = _write_csv(tmp_path, 'user,price,click,amount\nu,1,1,3\n', name='short.csv')
  with pytest.raises(DataError) as error:
    tabular.load_raw(_config(path, time_column=''))
  message = str(error.value)
  assert 'short.csv' in message and "'item'" in message and "'buy'" in message


@pytest.mark.parametrize('text', ['', _GOOD])
def test_empty_file(tmp_path, text):
  path = _write_csv(tmp_path, text, name='blank.csv')
  with pytest.raises(DataError, match=r'blank\.csv: .*empty.*0'):
    tabular.load_raw(_config(path, time_column=''))


def test_empty_split(tmp_path):
  path = _write_csv(tmp_path, _GOOD + 'a,1,1,1,0,0\n' * 5, name='tiny.csv')
  config = _config(path, time_column='')
  raw = tabular.load_raw(config)
  with pytest.raises(DataError, match=r'tiny\.csv: .*empty.*5 rows'):
    pipeline.prepare(raw, config)


def test_unparsable_time(tmp_path):
  text = 'user,item,price,click,buy,amount,ts\na,1,1,1,0,0,2024-01-01\nb,1,1,1,0,0,soon\n'
  path = _write_csv(tmp_path, text, name='times.csv')
  with pytest.raises(DataError, match=r"times\.csv: column 'ts': 1 row is not a number"):
    tabular.load_raw(_config(path))


@pytest.mark.parametrize('key,flag', [('tasks', '--config.data.tasks'),
                                      ('core', '--config.data.core'),
                                      ('path', '--config.data.path'),
                                      ('categorical', '--config.data.categorical')])
def test_missing_config_key(tmp_path, key, flag):
  path = _write_csv(tmp_path, _GOOD + 'a,1,1,1,0,0\n')
  config = _config(path, time_column='')
  config.data[key] = ''
  if key == 'categorical':
    config.data.numeric = ''
  with pytest.raises(DataError, match=flag):
    tabular.load_raw(config)


def test_label_used_as_feature_is_rejected(tmp_path):
  path = _write_csv(tmp_path, _GOOD + 'a,1,1,1,0,0\n')
  with pytest.raises(DataError, match="'click' is declared twice"):
    tabular.load_raw(_config(path, time_column='', categorical='user,click'))


def test_unsupported_suffix(tmp_path):
  path = _write_csv(tmp_path, _GOOD, name='data.xlsx')
  with pytest.raises(DataError, match=r'data\.xlsx: unsupported file type'):
    tabular.input_files(_config(path))

"""Tests for the Kaggle-Revenue loader on a hand-made ``transactions.csv``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from htl_jax.configs import kaggle_revenue as kaggle_config
from htl_jax.data import kaggle_revenue, pipeline
from htl_jax.errors import DataError

_HEADER = ('id,chain,dept,category,company,brand,date,productsize,productmeasure,'
           'purchasequantity,purchaseamount')
A, B, OTHER = 10000, 101200010, 999  # two of the 20 ZILN companies and one that is not

# (id, chain, dept, category, company, brand, date, measure, amount). Per (id, company):
# 1/A: a return before the start; start 2012-03-01 with 2.0 + 5.0 (largest: chain 11);
#      +30d 4.0 (1M and 1Y), +31d 1.0 (1Y), +365d 10.0 (1Y, 2012 is a leap year), +366d out.
# 1/B: start 2012-05-10, a 3.0 tie (chain 15 wins over 20), +52d 2.0 (1Y only).
# 2/A: one purchase 2012-01-15; 2/OTHER is dropped.  3/A: only amounts <= 0, no example.
# 4/B: start 2012-02-01 (no productmeasure), +9d 2.5.
_ROWS = [
    (1, 10, 1, 100, A, 5, '2012-02-15', 'OZ', -3.0),
    (1, 10, 1, 100, A, 5, '2012-03-01', 'OZ', 2.0),
    (1, 11, 2, 200, A, 6, '2012-03-01', 'CT', 5.0),
    (1, 10, 1, 100, A, 5, '2012-03-31', 'OZ', 4.0),
    (1, 10, 1, 100, A, 5, '2012-04-01', 'OZ', 1.0),
    (1, 10, 1, 100, A, 5, '2013-03-01', 'OZ', 10.0),
    (1, 10, 1, 100, A, 5, '2013-03-02', 'OZ', 100.0),
    (1, 20, 9, 900, B, 7, '2012-05-10', 'LB', 3.0),
    (1, 15, 9, 901, B, 8, '2012-05-10', 'RL', 3.0),
    (1, 20, 9, 900, B, 7, '2012-07-01', 'LB', 2.0),
    (2, 30, 3, 300, A, 9, '2012-01-15', 'OZ', 8.0),
    (2, 30, 3, 300, OTHER, 9, '2012-01-10', 'OZ', 50.0),
    (2, 30, 3, 300, OTHER, 9, '2012-01-20', 'OZ', 50.0),
    (3, 40, 4, 400, A, 1, '2012-01-01', 'OZ', 0.0),
    (3, 40, 4, 400, A, 1, '2012-01-02', 'OZ', -1.0),
    (3, 40, 4, 400, OTHER, 1, '2012-01-02', 'OZ', 7.0),
    (4, 50, 5, 500, B, 2, '2012-02-01', '', 1.5),
    (4, 50, 5, 500, B, 2, '2012-02-10', '', 2.5),
]


def _write(directory, rows) -> str:
  lines = [_HEADER] + [f'{i},{c},{d},{cat},{co},{b},{date},12,{m},1,{amount}'
                       for i, c, d, cat, co, b, date, m, amount in rows]
  path = directory / kaggle_revenue.FILE_NAME
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _config(directory):
  config = kaggle_config.get_config()
  config.data_dir = str(directory)
  return config


def test_ziln_preprocessing(tmp_path):
  path = _write(tmp_path, _ROWS[::-1])  # file order must not matter
  raw = kaggle_revenue.load_raw(_config(tmp_path))
  assert raw.source == path
  assert raw.binary_tasks == ('repurchase_1y', 'repurchase_1m')
  assert raw.core_task == 'amount_1m' and raw.numeric == ('log_first_day_value',)
  features = raw.features.to_dict(as_series=False)
  assert list(features) == ['chain', 'dept', 'category', 'brand', 'productmeasure',
                            'company', 'log_first_day_value']
  # Sorted by start date: 2/A (01-15), 4/B (02-01), 1/A (03-01), 1/B (05-10).
  assert features['company'] == [A, B, A, B]
  assert features['chain'] == [30, 50, 11, 15]
  assert features['dept'] == [3, 5, 2, 9]
  assert features['category'] == [300, 500, 200, 901]
  assert features['brand'] == [9, 2, 6, 8]
  assert features['productmeasure'] == ['OZ', None, 'CT', 'RL']
  np.testing.assert_allclose(features['log_first_day_value'],
                             [math.log(8.0), math.log(1.5), math.log(7.0), math.log(6.0)])
  np.testing.assert_array_equal(raw.labels, [[0, 0], [1, 1], [1, 1], [1, 0]])
  np.testing.assert_allclose(raw.core, [0.0, 2.5, 4.0, 0.0])
  assert raw.labels.dtype == np.float32 and raw.core.dtype == np.float32
  days = lambda date: int(np.datetime64(date, 'D').astype(np.int64))
  np.testing.assert_array_equal(
      raw.time, [days('2012-01-15'), days('2012-02-01'), days('2012-03-01'),
                 days('2012-05-10')])


def test_one_year_amount_and_nesting(tmp_path):
  _write(tmp_path, _ROWS)
  table = kaggle_revenue.customer_table(
      kaggle_revenue._scan(str(tmp_path / kaggle_revenue.FILE_NAME), 0)).collect()
  amounts = dict(zip(zip(table['id'], table['company']), table['amount_1y']))
  assert amounts == {(2, A): 0.0, (4, B): 2.5, (1, A): 15.0, (1, B): 2.0}
  raw = kaggle_revenue.load_raw(_config(tmp_path))
  assert np.all(raw.labels[:, 1] <= raw.labels[:, 0])
  assert np.all((raw.core > 0) == (raw.labels[:, 1] == 1))


def test_chronological_split_by_start_date(tmp_path):
  # 20 customers with shuffled start dates; customer k spends k in its first month.
  rng = np.random.default_rng(0)
  rows = []
  for k in rng.permutation(20):
    start = np.datetime64('2012-03-01') + int(k)
    rows.append((100 + k, 1, 1, 1, A, 1, str(start), 'OZ', 1.0))
    rows.append((100 + k, 1, 1, 1, A, 1, str(start + 3), 'OZ', float(k)))
  _write(tmp_path, rows)
  config = _config(tmp_path)
  data = pipeline.prepare(kaggle_revenue.load_raw(config), config)
  np.testing.assert_allclose(data.train.core, np.arange(16.0))
  np.testing.assert_allclose(data.valid.core, [16.0, 17.0])
  np.testing.assert_allclose(data.test.core, [18.0, 19.0])
  assert data.spec.fields[-1] == 'log_first_day_value'


def test_max_rows_limits_transactions(tmp_path):
  _write(tmp_path, _ROWS)
  config = _config(tmp_path)
  config.data.max_rows = 7  # customer 1's company A rows only
  raw = kaggle_revenue.load_raw(config)
  assert raw.features['company'].to_list() == [A]
  np.testing.assert_allclose(raw.core, [4.0])


def test_missing_data_dir():
  with pytest.raises(DataError, match='--config.data_dir'):
    kaggle_revenue.load_raw(kaggle_config.get_config())


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match=r'transactions\.csv: file not found'):
    kaggle_revenue.load_raw(_config(tmp_path))


def test_missing_columns(tmp_path):
  (tmp_path / kaggle_revenue.FILE_NAME).write_text('id,chain,date\n1,2,2012-01-01\n')
  with pytest.raises(DataError) as error:
    kaggle_revenue.load_raw(_config(tmp_path))
  message = str(error.value)
  assert 'transactions.csv' in message
  assert "'company'" in message and "'purchaseamount'" in message


@pytest.mark.parametrize('text', ['', _HEADER + '\n'])
def test_empty_file(tmp_path, text):
  (tmp_path / kaggle_revenue.FILE_NAME).write_text(text)
  with pytest.raises(DataError, match=r'transactions\.csv: .*empty'):
    kaggle_revenue.load_raw(_config(tmp_path))


def test_unparsable_cell(tmp_path):
  _write(tmp_path, _ROWS[:3] + [(1, 'x', 1, 100, A, 5, '2012-03-02', 'OZ', 1.0)])
  with pytest.raises(DataError, match=r'transactions\.csv: cannot parse'):
    kaggle_revenue.load_raw(_config(tmp_path))


def test_infinite_amount(tmp_path):
  _write(tmp_path, _ROWS + [(2, 30, 3, 300, A, 9, '2012-01-20', 'OZ', 'inf')])
  with pytest.raises(DataError, match=r"transactions\.csv: column 'purchaseamount': 1 "):
    kaggle_revenue.load_raw(_config(tmp_path))

"""Tests for the field encodings (:mod:`htl_jax.data.encoding`) and the loaders' chunked
``read_features``: fitting on train and applying to any rows give the training ids."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import polars as pl
import pytest

from htl_jax.configs import kaggle_revenue as kaggle_config
from htl_jax.configs import kuairand as kuairand_config
from htl_jax.configs import tabular as tabular_config
from htl_jax.data import encoding, kaggle_revenue, kuairand, read_features, tabular
from htl_jax.data.schema import Unparseable
from htl_jax.errors import DataError


def _round_trip(encoder: encoding.Encoder) -> encoding.Encoder:
  return encoding.Encoder.from_dict(json.loads(json.dumps(encoder.to_dict())))


def test_categorical_ids_unseen_values_and_nulls():
  train = pl.DataFrame({
      'small_int': [5, 3, 5, None, 9],
      'huge_int': [10**12, 7, 10**12, 3, None],
      'text': ['b', 'a', None, 'c', 'a'],
      'flag': [True, False, True, True, None],
      'real': [1.5, float('nan'), 0.5, 1.5, None],
  })
  encoder = encoding.fit(train, (), np.ones(5, bool), num_buckets=4, encoding='quantile')
  assert encoder.vocab_sizes == (4, 4, 4, 3, 3)
  new = pl.DataFrame({
      'small_int': [9, 4, None, 3, 100],
      'huge_int': [7, 10**12, 8, None, 3],
      'text': ['c', 'z', None, 'a', 'b'],
      'flag': [False, None, True, True, False],
      'real': [0.5, 2.0, float('nan'), 1.5, None],
  })
  for enc in (encoder, _round_trip(encoder)):
    columns, unseen = enc.encode(new)
    np.testing.assert_array_equal(np.stack(columns, axis=1), [
        [3, 2, 3, 1, 1], [0, 3, 0, 0, 0], [0, 0, 0, 2, 0], [1, 0, 1, 2, 2], [0, 1, 2, 1, 0]])
    assert unseen == {'small_int': 2, 'huge_int': 1, 'text': 1, 'flag': 0, 'real': 1}


def test_codes_are_encoded_by_the_strings_they_stand_for():
  codes = {'tier': np.array(['gold', 'silver', 'zinc'], dtype=object)}
  train = pl.DataFrame({'tier': [2, 1, 2, None]})           # silver, gold, silver, null
  encoder = encoding.fit(train, (), np.array([1, 1, 1, 0], bool), num_buckets=2,
                         encoding='quantile', codes=codes)
  assert list(encoder.fields[0].values) == ['gold', 'silver']
  # another side table: new strings shift every code
  other = {'tier': np.array(['bronze', 'gold', 'iron', 'silver'], dtype=object)}
  columns, unseen = encoder.encode(pl.DataFrame({'tier': [4, 2, 1, None, 3]}), other)
  np.testing.assert_array_equal(columns[0], [2, 1, 0, 0, 0])
  assert unseen == {'tier': 2}
  plain, _ = encoder.encode(pl.DataFrame({'tier': ['silver', 'gold', 'bronze']}))
  np.testing.assert_array_equal(plain[0], [2, 1, 0])


@pytest.mark.parametrize('kind', ['quantile', 'standardize'])
def test_numeric_buckets_are_fitted_on_train_and_round_trip(kind):
  rng = np.random.default_rng(0)
  values = rng.lognormal(0, 1, 400)
  values[::17] = np.nan
  frame = pl.DataFrame({'x': values})
  is_train = np.arange(400) < 300
  encoder = encoding.fit(frame, ('x',), is_train, num_buckets=6, encoding=kind)
  field = encoder.fields[0]
  ids = encoder.encode(frame)[0][0]
  assert ids.min() == 0 and ids.max() == field.size - 1 and np.all(ids[::17] == 0)
  if kind == 'quantile':   # training rows spread evenly over the buckets
    counts = np.bincount(ids[is_train], minlength=field.size)[1:]
    assert counts.max() - counts.min() <= 1
  np.testing.assert_array_equal(_round_trip(encoder).encode(frame)[0][0], ids)
  empty = encoding.fit(frame, ('x',), np.zeros(400, bool), num_buckets=6, encoding=kind)
  assert empty.vocab_sizes == (1,) and not empty.encode(frame)[0][0].any()


def test_a_missing_field_column_is_a_data_error():
  encoder = encoding.fit(pl.DataFrame({'a': [1, 2], 'b': ['x', 'y']}), (), np.ones(2, bool),
                         num_buckets=2, encoding='quantile')
  with pytest.raises(DataError, match=r"new.csv: missing feature column\(s\) \['b'\]"):
    encoder.encode(pl.DataFrame({'a': [1]}), source='new.csv')


def _chunked_ids(raw, config, passthrough, chunk_rows):
  """The training encoder applied to ``read_features`` chunks, concatenated."""
  encoder = encoding.fit(raw.features, raw.numeric, np.arange(len(raw.core)) % 3 > 0,
                         num_buckets=5, encoding='quantile', codes=raw.codes)
  expected = np.stack(encoder.encode(raw.features, raw.codes)[0], axis=1)
  chunks = list(read_features(config, passthrough, chunk_rows))
  got = np.concatenate([np.stack(encoder.encode(c.features, c.codes)[0], axis=1)
                        for c in chunks])
  passed = pl.concat([c.passthrough for c in chunks])
  return expected, got, passed, chunks


def test_kuairand_chunks_give_the_training_ids():
  config = kuairand_config.get_config()
  config.data.max_rows = 0
  raw = kuairand.load_raw(config)
  expected, got, passed, chunks = _chunked_ids(raw, config, ('user_id', 'time_ms'), 4999)
  assert len(chunks) == -(-len(raw.core) // 4999)
  np.testing.assert_array_equal(got, expected)
  assert passed['time_ms'].cast(pl.Int64).to_list() == raw.time.tolist()


def test_kaggle_chunks_give_the_training_ids(tmp_path):
  rng = np.random.default_rng(1)
  n = 600
  dates = np.datetime64('2012-03-01') + rng.integers(0, 400, n).astype('timedelta64[D]')
  pl.DataFrame({
      'id': np.sort(rng.integers(1, 120, n)), 'chain': rng.integers(1, 9, n),
      'dept': rng.integers(1, 5, n), 'category': rng.integers(1, 30, n),
      'company': np.array(kaggle_revenue.COMPANIES[:4])[rng.integers(0, 4, n)],
      'brand': rng.integers(1, 50, n), 'date': dates.astype(str), 'productsize': 1,
      'productmeasure': rng.choice(['OZ', 'CT', 'LB'], n), 'purchasequantity': 1,
      'purchaseamount': np.round(rng.lognormal(1, 1, n), 2),
  }).write_csv(tmp_path / kaggle_revenue.FILE_NAME)
  config = kaggle_config.get_config()
  config.data_dir = str(tmp_path)
  raw = kaggle_revenue.load_raw(config)
  expected, got, passed, _ = _chunked_ids(raw, config, ('id', 'company'), 37)
  np.testing.assert_array_equal(got, expected)
  assert passed.columns == ['id', 'company'] and passed.height == len(raw.core)


@pytest.mark.parametrize('suffix', ['.csv', '.parquet'])
def test_tabular_chunks_give_the_training_ids(tmp_path, suffix):
  rng = np.random.default_rng(2)
  n = 300
  frame = pl.DataFrame({
      'key': np.arange(n), 'user': rng.integers(0, 40, n).astype(str),
      'price': [None if r < 0.1 else v for r, v in zip(rng.random(n), rng.random(n))],
      'click': np.ones(n, np.int64), 'amount': rng.random(n),
  })
  path = str(tmp_path / f'data{suffix}')
  frame.write_csv(path) if suffix == '.csv' else frame.write_parquet(path)
  config = tabular_config.get_config()
  config.data.update(path=path, categorical='user', numeric='price', tasks='click',
                     core='amount')
  raw = tabular.load_raw(config)
  expected, got, passed, chunks = _chunked_ids(raw, config, ('key',), 64)
  np.testing.assert_array_equal(got, expected)
  assert len(chunks) == 5
  assert passed['key'].cast(pl.Int64).to_list() == list(range(n))
  frame.drop('price').write_parquet(tmp_path / 'bad.parquet')
  config.data.path = str(tmp_path / 'bad.parquet')
  with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) 'price'"):
    list(read_features(config, ('key',), 64))


@pytest.mark.parametrize('suffix', ['.csv', '.parquet'])
def test_tabular_read_features_counts_cells_that_are_not_numbers(tmp_path, suffix):
  frame = pl.DataFrame({
      'user': ['a', 'b', 'c', 'd', 'e'], 'price': ['1.5', 'abc', None, '2', 'x'],
      'age': ['30', '41', '52', '63', '74'], 'click': [1, 0, 1, 0, 1],
      'amount': [1.0, 0.0, 2.0, 0.0, 3.0]})
  path = str(tmp_path / f'data{suffix}')
  frame.write_csv(path) if suffix == '.csv' else frame.write_parquet(path)
  config = tabular_config.get_config()
  config.data.update(path=path, categorical='user', numeric='price,age', tasks='click',
                     core='amount')
  chunks = list(read_features(config, (), 2))
  assert [c.unparseable for c in chunks] == [
      {'price': Unparseable(1, 'abc')}, {}, {'price': Unparseable(1, 'x')}]
  prices = pl.concat([c.features['price'] for c in chunks]).to_list()
  assert prices == [1.5, None, None, 2.0, None]
  with pytest.raises(DataError, match=r"column 'price': 2 rows are not a number \(e.g. 'abc'\)"):
    tabular.load_raw(config)             # training rejects what scoring counts


def test_kuairand_read_features_counts_durations_that_are_not_numbers(tmp_path):
  for name in (kuairand.USER_FILE, kuairand.VIDEO_FILE):
    (tmp_path / name).write_bytes((pathlib.Path(kuairand.SAMPLE_DIR) / name).read_bytes())
  log = pl.read_csv(pathlib.Path(kuairand.SAMPLE_DIR) / kuairand.LOG_FILE, infer_schema=False,
                    n_rows=10)
  durations = log['duration_ms'].to_list()
  durations[1], durations[2], durations[7] = 'abc', '', '9s'
  log.with_columns(pl.Series('duration_ms', durations)).write_csv(tmp_path / kuairand.LOG_FILE)
  config = kuairand_config.get_config()
  config.data_dir, config.data.max_rows = str(tmp_path), 0
  chunks = list(read_features(config, ('duration_ms',), 5))
  assert [c.unparseable for c in chunks] == [
      {'duration_ms': Unparseable(1, 'abc')},
      {'duration_ms': Unparseable(1, '9s')}]
  features = pl.concat([c.features for c in chunks])
  assert features['duration_ms'].is_null().to_list() == [i in (1, 2, 7) for i in range(10)]
  assert pl.concat([c.passthrough for c in chunks])['duration_ms'].dtype == pl.Float64
  with pytest.raises(DataError, match="could not parse `abc`"):
    kuairand.load_raw(config)            # training rejects what scoring counts

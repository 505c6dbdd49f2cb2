"""Tests for htl_jax.data.pipeline: validation, split, vocabularies, buckets, batches, cache."""

from __future__ import annotations

import logging
import os

import numpy as np
import polars as pl
import pytest

from htl_jax.configs.base import get_base_config
from htl_jax.data import load_dataset, pipeline
from htl_jax.data.schema import RawTable
from htl_jax.errors import DataError


def _config(**data):
  config = get_base_config()
  config.dataset = 'synthetic'
  for key, value in data.items():
    config.data[key] = value
  return config


def _raw(features, labels, core, time=None, numeric=(), source='toy.csv'):
  labels = np.asarray(labels, np.float32)
  if labels.ndim == 1:
    labels = labels[:, None]
  tasks = tuple(f't{i}' for i in range(labels.shape[1]))
  return RawTable(features=pl.DataFrame(features), numeric=tuple(numeric), labels=labels,
                  core=np.asarray(core, np.float32),
                  time=None if time is None else np.asarray(time),
                  binary_tasks=tasks, core_task='amount', source=source,
                  label_columns=tasks + ('amount_col',))


def _toy(n=20, time=None, **features):
  labels = np.zeros((n, 2))
  return _raw(features or {'f': np.arange(n)}, labels, np.zeros(n), time=time)


def test_vocab_is_built_on_train_only_with_oov():
  n = 20  # 16 train, 2 valid, 2 test (chronological)
  ints = np.r_[np.full(16, 5), 7, 5, 9, 5]          # 7 and 9 unseen in train
  strings = ['b', 'a'] * 8 + ['a', 'zz', None, 'b']  # 'zz' unseen, None null
  big = np.r_[np.full(8, 10**15), np.full(8, -3), 10**15, 11, 12, -3]  # wide range path
  raw = _raw({'i': ints, 's': strings, 'big': big}, np.zeros((n, 1)), np.zeros(n),
             time=np.arange(n))
  data = pipeline.prepare(raw, _config())
  assert data.spec.fields == ('i', 's', 'big')
  assert data.spec.vocab_sizes == (2, 3, 3)
  np.testing.assert_array_equal(data.train.x[:4], [[1, 2, 2], [1, 1, 2], [1, 2, 2], [1, 1, 2]])
  np.testing.assert_array_equal(data.valid.x, [[0, 1, 2], [1, 0, 0]])
  np.testing.assert_array_equal(data.test.x, [[0, 0, 0], [1, 2, 1]])
  assert data.train.x.dtype == np.int32 and data.train.y.dtype == np.float32
  assert data.train.core.dtype == np.float32


def test_null_float_and_bool_categoricals_map_to_oov():
  n = 10
  raw = _raw({'f': [1.5, np.nan, None, 2.5, 1.5, 2.5, 1.5, 2.5, 3.5, np.nan],
              'b': [True, False, None, True, True, True, True, True, False, None]},
             np.zeros((n, 1)), np.zeros(n), time=np.arange(n))
  data = pipeline.prepare(raw, _config())
  np.testing.assert_array_equal(data.train.x[:, 0], [1, 0, 0, 2, 1, 2, 1, 2])
  np.testing.assert_array_equal(data.test.x, [[0, 0]])
  np.testing.assert_array_equal(data.train.x[:3, 1], [2, 1, 0])


def test_nested_feature_column_raises():
  raw = _raw({'l': [[1, 2]] * 10}, np.zeros((10, 1)), np.zeros(10))
  with pytest.raises(DataError, match=r"toy.csv.*'l'"):
    pipeline.prepare(raw, _config())


def test_chronological_split_sorts_by_time_stably():
  n = 20
  time = np.r_[np.arange(19, 1, -1), 0, 0]  # reversed, with a tie at the start
  raw = _raw({'row': np.arange(n)}, np.zeros((n, 1)), np.arange(n), time=time)
  data = pipeline.prepare(raw, _config())
  assert (len(data.train), len(data.valid), len(data.test)) == (16, 2, 2)
  np.testing.assert_array_equal(data.train.core[:3], [18, 19, 17])  # stable tie order
  np.testing.assert_array_equal(data.valid.core, [3, 2])
  np.testing.assert_array_equal(data.test.core, [1, 0])


def test_random_split_is_drawn_from_split_seed_and_partitions_rows():
  n = 50
  raw = _raw({'row': np.arange(n)}, np.zeros((n, 1)), np.arange(n))

  def parts(seed):
    config = _config()
    config.split_seed = seed
    data = pipeline.prepare(raw, config)
    return [s.core.copy() for s in (data.train, data.valid, data.test)]

  first, again, other = parts(3), parts(3), parts(4)
  assert [len(p) for p in first] == [40, 5, 5]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[1], other[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(n))
  assert not np.array_equal(first[0], np.arange(40))


def test_nesting_is_enforced_and_counted(caplog):
  caplog.set_level(logging.INFO)
  n = 10
  labels = np.zeros((n, 3))
  labels[0] = [0, 1, 1]  # fixed
  labels[1] = [1, 0, 1]  # fixed
  labels[2] = [1, 1, 0]  # fine
  raw = _raw({'row': np.arange(n)}, labels, np.zeros(n), time=np.arange(n))
  data = pipeline.prepare(raw, _config())
  np.testing.assert_array_equal(data.train.y[:3], [[0, 0, 0], [1, 0, 0], [1, 1, 0]])
  assert '2 rows fixed' in caplog.text


def test_quantile_buckets_fitted_on_train():
  n = 100
  values = np.r_[np.arange(80, dtype=float), [np.nan] * 5, [-5.0, 1000.0], [10.0] * 13]
  raw = _raw({'v': values}, np.zeros((n, 1)), np.zeros(n), time=np.arange(n),
             numeric=('v',))
  data = pipeline.prepare(raw, _config(numeric_buckets=4))
  assert data.spec.vocab_sizes == (5,)
  np.testing.assert_array_equal(np.bincount(data.train.x[:, 0]), [0, 20, 20, 20, 20])
  np.testing.assert_array_equal(data.valid.x[:, 0], [0] * 5 + [1, 4] + [1] * 3)
  assert set(data.test.x[:, 0]) == {1}


def test_numeric_strings_nulls_and_inf():
  n = 10
  raw = _raw({'v': ['1', '2', None, '3', '4', '5', '6', '7', '8', '9']}, np.zeros((n, 1)),
             np.zeros(n), time=np.arange(n), numeric=('v',))
  data = pipeline.prepare(raw, _config(numeric_buckets=2))
  np.testing.assert_array_equal(data.train.x[:, 0], [1, 1, 0, 1, 2, 2, 2, 2])
  bad = _raw({'v': ['1', 'x'] * 5}, np.zeros((n, 1)), np.zeros(n), numeric=('v',))
  with pytest.raises(DataError, match=r"toy.csv.*'v'.*5 rows"):
    pipeline.prepare(bad, _config())


def test_standardize_buckets():
  n = 10
  values = np.r_[[-1.0, 1.0] * 4, 100.0, -100.0]
  raw = _raw({'v': values}, np.zeros((n, 1)), np.zeros(n), time=np.arange(n),
             numeric=('v',))
  data = pipeline.prepare(raw, _config(numeric_buckets=6, numeric_encoding='standardize'))
  assert data.spec.vocab_sizes == (7,)
  np.testing.assert_array_equal(data.train.x[:2, 0], [3, 5])  # z = -1 and +1
  np.testing.assert_array_equal(data.valid.x[:, 0], [6])      # clipped at +3
  np.testing.assert_array_equal(data.test.x[:, 0], [1])       # clipped at -3


def test_batches_padding_weight_index_and_shuffle():
  n = 10
  raw = _raw({'row': np.arange(n)}, np.zeros((n, 1)), np.arange(n), time=np.arange(n))
  split = pipeline.prepare(raw, _config()).train  # 8 rows, core = 0..7
  padded = list(pipeline.batches(split, 3, shuffle=False, seed=0, epoch=0,
                                 drop_remainder=False))
  assert len(padded) == pipeline.num_batches(8, 3, False) == 3
  last = padded[-1]
  np.testing.assert_array_equal(last['index'], [6, 7, 0])
  np.testing.assert_array_equal(last['weight'], [1, 1, 0])
  np.testing.assert_array_equal(last['core'], [6, 7, 0])
  assert {k: (v.dtype.name, v.shape) for k, v in last.items()} == {
      'x': ('int32', (3, 1)), 'y': ('float32', (3, 1)), 'core': ('float32', (3,)),
      'index': ('int32', (3,)), 'weight': ('float32', (3,))}
  dropped = list(pipeline.batches(split, 3, shuffle=True, seed=1, epoch=2,
                                  drop_remainder=True))
  assert len(dropped) == pipeline.num_batches(8, 3, True) == 2
  expected = np.random.default_rng((1, 2)).permutation(8)[:6]
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in dropped]), expected)
  np.testing.assert_array_equal(np.concatenate([b['core'] for b in dropped]), expected)
  assert all(b['weight'].sum() == 3 for b in dropped)
  other = next(pipeline.batches(split, 8, shuffle=True, seed=1, epoch=3,
                                drop_remainder=True))
  assert not np.array_equal(other['index'], np.random.default_rng((1, 2)).permutation(8))
  with pytest.raises(ValueError):
    pipeline.num_batches(8, 0, True)


def test_cache_hit_skips_build_and_corrupt_cache_rebuilds(tmp_path):
  config = _config(max_rows=200)
  calls = []

  def build():
    calls.append(1)
    return load_dataset(config)

  key = {'dataset': 'synthetic', 'files': [], 'data': config.data.to_dict()}
  first = pipeline.load_cached(key, str(tmp_path), build)
  second = pipeline.load_cached(key, str(tmp_path), build)
  assert len(calls) == 1
  assert second.spec == first.spec
  for name in ('train', 'valid', 'test'):
    np.testing.assert_array_equal(getattr(second, name).x, getattr(first, name).x)
    np.testing.assert_array_equal(getattr(second, name).core, getattr(first, name).core)
  entries = [e for e in os.listdir(tmp_path) if not e.startswith('.')]
  assert entries == [pipeline.cache_key(key)]
  with open(tmp_path / entries[0] / 'data.npz', 'wb') as f:
    f.write(b'not a zip file')
  third = pipeline.load_cached(key, str(tmp_path), build)
  assert len(calls) == 2
  np.testing.assert_array_equal(third.train.x, first.train.x)
  pipeline.load_cached(key, str(tmp_path), build)
  assert len(calls) == 2
  pipeline.load_cached({**key, 'seed': 1}, str(tmp_path), build)
  assert len(calls) == 3


def test_load_dataset_cache_and_unknown_dataset(tmp_path):
  config = _config(max_rows=100)
  a = load_dataset(config, cache_dir=str(tmp_path))
  b = load_dataset(config, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(a.test.y, b.test.y)
  assert len(os.listdir(tmp_path)) == 1
  config.dataset = 'nope'
  with pytest.raises(DataError, match='kuairand'):
    load_dataset(config)


@pytest.mark.parametrize('labels, core, match', [
    ([0, 1, np.nan, 1] * 5, np.ones(20), r"toy.csv.*'t0'.*5 rows"),
    ([0, 1, 2, 1] * 5, np.ones(20), r"toy.csv.*'t0'.*5 rows"),
    ([0, 1] * 10, [1.0, -2.0] * 10, r"toy.csv.*'amount_col'.*10 rows"),
    ([0, 1] * 10, [1.0] * 19 + [np.inf], r"toy.csv.*'amount_col'.*1 rows"),
])
def test_bad_labels_raise(labels, core, match):
  raw = _raw({'row': np.arange(20)}, labels, core)
  with pytest.raises(DataError, match=match):
    pipeline.prepare(raw, _config())


def test_task_name_used_without_label_columns():
  raw = _raw({'row': np.arange(20)}, [0, 3] * 10, np.ones(20))
  raw.label_columns = None
  with pytest.raises(DataError, match=r"'t0'.*10 rows"):
    pipeline.prepare(raw, _config())


def test_empty_table_and_empty_split_raise():
  with pytest.raises(DataError, match='empty'):
    pipeline.prepare(_toy(0), _config())
  with pytest.raises(DataError, match=r'toy.csv.*valid.*empty'):
    pipeline.prepare(_toy(5), _config())

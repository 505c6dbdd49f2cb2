"""Tests for the KuaiRand-Pure loader on the embedded sample and on freshly generated files."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from htl_jax.configs.base import get_base_config
from htl_jax.data import kuairand, load_dataset, pipeline
from htl_jax.errors import DataError
from tools import make_kuairand_sample


def _config(data_dir=''):
  config = get_base_config()
  config.dataset = 'kuairand'
  config.data_dir = data_dir
  return config


@pytest.fixture(scope='module')
def sample():
  config = _config()
  raw = kuairand.load_raw(config)
  return raw, pipeline.prepare(raw, config)


@pytest.fixture()
def small_dir(tmp_path):
  make_kuairand_sample.make_sample(str(tmp_path), rows=600, num_users=60, num_videos=50,
                                   seed=1)
  return tmp_path


def test_embedded_sample_shapes_and_tasks(sample):
  raw, data = sample
  log = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, kuairand.LOG_FILE))
  n = log.height
  assert (len(data.train), len(data.valid), len(data.test)) == (
      int(n * 0.8), int(n * 0.9) - int(n * 0.8), n - int(n * 0.9))
  assert data.spec.tasks == ('click', 'long_view', 'watch_time')
  assert data.spec.fields == kuairand.FIELDS
  assert data.train.x.shape == (len(data.train), len(kuairand.FIELDS))
  assert data.train.y.shape == (len(data.train), 2)
  assert min(data.spec.vocab_sizes) >= 2
  for split in (data.train, data.valid, data.test):
    assert split.x.min() >= 0 and np.all(split.x.max(0) < np.array(data.spec.vocab_sizes))
  # Watch time is in seconds and the split is chronological.
  np.testing.assert_allclose(np.sort(raw.core), np.sort(log['play_time_ms'].to_numpy() / 1000),
                             rtol=1e-6)
  assert not np.all(np.diff(raw.time) >= 0)  # the log is sorted by user, not by time
  order = np.argsort(raw.time, kind='stable')
  np.testing.assert_array_equal(data.train.core, raw.core[order[:len(data.train)]])
  np.testing.assert_array_equal(data.test.core, raw.core[order[-len(data.test):]])


def test_no_outcome_column_is_a_feature(sample):
  raw, data = sample
  for column in kuairand.OUTCOME_COLUMNS:
    assert column not in data.spec.fields
    assert column not in raw.features.columns
  assert not any(f.endswith('_stay_time') or f == 'is_rand' for f in data.spec.fields)


def test_labels_are_nested_and_core_depends_on_them(sample):
  _, data = sample
  y = np.concatenate([data.train.y, data.valid.y, data.test.y])
  core = np.concatenate([data.train.core, data.valid.core, data.test.core])
  assert np.all(y[:, 1] <= y[:, 0])
  assert np.all(core[y[:, 0] == 0] == 0)
  assert core[y[:, 1] == 1].mean() > core[(y[:, 0] == 1) & (y[:, 1] == 0)].mean()


def test_multi_valued_tag_keeps_first_tag(sample):
  raw, data = sample
  videos = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, kuairand.VIDEO_FILE),
                       schema_overrides={'tag': pl.String})
  assert videos.filter(pl.col('video_id') == 0)['tag'][0] == '2,28'
  assert videos.filter(pl.col('video_id') == 1)['tag'][0] == '2'
  frame = raw.features.with_row_index('row')
  tag = {v: frame.filter(pl.col('video_id') == v)['tag'].unique().to_list() for v in (0, 1)}
  assert tag[0] == tag[1] and tag[0][0] is not None
  assert frame['tag'].n_unique() < videos['tag'].n_unique()


def test_sentinel_and_empty_cells(sample):
  raw, _ = sample
  users = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, kuairand.USER_FILE))
  videos = pl.read_csv(os.path.join(kuairand.SAMPLE_DIR, kuairand.VIDEO_FILE),
                       schema_overrides={'tag': pl.String})
  sentinel_users = users.filter(pl.col('is_live_streamer') == -124)['user_id']
  assert len(sentinel_users) > 0
  features = raw.features
  live = features.filter(pl.col('user_id').is_in(sentinel_users.implode()))['is_live_streamer']
  normal = features.filter(~pl.col('user_id').is_in(sentinel_users.implode()))
  assert live.null_count() == 0 and live.n_unique() == 1
  assert live[0] not in normal['is_live_streamer'].unique().to_list()  # its own category
  bad_duration = videos.filter(pl.col('video_duration') == -124)['video_id']
  assert len(bad_duration) > 0
  rows = features.filter(pl.col('video_id').is_in(bad_duration.implode()))
  assert rows.height > 0 and rows['video_duration'].null_count() == rows.height
  assert videos['tag'].null_count() > 0 and users['onehot_feat4'].null_count() > 0


def test_missing_column_and_file_raise(small_dir):
  log_path = small_dir / kuairand.LOG_FILE
  pl.read_csv(log_path).drop('long_view').write_csv(log_path)
  with pytest.raises(DataError, match=r'log_random_4_22_to_5_08_pure.csv.*long_view'):
    kuairand.load_raw(_config(str(small_dir)))
  os.remove(small_dir / kuairand.USER_FILE)
  with pytest.raises(DataError, match='user_features_pure.csv.*not found'):
    kuairand.load_raw(_config(str(small_dir)))


def test_bad_values_raise_with_column(small_dir):
  log_path = small_dir / kuairand.LOG_FILE
  log = pl.read_csv(log_path)
  log.with_columns(play_time_ms=pl.when(pl.int_range(log.height) < 3).then(-1)
                   .otherwise(pl.col('play_time_ms'))).write_csv(log_path)
  with pytest.raises(DataError, match=r"'play_time_ms'.*3 rows"):
    load_dataset(_config(str(small_dir)))


def test_generated_data_dir_with_cache_and_max_rows(small_dir, tmp_path):
  config = _config(str(small_dir))
  cache = str(tmp_path / 'cache')
  data = load_dataset(config, cache_dir=cache)
  again = load_dataset(config, cache_dir=cache)
  assert len(data.train) == 480 and data.spec == again.spec
  np.testing.assert_array_equal(data.valid.x, again.valid.x)
  assert kuairand.input_files(config)[0] == str(small_dir / kuairand.LOG_FILE)
  config.data.max_rows = 100
  small = load_dataset(config, cache_dir=cache)
  assert len(small.train) + len(small.valid) + len(small.test) == 100
  assert len(os.listdir(cache)) == 2


def test_generator_is_deterministic(tmp_path):
  for name in ('a', 'b', 'c'):
    make_kuairand_sample.make_sample(str(tmp_path / name), rows=300, num_users=30,
                                     num_videos=20, seed=0 if name != 'c' else 1)
  for file in (kuairand.LOG_FILE, kuairand.USER_FILE, kuairand.VIDEO_FILE):
    a, b = (tmp_path / 'a' / file).read_bytes(), (tmp_path / 'b' / file).read_bytes()
    assert a == b
  assert (tmp_path / 'a' / kuairand.LOG_FILE).read_bytes() != (
      tmp_path / 'c' / kuairand.LOG_FILE).read_bytes()
  header = pl.read_csv(tmp_path / 'a' / kuairand.LOG_FILE, n_rows=0).columns
  assert set(kuairand.OUTCOME_COLUMNS) <= set(header)

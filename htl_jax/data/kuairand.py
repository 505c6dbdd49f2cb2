"""KuaiRand-Pure loader (the paper's "KuaiRand" dataset; docs/design.md).

Reads ``log_random_4_22_to_5_08_pure.csv`` joined with ``user_features_pure.csv`` and
``video_features_basic_pure.csv`` from ``config.data_dir``, or, when ``data_dir`` is '', from
the generated sample shipped in ``htl_jax/data/sample/kuairand/`` (same names and columns,
made by ``tools/make_kuairand_sample.py``).

Tasks: ``click`` = ``is_click`` -> ``long_view`` = ``long_view`` (nested under click), core
``watch_time`` = ``play_time_ms / 1000`` (seconds). Split chronologically by ``time_ms``.

Feature fields (no outcome column is ever a feature: ``play_time_ms``, ``long_view``, the
``is_*`` feedback, ``*_stay_time``, ``is_profile_enter``):

* log: ``user_id``, ``video_id``, ``tab``, ``hour`` (``hourmin // 100``), ``weekday`` (of
  ``date``), ``duration_ms`` (numeric). ``is_rand`` is constant in the random log and is
  dropped; ``date`` itself would be unseen in valid / test under the chronological split.
* user: ``user_active_degree``, ``is_lowactive_period``, ``is_live_streamer``,
  ``is_video_author``, the ``*_range`` bins of the follow / fans / friend counts and of
  ``register_days`` (the raw counts are dropped: the bins carry them), ``onehot_feat0..17``.
* video: ``author_id``, ``video_type``, ``upload_type``, ``visible_status``, ``music_id``,
  ``music_type``, ``tag`` (multi-valued cells such as ``"2,28"`` keep their FIRST tag,
  ``"2"``), ``server_width``, ``server_height`` (categorical), ``video_duration``
  (numeric) and ``video_age_days`` = log date - ``upload_dt`` (numeric).

Quirks: every categorical column is read as a string, so ``1`` / ``1.0`` / ``-124`` / empty
never break type inference; empty cells are null (OOV id 0); the sentinel ``-124`` in a
categorical column is its own category; negative values in the numeric columns (durations,
ages) are null. ``config.data.max_rows > 0`` keeps only the first rows of the log. The
string categories travel as integer codes with their strings (``RawTable.codes``), so the
vocabularies hold the strings themselves.

:func:`read_features` reads a log to score (same derivations, no labels) in chunks. There a
log cell of ``duration_ms`` that is not a number (an error in training) becomes missing and
is counted (``FeatureChunk.unparseable``), for prediction to report or, under ``--strict``,
reject.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from absl import logging
import numpy as np
import polars as pl

from htl_jax.data.schema import FeatureChunk, RawTable, Unparseable
from htl_jax.errors import DataError, first_line

LOG_FILE = 'log_random_4_22_to_5_08_pure.csv'
USER_FILE = 'user_features_pure.csv'
VIDEO_FILE = 'video_features_basic_pure.csv'
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sample', 'kuairand')

BINARY_TASKS = ('click', 'long_view')
CORE_TASK = 'watch_time'
LABEL_COLUMNS = ('is_click', 'long_view', 'play_time_ms')

# Columns read from each file, with explicit dtypes (String = categorical, read verbatim).
_LOG_SCHEMA = {
    'user_id': pl.Int64, 'video_id': pl.Int64, 'date': pl.Int64, 'hourmin': pl.Int64,
    'time_ms': pl.Int64, 'is_click': pl.Float64, 'long_view': pl.Float64,
    'play_time_ms': pl.Float64, 'duration_ms': pl.Float64, 'tab': pl.String,
}
_USER_CATEGORICAL = (
    'user_active_degree', 'is_lowactive_period', 'is_live_streamer', 'is_video_author',
    'follow_user_num_range', 'fans_user_num_range', 'friend_user_num_range',
    'register_days_range') + tuple(f'onehot_feat{i}' for i in range(18))
_USER_SCHEMA = {'user_id': pl.Int64, **{c: pl.String for c in _USER_CATEGORICAL}}
_VIDEO_CATEGORICAL = ('author_id', 'video_type', 'upload_type', 'visible_status', 'music_id',
                      'music_type', 'tag', 'server_width', 'server_height')
_VIDEO_SCHEMA = {'video_id': pl.Int64, 'upload_dt': pl.String, 'video_duration': pl.Float64,
                 **{c: pl.String for c in _VIDEO_CATEGORICAL}}

# The columns the loader reads, per file (:mod:`htl_jax.data.check` requires them).
READ_COLUMNS = {LOG_FILE: tuple(_LOG_SCHEMA), USER_FILE: tuple(_USER_SCHEMA),
                VIDEO_FILE: tuple(_VIDEO_SCHEMA)}

LOG_FIELDS = ('user_id', 'video_id', 'tab', 'hour', 'weekday', 'duration_ms')
# The log columns the features are computed from (what a log to score needs).
_FEATURE_SOURCE_COLUMNS = ('user_id', 'video_id', 'date', 'hourmin', 'tab', 'duration_ms')
# Numeric log columns that scoring reads as text, then parses, counting the bad cells.
_SCORED_NUMERIC = ('duration_ms',)
NUMERIC_FIELDS = ('duration_ms', 'video_duration', 'video_age_days')
FIELDS = LOG_FIELDS + _USER_CATEGORICAL + _VIDEO_CATEGORICAL + ('video_duration',
                                                                  'video_age_days')
OUTCOME_COLUMNS = ('is_click', 'is_like', 'is_follow', 'is_comment', 'is_forward', 'is_hate',
                   'long_view', 'play_time_ms', 'profile_stay_time', 'comment_stay_time',
                   'is_profile_enter')


def data_dir(config: Any) -> str:
  """The directory holding the three CSV files ('' = the embedded sample)."""
  return str(config.data_dir or '') or SAMPLE_DIR


def input_files(config: Any) -> list[str]:
  """The three input files, for the preprocessing cache key."""
  root = data_dir(config)
  return [os.path.join(root, name) for name in (LOG_FILE, USER_FILE, VIDEO_FILE)]


def _check_header(path: str, needed) -> None:
  """DataError unless ``path`` is a CSV file whose header has every column of ``needed``."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  try:
    header = pl.read_csv(path, n_rows=0).columns
  except (pl.exceptions.PolarsError, OSError) as e:
    raise DataError(f'{path}: cannot read the CSV header: {first_line(e)}') from e
  missing = [c for c in needed if c not in header]
  if missing:
    raise DataError(f'{path}: missing column(s) {missing}')


def _read(path: str, schema: dict[str, pl.DataType], n_rows: int | None = None
          ) -> pl.DataFrame:
  """Reads the columns of ``schema`` from a CSV; missing file / column -> DataError."""
  _check_header(path, schema)
  try:
    return pl.read_csv(path, columns=list(schema), schema_overrides=schema, n_rows=n_rows)
  except (pl.exceptions.PolarsError, OSError) as e:
    raise DataError(f'{path}: cannot parse: {first_line(e)}') from e


def _unique_keys(table: pl.DataFrame, key: str, path: str) -> pl.DataFrame:
  """Keeps the first row of each key so that the join never duplicates log rows."""
  nulls = table[key].null_count()
  if nulls:
    raise DataError(f'{path}: column {key!r}: {nulls} rows with an empty id')
  unique = table.unique(subset=key, keep='first', maintain_order=True)
  if unique.height != table.height:
    logging.warning('%s: %d duplicate %s rows dropped (first kept)', path,
                    table.height - unique.height, key)
  return unique


def _dense_codes(table: pl.DataFrame, columns: tuple[str, ...]
                 ) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
  """Replaces string categories by order-preserving integer codes ``1..C``.

  The 1M-row joined table then holds ints, not strings. Code ``k`` stands for the k-th
  sorted distinct string of the column, returned per column (``RawTable.codes``): the
  encoder stores the strings, so a side table with other rows (other codes) encodes the
  same string to the same id (:mod:`htl_jax.data.encoding`).
  """
  codes = {c: np.asarray(table[c].drop_nulls().unique().sort().to_list(), dtype=object)
           for c in columns}
  return table.with_columns([pl.col(c).rank('dense').cast(pl.Int64) for c in columns]), codes


def _empty_to_null(expr: pl.Expr) -> pl.Expr:
  expr = expr.str.strip_chars()
  return pl.when(expr.str.len_chars() > 0).then(expr).otherwise(None)


def _side_tables(user_path: str, video_path: str
                 ) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, np.ndarray]]:
  """The user and video feature tables, one row per id, categories as codes."""
  users = _unique_keys(_read(user_path, _USER_SCHEMA), 'user_id', user_path)
  videos = _unique_keys(_read(video_path, _VIDEO_SCHEMA), 'video_id', video_path)
  users, user_codes = _dense_codes(
      users.with_columns([_empty_to_null(pl.col(c)) for c in _USER_CATEGORICAL]),
      _USER_CATEGORICAL)
  videos = videos.with_columns(
      [_empty_to_null(pl.col(c)) for c in _VIDEO_CATEGORICAL if c != 'tag']
      + [_empty_to_null(pl.col('tag').str.split(',').list.first()).alias('tag'),
         pl.col('upload_dt').str.strptime(pl.Date, '%Y-%m-%d', strict=False)])
  videos, video_codes = _dense_codes(videos, _VIDEO_CATEGORICAL)
  return users, videos, {**user_codes, **video_codes}


def _joined_features(log: pl.DataFrame, users: pl.DataFrame, videos: pl.DataFrame
                     ) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
  """Log rows (same order) with the derived and joined fields; ``tab`` as codes."""
  log_date = pl.col('date').cast(pl.String).str.strptime(pl.Date, '%Y%m%d', strict=False)
  frame = (
      log.lazy()
      .with_columns(
          hour=pl.col('hourmin') // 100,
          weekday=log_date.dt.weekday(),
          log_date=log_date,
          tab=_empty_to_null(pl.col('tab')),
      )
      .join(users.lazy(), on='user_id', how='left', maintain_order='left')
      .join(videos.lazy(), on='video_id', how='left', maintain_order='left')
      .with_columns(video_age_days=(pl.col('log_date') - pl.col('upload_dt')).dt.total_days())
      .with_columns([pl.when(pl.col(c) >= 0).then(pl.col(c).cast(pl.Float64)).otherwise(None)
                     .alias(c) for c in NUMERIC_FIELDS])
      .collect()
  )
  return _dense_codes(frame, ('tab',))


def _checked_paths(config: Any) -> list[str]:
  paths = input_files(config)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f'{missing[0]}: file not found'
                    + (f' (also missing: {missing[1:]})' if missing[1:] else ''))
  return paths


def load_raw(config: Any) -> RawTable:
  """Reads, joins and derives the KuaiRand fields (module docstring)."""
  log_path, user_path, video_path = _checked_paths(config)
  max_rows = int(config.data.max_rows)
  log = _read(log_path, _LOG_SCHEMA, n_rows=max_rows if max_rows > 0 else None)
  users, videos, codes = _side_tables(user_path, video_path)
  bad_time = log['time_ms'].null_count()
  if bad_time:
    raise DataError(f'{log_path}: column \'time_ms\': {bad_time} rows with an empty time')
  frame, tab_codes = _joined_features(log, users, videos)
  labels = frame.select(LABEL_COLUMNS[:2]).to_numpy().astype(np.float32)
  core = (frame['play_time_ms'].to_numpy().astype(np.float64) / 1000.0).astype(np.float32)
  return RawTable(
      features=frame.select(FIELDS), numeric=NUMERIC_FIELDS, labels=labels, core=core,
      time=frame['time_ms'].to_numpy(), binary_tasks=BINARY_TASKS, core_task=CORE_TASK,
      source=log_path, label_columns=LABEL_COLUMNS, codes={**codes, **tab_codes},
      group=frame['user_id'].fill_null(-1).to_numpy().astype(np.int64))


def _parsed_numbers(log: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Unparseable]]:
  """The ``_SCORED_NUMERIC`` text columns as float64; cells that are not numbers become
  null and are counted per column (blank cells are missing, not counted)."""
  parsed, counted = [], {}
  for name in _SCORED_NUMERIC:
    text = log.select(_empty_to_null(pl.col(name))).to_series()
    values = text.cast(pl.Float64, strict=False)
    bad = values.is_null() & text.is_not_null()
    if bad.any():
      counted[name] = Unparseable(int(bad.sum()), text.filter(bad)[0])
    parsed.append(values)
  return log.with_columns(parsed), counted


def read_features(config: Any, passthrough: tuple[str, ...], chunk_rows: int
                  ) -> Iterator[FeatureChunk]:
  """The feature fields of a log to score, ``chunk_rows`` log rows at a time.

  The log needs the columns the features come from (``user_id, video_id, date, hourmin,
  tab, duration_ms``) and the ``passthrough`` columns; labels and ``time_ms`` are not read.
  The user and video tables are read whole (they are small). A ``duration_ms`` cell that is
  not a number is missing, counted in the chunk's ``unparseable``.

  Raises:
    DataError: a missing file or column, or an unparsable cell elsewhere (an id, a date).
  """
  log_path, user_path, video_path = _checked_paths(config)
  users, videos, codes = _side_tables(user_path, video_path)
  needed = tuple(dict.fromkeys(_FEATURE_SOURCE_COLUMNS + tuple(passthrough)))
  _check_header(log_path, needed)
  schema = {c: pl.String if c in _SCORED_NUMERIC else _LOG_SCHEMA.get(c, pl.String)
            for c in needed}
  scan = pl.scan_csv(log_path, schema_overrides=schema).select(needed)
  try:
    for log in scan.collect_batches(chunk_size=chunk_rows):
      log, unparseable = _parsed_numbers(log)
      frame, tab_codes = _joined_features(log, users, videos)
      yield FeatureChunk(frame.select(FIELDS), log.select(passthrough),
                         {**codes, **tab_codes}, log_path, unparseable)
  except pl.exceptions.PolarsError as e:
    raise DataError(f'{log_path}: cannot parse: {first_line(e)}') from None

"""Bring-your-own-data loader: one CSV or Parquet file described by ``config.data``.

This is how the paper's private "Product" data (click -> purchase -> amount) and any user's
own logs enter htl-jax (docs/design.md). ``config.data`` names, as comma-separated strings,
the categorical and numeric feature columns, the binary task columns in chain order, the core
column and an optional time column ('' = seeded random 8:1:1 split in the pipeline).

Every cell is read as text and parsed here, so that polars' schema inference on the first rows
can never fail mid-file (a core column written ``0`` for many rows and ``195.83`` further down
is the usual case), and so that each bad cell can be counted. Bad input raises
:class:`~htl_jax.data.schema.DataError` with one line naming the file, the column(s) and the
number of bad rows, before anything reaches JAX.

:func:`read_features` reads a file to score (feature columns only, labels not needed) in
chunks of rows, with the same parsing, except that a cell that is not a number in a numeric
column is not an error there: it becomes missing (id 0) and is counted per column
(``FeatureChunk.unparseable``), for prediction to report or, under ``--strict``, reject.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterator, Optional

import ml_collections
import numpy as np
import polars as pl

from htl_jax.data.schema import FeatureChunk, RawTable, Unparseable
from htl_jax.errors import DataError, first_line

_CSV_SEPARATORS = {'.csv': ',', '.tsv': '\t'}
_PARQUET_SUFFIXES = ('.parquet', '.pq')
_SUPPORTED = tuple(_CSV_SEPARATORS) + _PARQUET_SUFFIXES


def split_names(value: str) -> tuple[str, ...]:
  """``'a, b,,c'`` -> ``('a', 'b', 'c')``: the comma-separated column lists of config.data."""
  return tuple(name.strip() for name in str(value).split(',') if name.strip())


@dataclasses.dataclass(frozen=True)
class _Columns:
  """The declared roles of the file's columns."""

  categorical: tuple[str, ...]
  numeric: tuple[str, ...]
  tasks: tuple[str, ...]
  core: str
  time: str
  user: str = ''

  @property
  def features(self) -> tuple[str, ...]:
    return self.categorical + self.numeric

  @property
  def needed(self) -> tuple[str, ...]:
    """Every column to read, each once, in a stable order."""
    names = (self.features + self.tasks + (self.core,) + ((self.time,) if self.time else ())
             + ((self.user,) if self.user else ()))
    return tuple(dict.fromkeys(names))


def input_files(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The file this config reads (for the pipeline's cache key); raises if it is missing."""
  path = str(config.data.path)
  if not path:
    raise DataError('no input file: set --config.data.path=FILE (.csv, .tsv, .parquet or .pq)')
  if not path.lower().endswith(_SUPPORTED):
    raise DataError(f'{path}: unsupported file type, expected one of {", ".join(_SUPPORTED)}')
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found (--config.data.path)')
  return (path,)


def load_raw(config: ml_collections.ConfigDict) -> RawTable:
  """Reads ``config.data.path`` into a :class:`RawTable` (tasks named after their columns).

  Args:
    config: the run config; uses ``config.data.{path, categorical, numeric, tasks, core,
      time_column, max_rows}``.

  Returns:
    Features (categorical as strings, numeric as float64 with nulls for missing cells), labels
    ``[N, T]`` and core ``[N]`` as float32, and the timestamps (or None).

  Raises:
    DataError: a missing config key, file or column, an empty file, a label that is not a
      number, missing, or outside {0, 1}, a core value that is not a number, missing,
      negative or infinite, or an unparsable timestamp.
  """
  columns = _declared_columns(config)
  (path,) = input_files(config)
  frame = _read(path, columns.needed, int(config.data.max_rows))
  labels = _labels(frame, columns, path)
  core = _core(frame, columns.core, path)
  features, _ = _features(frame, columns, path)
  time = _time(frame, columns.time, path) if columns.time else None
  group = _group(frame, columns.user) if columns.user else None
  return RawTable(
      features=features,
      numeric=columns.numeric,
      labels=labels,
      core=core,
      time=time,
      binary_tasks=columns.tasks,
      core_task=columns.core,
      source=path,
      label_columns=columns.tasks + (columns.core,),
      group=group)


def _group(frame: pl.DataFrame, name: str) -> np.ndarray:
  """The user column as int64 group keys for GAUC (equal values, equal keys; empty: -1)."""
  series = frame.get_column(name).cast(pl.String)
  return series.rank('dense').fill_null(0).cast(pl.Int64).to_numpy() - 1


def read_features(config: ml_collections.ConfigDict, passthrough: tuple[str, ...],
                  chunk_rows: int) -> Iterator[FeatureChunk]:
  """The feature columns of ``config.data.path``, ``chunk_rows`` rows at a time.

  The file needs the feature columns and the ``passthrough`` columns (kept as read: text
  for CSV, typed for Parquet); task, core and time columns are not read. A cell that is not
  a number in a numeric column becomes null (missing) and is counted in the chunk's
  ``unparseable``.

  Raises:
    DataError: a missing file or column, or an infinite value in a numeric column.
  """
  columns = _declared_columns(config)
  (path,) = input_files(config)
  needed = tuple(dict.fromkeys(columns.features + tuple(passthrough)))
  suffix = os.path.splitext(path)[1].lower()
  try:
    if suffix in _PARQUET_SUFFIXES:
      scan = pl.scan_parquet(path)
    else:
      scan = pl.scan_csv(path, separator=_CSV_SEPARATORS[suffix], infer_schema=False)
    _check_present(path, needed, scan.collect_schema().names())
    for chunk in scan.select(needed).collect_batches(chunk_size=chunk_rows):
      features, unparseable = _features(chunk, columns, path, count_unparseable=True)
      yield FeatureChunk(features, chunk.select(passthrough), None, path, unparseable)
  except pl.exceptions.NoDataError:
    raise DataError(f'{path}: the file is empty (0 rows, no header)') from None
  except (pl.exceptions.PolarsError, OSError) as error:
    raise DataError(f'{path}: cannot read the file: {first_line(error)}') from None


def check_columns(config: ml_collections.ConfigDict) -> None:
  """The column roles of ``config.data``, without reading the file (the config check)."""
  _declared_columns(config)


def _declared_columns(config: ml_collections.ConfigDict) -> _Columns:
  """Parses and cross-checks the column lists of ``config.data``."""
  data = config.data
  where = f'{data.path}: ' if data.path else ''
  columns = _Columns(
      categorical=split_names(data.categorical),
      numeric=split_names(data.numeric),
      tasks=split_names(data.tasks),
      core=str(data.core).strip(),
      time=str(data.time_column).strip(),
      user=str(data.get('user_column', '')).strip())
  if not columns.tasks:
    raise DataError(f'{where}no binary task columns declared: set '
                    '--config.data.tasks=col1,col2 (chain order)')
  if not columns.core:
    raise DataError(f'{where}no core column declared: set --config.data.core=COLUMN')
  if ',' in columns.core:
    raise DataError(f'{where}--config.data.core must name one column, got {columns.core!r}')
  if not columns.features:
    raise DataError(f'{where}no feature columns declared: set --config.data.categorical '
                    'and/or --config.data.numeric')
  _check_disjoint(columns, where)
  return columns


def _check_disjoint(columns: _Columns, where: str) -> None:
  """A column plays one role: no repeats, no label, core or time column used as a feature.

  The user column (GAUC's groups) may also be a categorical feature, but not a label.
  """
  roles = [('categorical', columns.categorical), ('numeric', columns.numeric),
           ('tasks', columns.tasks), ('core', (columns.core,)),
           ('time_column', (columns.time,) if columns.time else ())]
  seen: dict[str, str] = {}
  for role, names in roles:
    for name in names:
      if name in seen:
        raise DataError(f'{where}column {name!r} is declared twice (in --config.data.'
                        f'{seen[name]} and --config.data.{role})')
      seen[name] = role
  if seen.get(columns.user, 'categorical') not in ('categorical', 'numeric'):
    raise DataError(f'{where}--config.data.user_column={columns.user!r} is also '
                    f'--config.data.{seen[columns.user]}; the user column names users')


def _read(path: str, needed: tuple[str, ...], max_rows: int) -> pl.DataFrame:
  """Reads the needed columns, CSV cells as text, checking columns and emptiness."""
  n_rows = max_rows if max_rows > 0 else None
  suffix = os.path.splitext(path)[1].lower()
  try:
    if suffix in _PARQUET_SUFFIXES:
      available = list(pl.read_parquet_schema(path))
      _check_present(path, needed, available)
      frame = pl.read_parquet(path, columns=list(needed), n_rows=n_rows)
    else:
      kwargs = dict(separator=_CSV_SEPARATORS[suffix], infer_schema=False)
      available = _csv_header(path, _CSV_SEPARATORS[suffix])
      _check_present(path, needed, available)
      frame = pl.read_csv(path, columns=list(needed), n_rows=n_rows, **kwargs)
  except pl.exceptions.NoDataError:
    raise DataError(f'{path}: the file is empty (0 rows, no header)') from None
  except (pl.exceptions.PolarsError, OSError) as error:
    raise DataError(f'{path}: cannot read the file: {first_line(error)}') from None
  if frame.height == 0:
    raise DataError(f'{path}: the file is empty (0 data rows)')
  return frame


def _csv_header(path: str, separator: str) -> list[str]:
  """The header's names as written (polars renames a repeated name ``a_duplicated_0``)."""
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    header = next(csv.reader(f, delimiter=separator), [])
  if not header:
    raise DataError(f'{path}: the file is empty (0 rows, no header)')
  return header


def _check_present(path: str, needed: tuple[str, ...], available: list[str]) -> None:
  repeated = sorted({name for name in available if available.count(name) > 1})
  if repeated:
    raise DataError(f'{path}: the header names column(s) {", ".join(map(repr, repeated))} '
                    'more than once; every column needs its own name')
  missing = [name for name in needed if name not in available]
  if missing:
    shown = ', '.join(available[:30]) + (', ...' if len(available) > 30 else '')
    raise DataError(f'{path}: missing column(s) {", ".join(map(repr, missing))} '
                    f'(the file has: {shown})')


def _parse_float(frame: pl.DataFrame, column: str
                 ) -> tuple[np.ndarray, np.ndarray, Optional[Unparseable]]:
  """A column as float64 (nulls and unparsable cells -> NaN), the mask of unparsable cells,
  and their count and first example (None if there is none)."""
  series = frame.get_column(column)
  if series.dtype == pl.String:
    text = series.str.strip_chars()
    parsed = text.cast(pl.Float64, strict=False)
    bad = (parsed.is_null() & text.is_not_null()).to_numpy()
  elif series.dtype.is_numeric() or series.dtype == pl.Boolean:
    text = series.cast(pl.String)
    parsed = series.cast(pl.Float64)
    bad = np.zeros(len(series), bool)
  else:
    text = series.cast(pl.String)
    parsed = pl.Series([None] * len(series), dtype=pl.Float64)
    bad = series.is_not_null().to_numpy()
  unparseable = None
  if bad.any():
    unparseable = Unparseable(int(bad.sum()), text.filter(pl.Series(bad))[0])
  return parsed.to_numpy().astype(np.float64), bad, unparseable


def _problems(unparseable: Optional[Unparseable]) -> list[str]:
  """The problem list of a column, starting with its unparsable cells (if any)."""
  return [unparseable.describe()] if unparseable else []


def _rows(count: int) -> str:
  return f'{count} row is' if count == 1 else f'{count} rows are'


def _raise_problems(path: str, problems: dict[str, list[str]]) -> None:
  """One line per file: every bad column with its bad-row counts."""
  parts = [f'column {name!r}: ' + ', '.join(found) for name, found in problems.items() if found]
  if parts:
    raise DataError(f'{path}: ' + '; '.join(parts))


def _labels(frame: pl.DataFrame, columns: _Columns, path: str) -> np.ndarray:
  """Binary labels ``[N, T]`` in chain order; every cell must be 0 or 1."""
  values, problems = [], {}
  for name in columns.tasks:
    column, bad, unparseable = _parse_float(frame, name)
    found = _problems(unparseable)
    missing = np.isnan(column) & ~bad
    if missing.any():
      found.append(f'{_rows(int(missing.sum()))} empty or NaN')
    outside = ~np.isnan(column) & (column != 0) & (column != 1)
    if outside.any():
      found.append(f'{_rows(int(outside.sum()))} not 0 or 1 '
                   f'(e.g. {column[outside][0]:g})')
    problems[name] = found
    values.append(column)
  _raise_problems(path, problems)
  return np.stack(values, axis=1).astype(np.float32)


def _core(frame: pl.DataFrame, name: str, path: str) -> np.ndarray:
  """The core target as float32; must be a finite number >= 0 on every row."""
  column, bad, unparseable = _parse_float(frame, name)
  found = _problems(unparseable)
  missing = np.isnan(column) & ~bad
  if missing.any():
    found.append(f'{_rows(int(missing.sum()))} empty or NaN')
  infinite = np.isinf(column)
  if infinite.any():
    found.append(f'{_rows(int(infinite.sum()))} infinite')
  negative = np.isfinite(column) & (column < 0)
  if negative.any():
    found.append(f'{_rows(int(negative.sum()))} negative (e.g. {column[negative][0]:g})')
  with np.errstate(over='ignore'):
    core = column.astype(np.float32)
  overflow = np.isfinite(column) & ~np.isfinite(core)
  if overflow.any():
    found.append(f'{_rows(int(overflow.sum()))} too large for float32')
  _raise_problems(path, {name: found})
  return core


def _features(frame: pl.DataFrame, columns: _Columns, path: str, *,
              count_unparseable: bool = False
              ) -> tuple[pl.DataFrame, dict[str, Unparseable]]:
  """Categorical columns as strings, numeric ones as float64 (NaN and empty -> null).

  A numeric cell that is not a number is an error (training), or with ``count_unparseable``
  (scoring) null and counted per column in the second result.
  """
  problems, numeric, counted = {}, [], {}
  for name in columns.numeric:
    column, _, unparseable = _parse_float(frame, name)
    if count_unparseable and unparseable:
      counted[name] = unparseable
      unparseable = None
    found = _problems(unparseable)
    infinite = np.isinf(column)
    if infinite.any():
      found.append(f'{_rows(int(infinite.sum()))} infinite')
    problems[name] = found
    numeric.append(pl.Series(name, column, dtype=pl.Float64).fill_nan(None))
  _raise_problems(path, problems)
  categorical = [frame.get_column(name).cast(pl.String) for name in columns.categorical]
  return pl.DataFrame(categorical + numeric), counted


def _time(frame: pl.DataFrame, name: str, path: str) -> np.ndarray:
  """Sortable timestamps: numbers as they are, dates and datetimes as int64 microseconds."""
  series = frame.get_column(name)
  if series.dtype.is_temporal():
    parsed = series.cast(pl.Datetime('us')).cast(pl.Int64)
  elif series.dtype.is_numeric():
    parsed = series.cast(pl.Float64).fill_nan(None)
  else:
    text = series.cast(pl.String).str.strip_chars()
    parsed = text.cast(pl.Float64, strict=False).fill_nan(None)
    if (parsed.is_null() & text.is_not_null()).any():
      parsed = text.str.to_datetime(strict=False).cast(pl.Int64)
  missing = parsed.is_null()
  bad = missing & series.is_not_null()
  problems = []
  if bad.any():
    problems.append(f'{_rows(int(bad.sum()))} not a number, date or datetime '
                    f'(e.g. {series.filter(bad)[0]!r})')
  if (missing & ~bad).any():
    problems.append(f'{_rows(int((missing & ~bad).sum()))} empty (every row needs a time for '
                    'the chronological split; --config.data.time_column= gives a random split)')
  _raise_problems(path, {name: problems})
  return parsed.to_numpy()

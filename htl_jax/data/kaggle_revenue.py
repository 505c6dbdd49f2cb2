"""Kaggle-Revenue: the Acquire Valued Shoppers transactions, preprocessed as in the ZILN paper.

Source: ``transactions.csv`` of the Kaggle "Acquire Valued Shoppers Challenge" (columns
``id, chain, dept, category, company, brand, date, productsize, productmeasure,
purchasequantity, purchaseamount``; about 350M rows). Following the ZILN preprocessing (Wang,
Liu and Miao 2019, arXiv 1912.07753, google/lifetime_value notebooks) for its 20 companies, one
example per (customer ``id``, ``company``) (docs/design.md):

- keep rows with ``purchaseamount > 0``; ``start_date`` = the first purchase date;
- features: ``chain, dept, category, brand, productmeasure`` of the largest purchase on the
  start date (ties broken by the smallest attribute values, so the result is deterministic),
  the ``company``, and ``log_first_day_value`` = log of the total spend on the start date
  (numeric; the pipeline bucketizes it on train);
- binary tasks in chain order: ``repurchase_1y`` (spend > 0 in ``(start, start + 365d]``),
  ``repurchase_1m`` (spend > 0 in ``(start, start + 30d]``; nested under the first by
  construction); core ``amount_1m`` = the total spend in ``(start, start + 30d]``;
- time = ``start_date`` for the chronological split.

The query is lazy (``scan_csv``, filter by company first, then group-bys and one join), so
polars can stream the file. ``config.data.max_rows > 0`` reads only the first that many
transaction rows (the file is ordered by customer, so those customers keep full histories).

:func:`read_features` builds the same per-(customer, company) features from a transactions
file to score (the streaming engine aggregates it) and hands them out in chunks.
"""

from __future__ import annotations

import os
from typing import Iterator

import ml_collections
import numpy as np
import polars as pl

from htl_jax.data.schema import FeatureChunk, RawTable
from htl_jax.errors import DataError, first_line

# The 20 companies of the ZILN paper's Kaggle experiment.
COMPANIES = (10000, 101200010, 101410010, 101600010, 102100020, 102700020, 102840020,
             103000030, 103338333, 103400030, 103600030, 103700030, 103800030, 104300040,
             104400040, 104470040, 104900040, 105100050, 105150050, 107800070)
FILE_NAME = 'transactions.csv'
ATTRIBUTES = ('chain', 'dept', 'category', 'brand', 'productmeasure')
FEATURES = ATTRIBUTES + ('company', 'log_first_day_value')
NUMERIC = ('log_first_day_value',)
BINARY_TASKS = ('repurchase_1y', 'repurchase_1m')
CORE_TASK = 'amount_1m'
_KEYS = ('id', 'company')
# Explicit dtypes for every column read, so that no schema inference can fail mid-file.
_SCHEMA = {'id': pl.Int64, 'chain': pl.Int64, 'dept': pl.Int64, 'category': pl.Int64,
           'company': pl.Int64, 'brand': pl.Int64, 'date': pl.String,
           'productmeasure': pl.String, 'purchaseamount': pl.Float64}


def input_files(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``<config.data_dir>/transactions.csv`` (for the pipeline's cache key); must exist."""
  if not config.data_dir:
    raise DataError('kaggle_revenue needs --config.data_dir=DIR, the folder holding '
                    f'{FILE_NAME} of the Acquire Valued Shoppers Challenge')
  path = os.path.join(str(config.data_dir), FILE_NAME)
  if not os.path.isfile(path):
    hint = ' (found a .gz: decompress it first)' if os.path.isfile(path + '.gz') else ''
    raise DataError(f'{path}: file not found (--config.data_dir){hint}')
  return (path,)


def load_raw(config: ml_collections.ConfigDict) -> RawTable:
  """Builds one example per (customer, company) from ``transactions.csv``.

  Args:
    config: the run config; uses ``config.data_dir`` and ``config.data.max_rows``.

  Returns:
    A :class:`RawTable` sorted by ``(start_date, id, company)``; ``time`` is the start date in
    days since 1970-01-01.

  Raises:
    DataError: a missing data_dir, file or column, an empty file, an unparsable cell, a
      non-finite purchase amount, or no purchase at all for the 20 companies.
  """
  (path,) = input_files(config)
  scan = _scan(path, int(config.data.max_rows))
  try:
    table = customer_table(scan).collect(engine='streaming')
  except pl.exceptions.PolarsError as error:
    raise DataError(f'{path}: cannot parse the transactions: {first_line(error)}') from None
  _validate(table, path)
  labels = np.stack([table.get_column('amount_1y').to_numpy() > 0,
                     table.get_column('amount_1m').to_numpy() > 0], axis=1)
  return RawTable(
      features=table.select(FEATURES),
      numeric=NUMERIC,
      labels=labels.astype(np.float32),
      core=table.get_column('amount_1m').to_numpy().astype(np.float32),
      time=table.get_column('start_date').cast(pl.Int32).to_numpy().astype(np.int64),
      binary_tasks=BINARY_TASKS,
      core_task=CORE_TASK,
      source=path,
      label_columns=('purchaseamount',) * (len(BINARY_TASKS) + 1),
      group=table.get_column('id').cast(pl.Int64).to_numpy())   # the customer, for GAUC


def read_features(config: ml_collections.ConfigDict, passthrough: tuple[str, ...],
                  chunk_rows: int) -> Iterator[FeatureChunk]:
  """The features of every (customer, company) in ``<data_dir>/transactions.csv``.

  ``passthrough`` names columns of the per-(customer, company) table (``id``, ``company``,
  ``start_date``, ...). The aggregation runs on polars' streaming engine; the result (one
  row per customer and company) is handed out ``chunk_rows`` rows at a time.

  Raises:
    DataError: a missing file or column, an unparsable cell, or no purchase for the 20
      companies.
  """
  (path,) = input_files(config)
  try:
    table = customer_table(_scan(path, 0)).collect(engine='streaming')
  except pl.exceptions.PolarsError as error:
    raise DataError(f'{path}: cannot parse the transactions: {first_line(error)}') from None
  if table.height == 0:
    raise DataError(f'{path}: empty after preprocessing: 0 (customer, company) rows with '
                    f'purchaseamount > 0 for the {len(COMPANIES)} ZILN companies')
  missing = [name for name in passthrough if name not in table.columns]
  if missing:
    raise DataError(f'{path}: passthrough column(s) {missing} are not among the '
                    f'per-(customer, company) columns {table.columns}')
  for start in range(0, table.height, chunk_rows):
    chunk = table.slice(start, chunk_rows)
    yield FeatureChunk(chunk.select(FEATURES), chunk.select(passthrough), None, path)


def scan_transactions(path: str) -> pl.LazyFrame:
  """The columns the loader reads from a transactions file, typed, as a lazy scan.

  Raises:
    DataError: an empty file or a missing column.
  """
  return _scan(path, 0)


def _scan(path: str, max_rows: int) -> pl.LazyFrame:
  """A lazy scan of the needed columns, after checking the header."""
  try:
    scan = pl.scan_csv(path, schema_overrides=_SCHEMA,
                       n_rows=max_rows if max_rows > 0 else None)
    available = scan.collect_schema().names()
  except pl.exceptions.NoDataError:
    raise DataError(f'{path}: the file is empty (0 rows, no header)') from None
  missing = [name for name in _SCHEMA if name not in available]
  if missing:
    raise DataError(f'{path}: missing column(s) {", ".join(map(repr, missing))} '
                    f'(the file has: {", ".join(available)})')
  return scan.select(list(_SCHEMA))


def customer_table(transactions: pl.LazyFrame) -> pl.LazyFrame:
  """The ZILN per-(customer, company) table from raw transaction rows (lazy).

  Columns: ``id, company, start_date, first_day_value, log_first_day_value``, the five
  attributes of the largest first-day purchase, ``amount_1y`` and ``amount_1m``.
  """
  keys = list(_KEYS)
  rows = (transactions
          .filter(pl.col('company').is_in(COMPANIES) & (pl.col('purchaseamount') > 0)
                  & pl.col('id').is_not_null())
          .with_columns(pl.col('date').str.strip_chars().str.to_date('%Y-%m-%d'))
          .filter(pl.col('date').is_not_null()))
  starts = rows.group_by(keys).agg(pl.col('date').min().alias('start_date'))
  rows = rows.join(starts, on=keys, how='inner')
  days = (pl.col('date') - pl.col('start_date')).dt.total_days()
  order = ['purchaseamount', *ATTRIBUTES]
  descending = [True] + [False] * len(ATTRIBUTES)
  first_day = (
      rows.filter(days == 0).group_by(keys).agg(
          pl.col('start_date').first(),
          pl.col('purchaseamount').sum().alias('first_day_value'),
          *[pl.col(name).sort_by(order, descending=descending, nulls_last=True).first()
            for name in ATTRIBUTES]))
  later = (
      rows.filter((days > 0) & (days <= 365)).group_by(keys).agg(
          pl.col('purchaseamount').sum().alias('amount_1y'),
          pl.col('purchaseamount').filter(days <= 30).sum().alias('amount_1m')))
  return (first_day.join(later, on=keys, how='left')
          .with_columns(pl.col('amount_1y', 'amount_1m').fill_null(0.0),
                        pl.col('first_day_value').log().alias('log_first_day_value'))
          .sort(['start_date', *keys]))


def _validate(table: pl.DataFrame, path: str) -> None:
  """Non-empty, and every amount finite (``purchaseamount > 0`` keeps NaN and inf)."""
  if table.height == 0:
    raise DataError(f'{path}: empty after preprocessing: 0 (customer, company) rows with '
                    f'purchaseamount > 0 for the {len(COMPANIES)} ZILN companies')
  amounts = table.select('first_day_value', 'amount_1y').to_numpy()
  bad = ~np.isfinite(amounts).all(axis=1)
  if bad.any():
    raise DataError(f'{path}: column \'purchaseamount\': {int(bad.sum())} (customer, company) '
                    'rows have a NaN or infinite amount')

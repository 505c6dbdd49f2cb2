"""Check a local copy of a dataset against what the paper and the data's publishers state.

:func:`check_dataset` compares, for ``config.dataset``, each fact with its published value
and returns a :class:`Report`: one :class:`Check` per fact (``ok``, or ``DIFFERS`` with the
expected and the found value) and a summary, before anyone spends hours training on it.

- KuaiRand-Pure (``kuairand``): the three files and their columns (docs/design.md); the
  log's rows (1,186,059), users (27,285), videos (7,583), dates (``date``, YYYYMMDD:
  2022-04-22 to 2022-05-08), click rate 17.62%, long-view rate 8.50% and watch time
  (``play_time_ms / 1000``) mean 6.94 s and std 18.79 s (the paper's Table 1). The embedded
  sample (no ``data_dir``) is generated and smaller: only its files and columns are checked.
- Kaggle-Revenue (``kaggle_revenue``): ``transactions.csv`` and its columns; its rows and
  dates are reported (the paper states neither); the loader's own ZILN preprocessing, run
  over the whole file, must give the paper's 5,041,007 (customer, company) rows, 1Y
  repurchase 85.68%, 1M repurchase 41.05% and 30-day amount mean 4.52.
- Tabular files (``tabular``): the loader's checks (the declared columns exist, labels are
  0 or 1, the core is finite and >= 0, the time column parses), the labels' nesting and
  enough rows for the 8:1:1 split. Hillstrom (a file named ``hillstrom.csv``, or
  ``published='hillstrom'``) adds its columns, md5, 64,000 rows, visit 14.68%, conversion
  0.90% and spend mean 1.05.

Counts, dates and the md5 must match exactly, rates within 0.5 percentage points, means and
standard deviations within 2% (relative). What training would stop on (a missing file, a
column the loader reads, a bad label or core value, an empty split) raises
:class:`~htl_jax.errors.DataError`; a published column that the loader does not read is a
difference. ``config.data.max_rows`` is ignored: the whole file is checked. This module uses
polars and numpy only (no JAX).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Optional, Sequence

import polars as pl

from htl_jax.data import kaggle_revenue, kuairand, pipeline, tabular
from htl_jax.errors import ConfigError, DataError, first_line

__all__ = ['Check', 'PUBLISHED', 'Report', 'Stat', 'TOLERANCE', 'check_dataset', 'compare']

PUBLISHED = ('auto', 'hillstrom', 'none')
RATE_TOLERANCE = 0.005          # absolute, on a rate in [0, 1]: 0.5 percentage points
RELATIVE_TOLERANCE = 0.02       # means and standard deviations
TOLERANCE = ('rates within 0.5 percentage points, means and stds within 2% relative; counts, '
             'dates and md5 exact')
_EPS = 1e-12                    # float rounding at a tolerance's edge

KUAIRAND_COLUMNS = {
    kuairand.LOG_FILE: (
        'user_id', 'video_id', 'date', 'hourmin', 'time_ms', 'is_click', 'is_like',
        'is_follow', 'is_comment', 'is_forward', 'is_hate', 'long_view', 'play_time_ms',
        'duration_ms', 'profile_stay_time', 'comment_stay_time', 'is_profile_enter',
        'is_rand', 'tab'),
    kuairand.USER_FILE: (
        'user_id', 'user_active_degree', 'is_lowactive_period', 'is_live_streamer',
        'is_video_author', 'follow_user_num', 'follow_user_num_range', 'fans_user_num',
        'fans_user_num_range', 'friend_user_num', 'friend_user_num_range', 'register_days',
        'register_days_range') + tuple(f'onehot_feat{i}' for i in range(18)),
    kuairand.VIDEO_FILE: (
        'video_id', 'author_id', 'video_type', 'upload_dt', 'upload_type', 'visible_status',
        'video_duration', 'server_width', 'server_height', 'music_id', 'music_type', 'tag'),
}
KAGGLE_COLUMNS = ('id', 'chain', 'dept', 'category', 'company', 'brand', 'date',
                  'productsize', 'productmeasure', 'purchasequantity', 'purchaseamount')
HILLSTROM_FILE = 'hillstrom.csv'
HILLSTROM_COLUMNS = ('recency', 'history_segment', 'history', 'mens', 'womens', 'zip_code',
                     'newbie', 'channel', 'segment', 'visit', 'conversion', 'spend')


@dataclasses.dataclass(frozen=True)
class Stat:
  """A published statistic: its key in the found values, its name, kind and value.

  ``kind`` says how it is compared: ``count`` and ``text`` exactly, ``rate`` within
  :data:`RATE_TOLERANCE`, ``relative`` within :data:`RELATIVE_TOLERANCE` of the value.
  """

  key: str
  name: str
  kind: str
  expected: Any


KUAIRAND_STATS = (
    Stat('rows', 'log rows', 'count', 1_186_059),
    Stat('users', 'users in the log', 'count', 27_285),
    Stat('videos', 'videos in the log', 'count', 7_583),
    Stat('dates', 'log dates', 'text', '2022-04-22 to 2022-05-08'),
    Stat('click', 'click rate (is_click)', 'rate', 0.1762),
    Stat('long_view', 'long-view rate (long_view)', 'rate', 0.0850),
    Stat('watch_mean', 'watch time mean, s (play_time_ms / 1000)', 'relative', 6.94),
    Stat('watch_std', 'watch time std, s', 'relative', 18.79),
)
KAGGLE_STATS = (
    Stat('rows', '(customer, company) rows after the ZILN preprocessing', 'count', 5_041_007),
    Stat('repurchase_1y', 'repurchase within 1 year', 'rate', 0.8568),
    Stat('repurchase_1m', 'repurchase within 1 month', 'rate', 0.4105),
    Stat('amount_mean', '30-day amount mean', 'relative', 4.52),
)
HILLSTROM_STATS = (
    Stat('md5', 'md5', 'text', 'b47bbd55d239c433f84e2fec6d6a1938'),
    Stat('rows', 'rows', 'count', 64_000),
    Stat('visit', 'visit rate', 'rate', 0.1468),
    Stat('conversion', 'conversion rate', 'rate', 0.0090),
    Stat('spend', 'spend mean', 'relative', 1.05),
)


@dataclasses.dataclass(frozen=True)
class Check:
  """One fact about the data: its name, the expected value ('' = none) and what was found."""

  name: str
  expected: str
  found: str
  ok: bool

  def line(self) -> str:
    """``ok       NAME: FOUND (expected ...)`` or ``DIFFERS  NAME: expected ..., found ...``."""
    if not self.ok:
      return f'DIFFERS  {self.name}: expected {self.expected}, found {self.found}'
    shown = self.expected and self.expected != self.found
    expected = f' (expected {self.expected})' if shown else ''
    return f'ok       {self.name}: {self.found}{expected}'


@dataclasses.dataclass
class Report:
  """The checks of one dataset, the notes that go with them, and the time they took."""

  dataset: str
  source: str
  checks: list[Check]
  notes: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def differences(self) -> list[Check]:
    """The checks that differ."""
    return [check for check in self.checks if not check.ok]

  @property
  def exit_code(self) -> int:
    """0 when every check passes, 1 when something differs (the data may still be usable)."""
    return 1 if self.differences else 0

  def summary(self) -> str:
    """The last line: how many checks differ, the tolerances and the time taken."""
    count, differ = len(self.checks), len(self.differences)
    verdict = (f'all {count} checks ok' if not differ else
               f'{differ} of {count} checks DIFFER (a warning: the data may still be usable)')
    return f'summary  {self.dataset}: {verdict}; {TOLERANCE}; {self.seconds:.2f} s'

  def lines(self) -> list[str]:
    """The header, the notes, one line per check and the summary."""
    return ([f'checking {self.dataset}: {self.source}']
            + [f'note     {note}' for note in self.notes]
            + [check.line() for check in self.checks] + [self.summary()])


def check_dataset(config: Any, published: str = 'auto') -> Report:
  """Checks the data that ``config`` points at (module docstring).

  Args:
    config: a run config (``dataset``, ``data_dir``, ``data.path`` and the declared columns).
    published: which published statistics to compare with: ``auto`` (KuaiRand-Pure and
      Kaggle-Revenue by ``config.dataset``, Hillstrom for a file named hillstrom.csv),
      ``hillstrom`` (a tabular file under another name) or ``none`` (files, columns and
      values only).

  Returns:
    The :class:`Report`; its ``exit_code`` is 1 when a check differs.

  Raises:
    DataError: a missing file or column, or data that training would stop on.
    ConfigError: an unknown ``published``, or ``hillstrom`` for a dataset that is not tabular.
  """
  if published not in PUBLISHED:
    raise ConfigError(f'published={published!r}; expected one of {", ".join(PUBLISHED)}')
  checker = _CHECKERS.get(config.dataset)
  if checker is None:
    raise DataError(f'dataset {config.dataset!r} has no files to check; htl-check-data '
                    f'checks {", ".join(_CHECKERS)}')
  if published == 'hillstrom' and config.dataset != 'tabular':
    raise ConfigError(f'--published=hillstrom compares a tabular file, not {config.dataset!r}')
  start = time.perf_counter()
  report = checker(config, published)
  report.seconds = time.perf_counter() - start
  return report


# --------------------------------------------------------------------------- comparisons


def _format(kind: str, value: Any) -> str:
  """A value as the output shows it: counts with commas, rates in percent."""
  if value is None:
    return 'none'
  if kind == 'count':
    return f'{int(value):,}'
  if kind == 'rate':
    return f'{100 * value:.2f}%'
  if kind == 'relative':
    return f'{value:.2f}'
  return str(value)


def _expected(stat: Stat) -> str:
  """The published value with its tolerance."""
  text = _format(stat.kind, stat.expected)
  if stat.kind == 'rate':
    return f'{text} +-{100 * RATE_TOLERANCE:.1f} points'
  if stat.kind == 'relative':
    return f'{text} +-{100 * RELATIVE_TOLERANCE:.0f}%'
  return text


def compare(stat: Stat, found: Any) -> Check:
  """``stat`` against the ``found`` value (None = not computable, e.g. no rows)."""
  if found is None:
    ok = False
  elif stat.kind == 'rate':
    ok = abs(found - stat.expected) <= RATE_TOLERANCE + _EPS
  elif stat.kind == 'relative':
    ok = abs(found - stat.expected) <= RELATIVE_TOLERANCE * abs(stat.expected) + _EPS
  else:
    ok = found == stat.expected
  return Check(stat.name, _expected(stat), _format(stat.kind, found), ok)


def _compare_all(stats: Sequence[Stat], found: dict[str, Any]) -> list[Check]:
  """Each of ``stats`` against ``found[stat.key]`` (absent = None)."""
  return [compare(stat, found.get(stat.key)) for stat in stats]


# --------------------------------------------------------------------------- files and columns


def _file_check(path: str) -> Check:
  """The file exists (DataError otherwise), with its size."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  return Check(f'file {os.path.basename(path)}', '',
               f'present, {os.path.getsize(path):,} bytes', True)


def _header(path: str) -> list[str]:
  """The column names of a CSV file; an empty or unreadable file -> DataError."""
  try:
    return pl.read_csv(path, n_rows=0, infer_schema=False).columns
  except pl.exceptions.NoDataError:
    raise DataError(f'{path}: the file is empty (0 rows, no header)') from None
  except (pl.exceptions.PolarsError, OSError) as error:
    raise DataError(f'{path}: cannot read the CSV header: {first_line(error)}') from None


def _columns_check(path: str, published: Sequence[str], read: Sequence[str]) -> Check:
  """DataError for a missing column in ``read``; a difference for another published one."""
  header = _header(path)
  missing_read = [name for name in read if name not in header]
  if missing_read:
    raise DataError(f'{path}: missing column(s) {", ".join(map(repr, missing_read))} '
                    '(the loader reads them)')
  missing = [name for name in published if name not in header]
  found = (f'all {len(published)} present' if not missing else
           f'{", ".join(missing)} missing (not read by the loader)')
  return Check(f'columns of {os.path.basename(path)}', f'the {len(published)} published',
               found, not missing)


def _collect(queries: list[pl.LazyFrame], path: str) -> list[pl.DataFrame]:
  """Runs the queries on polars' streaming engine; a cell that does not parse -> DataError."""
  try:
    return pl.collect_all(queries, engine='streaming')
  except pl.exceptions.PolarsError as error:
    raise DataError(f'{path}: cannot parse: {first_line(error)}') from None


def _date_range(first: Any, last: Any, bad: int, pattern: str) -> Optional[str]:
  """``FIRST to LAST``, with the count of cells not in ``pattern``; None without dates."""
  if first is None:
    return None
  text = f'{first} to {last}'
  return text + (f' ({bad:,} cells are not {pattern})' if bad else '')


# --------------------------------------------------------------------------- KuaiRand-Pure


def _check_kuairand(config: Any, published: str) -> Report:
  """Files and columns; on the real data (a ``data_dir``), the paper's Table 1 too."""
  root = kuairand.data_dir(config)
  paths = kuairand.input_files(config)
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise DataError(f'{missing[0]}: file not found'
                    + (f' (also missing: {", ".join(missing[1:])})' if missing[1:] else ''))
  checks = [_file_check(path) for path in paths]
  for path in paths:
    name = os.path.basename(path)
    checks.append(_columns_check(path, KUAIRAND_COLUMNS[name], kuairand.READ_COLUMNS[name]))
  log_path = paths[0]
  _check_kuairand_labels(log_path)
  if not str(config.data_dir or ''):
    rows = _collect([pl.scan_csv(log_path, infer_schema=False).select(pl.len())],
                    log_path)[0].item()
    note = (f'the embedded sample ({rows:,} generated log rows, not real KuaiRand data): its '
            "size is not the paper's, so only its files and columns are checked")
    return Report('KuaiRand-Pure (embedded sample)', root, checks, [note])
  if published != 'none':
    checks += _compare_all(KUAIRAND_STATS, _kuairand_stats(log_path))
  return Report('KuaiRand-Pure', root, checks)


def _check_kuairand_labels(path: str) -> None:
  """Training's label checks on the log (:func:`htl_jax.data.pipeline.bad_values`)."""
  binary, core = ('is_click', 'long_view'), 'play_time_ms'
  value = {c: pl.col(c).cast(pl.Float64, strict=False) for c in (*binary, core)}
  counts = _collect([pl.scan_csv(path, infer_schema=False).select(
      **{c: (value[c].is_null() | ~value[c].is_in([0.0, 1.0])).sum() for c in binary},
      **{core: (value[core].is_null() | value[core].is_nan() | value[core].is_infinite()
                | (value[core] < 0)).sum()})], path)[0].row(0, named=True)
  for column, count in counts.items():
    if count:
      raise DataError(pipeline.bad_values(path, column, count, core=column == core))


def _kuairand_stats(path: str) -> dict[str, Any]:
  """Rows, users, videos, dates and label statistics of the KuaiRand log (one pass)."""
  dtypes = {'user_id': pl.Int64, 'video_id': pl.Int64, 'date': pl.String,
            'is_click': pl.Float64, 'long_view': pl.Float64, 'play_time_ms': pl.Float64}
  date_text = pl.col('date').str.strip_chars()
  date = date_text.str.to_date('%Y%m%d', strict=False)
  watch = pl.col('play_time_ms') / 1000.0
  query = pl.scan_csv(path, schema_overrides=dtypes).select(list(dtypes)).select(
      rows=pl.len(), users=pl.col('user_id').n_unique(), videos=pl.col('video_id').n_unique(),
      first=date.min(), last=date.max(), bad_dates=(date.is_null() & date_text.is_not_null())
      .sum(), click=pl.col('is_click').mean(), long_view=pl.col('long_view').mean(),
      watch_mean=watch.mean(), watch_std=watch.std())
  found = _collect([query], path)[0].row(0, named=True)
  found['dates'] = _date_range(found['first'], found['last'], found['bad_dates'], 'YYYYMMDD')
  return found


# --------------------------------------------------------------------------- Kaggle-Revenue


def _check_kaggle(config: Any, published: str) -> Report:
  """The file and its columns, its rows and dates, and the ZILN statistics."""
  (path,) = kaggle_revenue.input_files(config)
  checks = [_file_check(path)]
  scan = kaggle_revenue.scan_transactions(path)
  checks.append(_columns_check(path, KAGGLE_COLUMNS, scan.collect_schema().names()))
  report = Report('Kaggle Acquire-Valued-Shoppers', path, checks)
  if published == 'none':
    return report
  date_text = pl.col('date').str.strip_chars()
  date = date_text.str.to_date('%Y-%m-%d', strict=False)
  totals = scan.select(rows=pl.len(), first=date.min(), last=date.max(),
                       bad_dates=(date.is_null() & date_text.is_not_null()).sum())
  ziln = kaggle_revenue.customer_table(scan).select(
      rows=pl.len(), repurchase_1y=(pl.col('amount_1y') > 0).mean(),
      repurchase_1m=(pl.col('amount_1m') > 0).mean(), amount_mean=pl.col('amount_1m').mean())
  totals, ziln = _collect([totals, ziln], path)
  total = totals.row(0, named=True)
  dates = _date_range(total['first'], total['last'], total['bad_dates'], 'YYYY-MM-DD')
  report.notes += [
      f'{kaggle_revenue.FILE_NAME}: {total["rows"]:,} rows, dates {dates} (reported, not '
      'checked: the paper states neither)',
      "the (customer, company) statistics come from the loader's ZILN preprocessing over the "
      'whole file, as training computes them']
  report.checks += _compare_all(KAGGLE_STATS, ziln.row(0, named=True))
  return report


# --------------------------------------------------------------------------- tabular files


def _whole_file(config: Any) -> Any:
  """A copy of ``config`` that reads every row (``data.max_rows = 0``)."""
  whole = copy.deepcopy(config)
  whole.data.max_rows = 0
  return whole


def _check_tabular(config: Any, published: str) -> Report:
  """The loader's checks, nesting and split sizes; Hillstrom's published facts too."""
  config = _whole_file(config)
  (path,) = tabular.input_files(config)
  hillstrom = published == 'hillstrom' or (
      published == 'auto' and os.path.basename(path).lower() == HILLSTROM_FILE)
  checks = [_file_check(path)]
  if hillstrom:
    checks.append(_columns_check(path, HILLSTROM_COLUMNS, ()))
  raw = tabular.load_raw(config)     # the declared columns, labels, core and time column
  checks += _loader_checks(raw)
  if len(raw.binary_tasks) > 1:
    checks.append(_nesting_check(raw))
  checks.append(_split_check(raw, int(config.split_seed)))
  if hillstrom:
    checks += _compare_all(HILLSTROM_STATS, _hillstrom_stats(path))
  return Report('Hillstrom' if hillstrom else 'tabular file', path, checks)


def _loader_checks(raw: Any) -> list[Check]:
  """What :func:`htl_jax.data.tabular.load_raw` checked (it raises on a failure)."""
  names = raw.label_columns or raw.binary_tasks + (raw.core_task,)
  tasks, core = names[:-1], names[-1]
  declared = raw.features.width + len(names) + (raw.time is not None)
  checks = [
      Check('declared columns', '', f'all {declared} present', True),
      Check(f'labels {", ".join(tasks)}', '', 'every cell 0 or 1', True),
      Check(f'core {core}', '', 'every value a finite number >= 0', True),
  ]
  if raw.time is not None:
    checks.append(Check('time column', '', 'every cell a number, date or datetime', True))
  return checks


def _nesting_check(raw: Any) -> Check:
  """Rows where a later binary label exceeds an earlier one (training fixes them)."""
  tasks = raw.label_columns[:-1] if raw.label_columns else raw.binary_tasks
  _, fixed = pipeline.enforce_nesting(raw.labels)
  found = f'{fixed:,} rows out of order'
  if fixed:
    found += ' (training sets the later label to 0 there)'
  return Check(f'labels nested ({" >= ".join(tasks)})', '0 rows out of order', found,
               fixed == 0)


def _split_check(raw: Any, split_seed: int) -> Check:
  """Every split of the 8:1:1 split has rows (training stops otherwise: a DataError)."""
  rows = int(raw.core.shape[0])
  _, n_train, n_valid = pipeline.split_order(rows, None, split_seed)
  sizes = {'train': n_train, 'valid': n_valid, 'test': rows - n_train - n_valid}
  empty = [name for name, size in sizes.items() if size == 0]
  if empty:
    raise DataError(f'{raw.source}: {rows} rows: the {"/".join(empty)} split would be empty '
                    '(an 8:1:1 split needs at least 10 rows)')
  text = ', '.join(f'{name} {size:,}' for name, size in sizes.items())
  return Check('8:1:1 split', '', f'{rows:,} rows: {text}', True)


def _md5(path: str) -> str:
  """The file's md5, read 1 MiB at a time."""
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _hillstrom_stats(path: str) -> dict[str, Any]:
  """md5, rows and the label rates of a Hillstrom file (absent columns give None)."""
  header = _header(path)
  present = [name for name in ('visit', 'conversion', 'spend') if name in header]
  query = pl.scan_csv(path, schema_overrides={name: pl.Float64 for name in present},
                      infer_schema=False).select(
      rows=pl.len(), **{name: pl.col(name).mean() for name in present})
  found = _collect([query], path)[0].row(0, named=True)
  found['md5'] = _md5(path)
  return found


_CHECKERS: dict[str, Callable[[Any, str], Report]] = {
    'kuairand': _check_kuairand,
    'kaggle_revenue': _check_kaggle,
    'tabular': _check_tabular,
}

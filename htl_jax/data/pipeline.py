"""Shared preprocessing: validation, 8:1:1 split, vocabularies, bucketization, batches, cache.

Every loader returns a :class:`~htl_jax.data.schema.RawTable`; :func:`prepare` turns it into
:class:`~htl_jax.data.schema.HybridData` (DESIGN section 7):

1. Validation. Binary labels must be finite and in {0, 1}; the core must be finite and >= 0.
   Anything else raises :class:`DataError` naming the source file, the column and the number
   of bad rows, before any array reaches JAX.
2. Nesting. The sequential constraint ``y^1 >= y^2 >= ... >= y^T`` (paper Section 3) is
   enforced with ``y^t <- min(y^t, y^{t-1})``; the number of rows changed is logged.
3. Split. With a timestamp, rows are sorted (stable) by time and cut 8:1:1 into train /
   valid / test, each in time order; without one, a seeded random 8:1:1 split
   (``config.seed``), each split in the table's row order.
4. Encoding, fitted on train only. Categorical fields: sorted unique train values get ids
   ``1..V``; null, NaN and values unseen in train get the OOV id 0. Numeric fields
   (``RawTable.numeric``): non-finite values and nulls get id 0; the rest are bucketized
   into ids ``1..B`` by train quantiles (``numeric_encoding='quantile'``, at most
   ``numeric_buckets`` buckets, duplicate edges merged), or z-scored with train mean / std,
   clipped to [-3, 3] and cut into ``numeric_buckets`` uniform buckets
   (``numeric_encoding='standardize'``).

:func:`batches` yields numpy batches for the trainer and :func:`load_cached` stores prepared
arrays on disk keyed by a hash of the inputs and the data config.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
import numpy as np
import polars as pl

from htl_jax.data.schema import DataError, HybridData, HybridSpec, RawTable, Split

# Bump when the preprocessing changes so that old caches are not reused.
CACHE_VERSION = 1
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_ENCODINGS = ('quantile', 'standardize')
_STANDARDIZE_CLIP = 3.0


def data_option(config: Any, name: str, default: Any) -> Any:
  """``config.data.<name>``, or ``default`` when the config has no such key."""
  data = getattr(config, 'data', None)
  if data is None:
    return default
  try:
    value = data[name]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


# --------------------------------------------------------------------------- validation


def _label_column(raw: RawTable, t: int) -> str:
  """Source column name of task ``t`` (binary tasks then the core) for error messages."""
  if raw.label_columns is not None and t < len(raw.label_columns):
    return raw.label_columns[t]
  return (tuple(raw.binary_tasks) + (raw.core_task,))[t]


def _validate(raw: RawTable) -> tuple[np.ndarray, np.ndarray]:
  """Checks shapes and values; returns float32 labels ``[N, T]`` and core ``[N]``."""
  labels = np.asarray(raw.labels, dtype=np.float64)
  core = np.asarray(raw.core, dtype=np.float64)
  num_binary = len(raw.binary_tasks)
  if labels.ndim == 1 and num_binary == 1:
    labels = labels[:, None]
  n = core.shape[0] if core.ndim == 1 else -1
  if n == 0 or labels.shape[0] == 0:
    raise DataError(f'{raw.source}: the table is empty (0 rows)')
  if labels.ndim != 2 or labels.shape[1] != num_binary:
    raise DataError(f'{raw.source}: labels have shape {labels.shape}, expected '
                    f'[N, {num_binary}] for binary tasks {list(raw.binary_tasks)}')
  if core.ndim != 1 or labels.shape[0] != n or raw.features.height != n:
    raise DataError(f'{raw.source}: row counts differ: labels {labels.shape[0]}, core '
                    f'{core.shape}, features {raw.features.height}')
  if raw.time is not None and np.asarray(raw.time).shape != (n,):
    raise DataError(f'{raw.source}: time has shape {np.asarray(raw.time).shape}, '
                    f'expected ({n},)')
  for t in range(num_binary):
    column = labels[:, t]
    bad = int(np.count_nonzero(~np.isfinite(column) | ((column != 0) & (column != 1))))
    if bad:
      raise DataError(f'{raw.source}: column {_label_column(raw, t)!r}: {bad} rows with a '
                      f'binary label that is not 0 or 1 (NaN, inf or another value)')
  bad = int(np.count_nonzero(~np.isfinite(core) | (core < 0)))
  if bad:
    raise DataError(f'{raw.source}: column {_label_column(raw, num_binary)!r}: {bad} rows '
                    f'with a core value that is NaN, inf or negative')
  return labels.astype(np.float32), core.astype(np.float32)


def enforce_nesting(labels: np.ndarray) -> tuple[np.ndarray, int]:
  """Applies ``y^t <- min(y^t, y^{t-1})`` along the task chain.

  Returns:
    The nested labels and the number of rows that changed.
  """
  nested = np.minimum.accumulate(labels, axis=1)
  fixed = int(np.count_nonzero(np.any(nested != labels, axis=1)))
  return nested, fixed


# --------------------------------------------------------------------------- split


def split_order(n: int, time: Optional[np.ndarray], seed: int) -> tuple[np.ndarray, int, int]:
  """Row order and split sizes for an 8:1:1 split.

  Args:
    n: number of rows.
    time: timestamps (chronological split, stable sort) or None (seeded random split).
    seed: seed of the random split.

  Returns:
    ``(order, n_train, n_valid)``: train rows are ``order[:n_train]``, valid rows the next
    ``n_valid``, test the rest. Within each split, rows keep chronological (or, for the
    random split, original) order.
  """
  n_train = int(math.floor(n * SPLIT_FRACTIONS[0]))
  n_valid = int(math.floor(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))) - n_train
  if time is not None:
    order = np.argsort(np.asarray(time), kind='stable')
  else:
    perm = np.random.default_rng(seed).permutation(n)
    order = np.concatenate([np.sort(perm[:n_train]),
                            np.sort(perm[n_train:n_train + n_valid]),
                            np.sort(perm[n_train + n_valid:])])
  return order, n_train, n_valid


# --------------------------------------------------------------------------- encoding


def _categorical_expr(name: str, dtype: pl.DataType) -> pl.Expr:
  """Normalizes a categorical column so that unique / replace work on it."""
  expr = pl.col(name)
  if isinstance(dtype, (pl.Categorical, pl.Enum)):
    return expr.cast(pl.String)
  if dtype == pl.Boolean:
    return expr.cast(pl.Int8)
  if dtype.is_float():
    return expr.fill_nan(None)
  if dtype.is_nested():
    raise DataError(f'column {name!r} has nested dtype {dtype}; one value per row expected')
  return expr


def _lookup_ids(column: pl.Series, is_train: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
  """Integer fast path: a lookup table over ``[min, max]`` (None when the range is large).

  Marks the values present in train, numbers them in sorted order (``cumsum``) and reads
  every row's id from the table; nulls (the table's last slot) and values absent from train
  read 0.
  """
  if column.dtype == pl.Boolean:
    column = column.cast(pl.Int8)
  if not column.dtype.is_integer() or column.null_count() == column.len():
    return None
  lo, hi = int(column.min()), int(column.max())
  span = hi - lo + 1
  if span > max(4 * column.len(), 1 << 16):
    return None
  offsets = (column.cast(pl.Int64) - lo).fill_null(span).to_numpy()
  present = np.zeros(span + 1, np.bool_)
  present[offsets[is_train]] = True
  present[span] = False
  table = np.cumsum(present, dtype=np.int32)
  table[~present] = 0
  return table[offsets], int(table.max()) + 1


def _encode_categorical(frame: pl.DataFrame, is_train: np.ndarray,
                        names: list[str]) -> dict[str, tuple[np.ndarray, int]]:
  """Vocabulary on train rows (sorted unique values -> 1..V, 0 = OOV) for every column.

  Returns:
    Per column, int32 ids ``[N]`` in the frame's row order and the vocabulary size V + 1.
  """
  out = {}
  rest = []
  for name in names:
    fast = _lookup_ids(frame[name], is_train)
    if fast is None:
      rest.append(name)
    else:
      out[name] = fast
  if not rest:
    return out
  normal = {n: _categorical_expr(n, frame.schema[n]) for n in rest}
  train = frame.select(rest).filter(pl.Series(is_train))
  uniques = train.select([normal[n].drop_nulls().unique().sort().implode() for n in rest])
  exprs = []
  for name in rest:
    vocab = uniques[name][0]
    if len(vocab) == 0:
      exprs.append(pl.repeat(0, frame.height, dtype=pl.Int32).alias(name))
    else:
      ids = pl.Series(np.arange(1, len(vocab) + 1, dtype=np.int32))
      exprs.append(normal[name].replace_strict(vocab, ids, default=0, return_dtype=pl.Int32)
                   .fill_null(0).alias(name))
    out[name] = (None, len(vocab) + 1)
  encoded = frame.select(exprs)
  for name in rest:
    out[name] = (encoded[name].to_numpy().astype(np.int32, copy=False), out[name][1])
  return out


def _numeric_values(frame: pl.DataFrame, name: str, source: str) -> np.ndarray:
  """Float64 values with NaN for nulls and non-finite values; unparsable values raise."""
  column = frame[name]
  if not column.dtype.is_numeric():
    parsed = column.cast(pl.Float64, strict=False)
    bad = int(((parsed.is_null()) & column.is_not_null()).sum())
    if bad:
      raise DataError(f'{source}: numeric column {name!r}: {bad} rows are not numbers')
    column = parsed
  values = column.cast(pl.Float64).to_numpy().astype(np.float64, copy=True)
  values[~np.isfinite(values)] = np.nan
  return values


def bucketize(values: np.ndarray, is_train: np.ndarray, num_buckets: int,
              encoding: str) -> tuple[np.ndarray, int]:
  """Bucket ids ``1..B`` (0 for NaN) fitted on the training rows.

  Args:
    values: float64 ``[N]``, NaN for missing.
    is_train: bool ``[N]``, True for training rows.
    num_buckets: number of buckets (quantile: an upper bound after merging equal edges).
    encoding: 'quantile' or 'standardize'.

  Returns:
    int32 ids ``[N]`` and the vocabulary size ``B + 1`` (including the null id 0).
  """
  train = values[is_train]
  train = train[~np.isnan(train)]
  missing = np.isnan(values)
  if train.size == 0:
    return np.zeros(values.shape, np.int32), 1
  if encoding == 'quantile':
    quantiles = np.linspace(0.0, 1.0, num_buckets + 1)[1:-1]
    edges = np.unique(np.quantile(train, quantiles)) if quantiles.size else np.zeros(0)
    ids = np.searchsorted(edges, values, side='right') + 1
    size = edges.size + 2
  elif encoding == 'standardize':
    std = float(train.std())
    z = (values - float(train.mean())) / (std if std > 0 else 1.0)
    z = np.clip(z, -_STANDARDIZE_CLIP, _STANDARDIZE_CLIP)
    scaled = (z + _STANDARDIZE_CLIP) / (2 * _STANDARDIZE_CLIP) * num_buckets
    ids = np.clip(np.floor(np.nan_to_num(scaled)), 0, num_buckets - 1) + 1
    size = num_buckets + 1
  else:
    raise DataError(f'config.data.numeric_encoding={encoding!r}; expected one of {_ENCODINGS}')
  ids = ids.astype(np.int32)
  ids[missing] = 0
  return ids, size


def _gather_rows(columns: list[np.ndarray], order: np.ndarray,
                 block: int = 1 << 15) -> np.ndarray:
  """``stack(columns, axis=1)[order]`` as int32.

  Works in row blocks that stay in cache, on up to 4 threads (numpy releases the GIL while
  gathering), since this is the largest single cost of :func:`prepare` on a 1M-row log.
  """
  x = np.empty((order.shape[0], len(columns)), np.int32)

  def fill(start: int) -> None:
    rows = order[start:start + block]
    out = x[start:start + block]
    for j, column in enumerate(columns):
      out[:, j] = column[rows]

  starts = range(0, order.shape[0], block)
  with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    list(pool.map(fill, starts))
  return x


# --------------------------------------------------------------------------- prepare


def prepare(raw: RawTable, config: Any) -> HybridData:
  """Validates, nests, splits and encodes a raw table (module docstring, steps 1-4).

  Args:
    raw: a loader's output.
    config: the experiment config; reads ``seed``, ``data.numeric_buckets`` and
      ``data.numeric_encoding``.

  Returns:
    The spec and the train / valid / test splits as int32 / float32 numpy arrays.

  Raises:
    DataError: bad labels or core values, an empty table or an empty split.
  """
  labels, core = _validate(raw)
  labels, fixed = enforce_nesting(labels)
  logging.info('%s: nesting y^t <= y^(t-1) enforced, %d rows fixed', raw.source, fixed)
  num_buckets = int(data_option(config, 'numeric_buckets', 20))
  encoding = str(data_option(config, 'numeric_encoding', 'quantile'))
  if encoding not in _ENCODINGS:
    raise DataError(f'config.data.numeric_encoding={encoding!r}; expected one of {_ENCODINGS}')
  if num_buckets < 1:
    raise DataError(f'config.data.numeric_buckets={num_buckets}; expected >= 1')
  missing = [n for n in raw.numeric if n not in raw.features.columns]
  if missing:
    raise DataError(f'{raw.source}: numeric columns {missing} are not among the features')

  n = core.shape[0]
  time = None if raw.time is None else np.asarray(raw.time)
  order, n_train, n_valid = split_order(n, time, int(getattr(config, 'seed', 0)))
  sizes = {'train': n_train, 'valid': n_valid, 'test': n - n_train - n_valid}
  empty = [k for k, v in sizes.items() if v == 0]
  if empty:
    raise DataError(f'{raw.source}: the {"/".join(empty)} split is empty ({n} rows; an 8:1:1 '
                    f'split needs at least 10)')

  is_train = np.zeros(n, np.bool_)
  is_train[order[:n_train]] = True
  frame = raw.features
  fields = tuple(frame.columns)
  categorical = [c for c in fields if c not in set(raw.numeric)]
  try:
    encoded = _encode_categorical(frame, is_train, categorical)
  except (pl.exceptions.PolarsError, DataError) as e:
    raise DataError(f'{raw.source}: could not encode categorical columns: {e}') from e
  columns, vocab_sizes = [], []
  for name in fields:
    if name in encoded:
      ids, size = encoded.pop(name)
    else:
      values = _numeric_values(frame, name, raw.source)
      ids, size = bucketize(values, is_train, num_buckets, encoding)
    columns.append(ids)
    vocab_sizes.append(int(size))
  x = _gather_rows(columns, order)
  labels, core = labels[order], core[order]

  spec = HybridSpec(fields=fields, vocab_sizes=tuple(vocab_sizes),
                    binary_tasks=tuple(raw.binary_tasks), core_task=raw.core_task)
  bounds = [0, n_train, n_train + n_valid, n]
  splits = [Split(x[a:b], labels[a:b], core[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  logging.info('%s: %d rows -> train %d / valid %d / test %d, %d fields, %d ids (%s split)',
               raw.source, n, *sizes.values(), len(fields), spec.total_vocab,
               'chronological' if time is not None else 'random')
  return HybridData(spec, *splits)


# --------------------------------------------------------------------------- batches


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches :func:`batches` yields for ``n`` rows."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(split: Split, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
            drop_remainder: bool, part: tuple[int, int] = (0, 1)
            ) -> Iterator[dict[str, np.ndarray]]:
  """Yields numpy batches of a split.

  Each batch has ``x`` int32 ``[B, F]``, ``y`` float32 ``[B, T]``, ``core`` float32 ``[B]``,
  ``index`` int32 ``[B]`` (row position in the split) and ``weight`` float32 ``[B]`` (1 for
  real rows, 0 for padding). With ``shuffle`` the order is the permutation drawn from
  ``np.random.default_rng((seed, epoch))``. With ``drop_remainder=False`` the last batch is
  padded to ``batch_size`` by repeating the split's row 0 (index 0) with weight 0.

  ``part=(p, P)`` yields only the contiguous part ``p`` of ``P`` equal parts of each batch
  (``B / P`` rows; ``batch_size`` must be divisible by ``P``): what process ``p`` of ``P``
  feeds. The parts of all processes, in order, are the whole batch.
  """
  index_of_part, num_parts = part
  if batch_size % num_parts or not 0 <= index_of_part < num_parts:
    raise ValueError(f'cannot take part {index_of_part} of {num_parts} of a batch of '
                     f'{batch_size} rows')
  rows = slice(index_of_part * batch_size // num_parts,
               (index_of_part + 1) * batch_size // num_parts)
  n = len(split)
  count = num_batches(n, batch_size, drop_remainder)
  order = (np.random.default_rng((seed, epoch)).permutation(n) if shuffle
           else np.arange(n))
  for b in range(count):
    index = order[b * batch_size:(b + 1) * batch_size]
    real = index.shape[0]
    weight = np.ones(batch_size, np.float32)
    if real < batch_size:
      index = np.concatenate([index, np.zeros(batch_size - real, index.dtype)])
      weight[real:] = 0.0
    index, weight = index[rows], weight[rows]
    yield {'x': split.x[index], 'y': split.y[index], 'core': split.core[index],
           'index': index.astype(np.int32), 'weight': weight}


# --------------------------------------------------------------------------- cache

_ARRAYS = ('x', 'y', 'core')
_SPLITS = ('train', 'valid', 'test')


def cache_key(key_parts: Mapping[str, Any]) -> str:
  """sha256 of the canonical JSON of ``key_parts`` (plus the cache version)."""
  payload = json.dumps({'cache_version': CACHE_VERSION, **key_parts}, sort_keys=True,
                       default=str)
  return hashlib.sha256(payload.encode()).hexdigest()


def _write_cache(data: HybridData, key_parts: Mapping[str, Any], cache_dir: str,
                 final: str) -> None:
  """Writes ``data.npz`` and ``spec.json`` into a temp dir, then renames it to ``final``."""
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-', dir=cache_dir)
  try:
    arrays = {f'{s}_{a}': getattr(getattr(data, s), a) for s in _SPLITS for a in _ARRAYS}
    np.savez(os.path.join(tmp, 'data.npz'), **arrays)
    spec = _spec_to_dict(data.spec)
    with open(os.path.join(tmp, 'spec.json'), 'w') as f:
      json.dump({'spec': spec, 'key_parts': key_parts}, f, indent=1, default=str)
    try:
      os.replace(tmp, final)
    except OSError:
      if not os.path.isdir(final):  # lost a race to another writer: theirs is as good
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _spec_to_dict(spec: HybridSpec) -> dict[str, Any]:
  """JSON-ready form of a spec."""
  return {'fields': list(spec.fields), 'vocab_sizes': list(spec.vocab_sizes),
          'binary_tasks': list(spec.binary_tasks), 'core_task': spec.core_task}


def _read_cache(path: str) -> HybridData:
  """Reads a cache entry; raises on any inconsistency."""
  with open(os.path.join(path, 'spec.json')) as f:
    spec_dict = json.load(f)['spec']
  spec = HybridSpec(fields=tuple(spec_dict['fields']),
                    vocab_sizes=tuple(int(v) for v in spec_dict['vocab_sizes']),
                    binary_tasks=tuple(spec_dict['binary_tasks']),
                    core_task=spec_dict['core_task'])
  with np.load(os.path.join(path, 'data.npz'), allow_pickle=False) as npz:
    splits = [Split(*(np.asarray(npz[f'{s}_{a}']) for a in _ARRAYS)) for s in _SPLITS]
  for s in splits:
    n = s.x.shape[0]
    if (s.x.dtype != np.int32 or s.x.shape != (n, spec.num_fields)
        or s.y.shape != (n, spec.num_binary) or s.core.shape != (n,)):
      raise ValueError('cached arrays do not match the cached spec')
  return HybridData(spec, *splits)


def load_cached(key_parts: Mapping[str, Any], cache_dir: str,
                build: Callable[[], HybridData]) -> HybridData:
  """Returns the cached data for ``key_parts`` or builds, stores and returns it.

  The entry lives in ``cache_dir/<sha256 of key_parts>/`` as ``data.npz`` + ``spec.json``
  and is written to a temp dir first and renamed, so a crash never leaves a half entry. A
  corrupt entry is deleted and rebuilt; a cache dir that cannot be written is logged and
  skipped.
  """
  final = os.path.join(cache_dir, cache_key(key_parts))
  if os.path.isdir(final):
    try:
      data = _read_cache(final)
      logging.info('cache hit: %s', final)
      return data
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('corrupt cache %s (%s: %s); rebuilding', final, type(e).__name__, e)
      shutil.rmtree(final, ignore_errors=True)
  logging.info('cache miss: %s', final)
  data = build()
  try:
    _write_cache(data, key_parts, cache_dir, final)
  except OSError as e:
    logging.warning('could not write the cache %s: %s', final, e)
  return data

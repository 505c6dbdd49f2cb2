"""Shared preprocessing: validation, 8:1:1 split, encoding, batches, cache.

Every loader returns a :class:`~htl_jax.data.schema.RawTable`; :func:`prepare` turns it into
:class:`~htl_jax.data.schema.HybridData` (docs/design.md):

1. Validation. Binary labels must be finite and in {0, 1}; the core must be finite and >= 0.
   Anything else raises :class:`DataError` naming the source file, the column and the number
   of bad rows, before any array reaches JAX.
2. Nesting. The sequential constraint ``y^1 >= y^2 >= ... >= y^T`` (paper Section 3) is
   enforced with ``y^t <- min(y^t, y^{t-1})``; the number of rows changed is logged.
3. Split. With a timestamp, rows are sorted (stable) by time and cut 8:1:1 into train /
   valid / test, each in time order; without one, a random 8:1:1 split drawn once from
   ``config.split_seed`` (never from the model's ``seed``: every seed of a reproduction sees
   the same test rows), each split in the table's row order.
4. Encoding, in two separate steps (:mod:`htl_jax.data.encoding`): :func:`encoding.fit`
   learns the vocabularies and numeric buckets on the train rows only (the config's
   ``data.numeric_buckets`` and ``data.numeric_encoding``), then
   :meth:`~htl_jax.data.encoding.Encoder.encode` maps every row to ids (0 = OOV / null).
   The fitted :class:`~htl_jax.data.encoding.Encoder` travels with the data
   (``HybridData.encoder``), so that prediction encodes new rows with the same code.

:func:`batches` yields numpy batches for the trainer and :func:`load_cached` stores prepared
arrays (and the encoder) on disk keyed by a hash of the inputs and the data config.
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

from htl_jax.data import encoding as encoding_lib
from htl_jax.data.schema import HybridData, HybridSpec, RawTable, Split
from htl_jax.errors import DataError

# Bump when the preprocessing changes so that old caches are not reused.
CACHE_VERSION = 3
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


# --------------------------------------------------------------------------- validation


def _label_column(raw: RawTable, t: int) -> str:
  """Source column name of task ``t`` (binary tasks then the core) for error messages."""
  if raw.label_columns is not None and t < len(raw.label_columns):
    return raw.label_columns[t]
  return (tuple(raw.binary_tasks) + (raw.core_task,))[t]


def bad_values(source: str, column: str, count: int, core: bool) -> str:
  """The message for ``count`` rows of a label column that training cannot take."""
  if core:
    return (f'{source}: column {column!r}: {count} rows with a core value that is NaN, inf '
            'or negative')
  return (f'{source}: column {column!r}: {count} rows with a binary label that is not 0 '
          'or 1 (NaN, inf or another value)')


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
      raise DataError(bad_values(raw.source, _label_column(raw, t), bad, core=False))
  bad = int(np.count_nonzero(~np.isfinite(core) | (core < 0)))
  if bad:
    raise DataError(bad_values(raw.source, _label_column(raw, num_binary), bad, core=True))
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
    config: the experiment config; reads ``split_seed``, ``data.numeric_buckets`` and
      ``data.numeric_encoding``.

  Returns:
    The spec and the train / valid / test splits as int32 / float32 numpy arrays.

  Raises:
    DataError: bad labels or core values, an empty table or an empty split.
  """
  labels, core = _validate(raw)
  labels, fixed = enforce_nesting(labels)
  logging.info('%s: nesting y^t <= y^(t-1) enforced, %d rows fixed', raw.source, fixed)
  # Their values were checked with the config (htl_jax.train.checks).
  num_buckets = int(config.data.numeric_buckets)
  encoding = str(config.data.numeric_encoding)
  missing = [n for n in raw.numeric if n not in raw.features.columns]
  if missing:
    raise DataError(f'{raw.source}: numeric columns {missing} are not among the features')

  n = core.shape[0]
  time = None if raw.time is None else np.asarray(raw.time)
  order, n_train, n_valid = split_order(n, time, int(config.split_seed))
  sizes = {'train': n_train, 'valid': n_valid, 'test': n - n_train - n_valid}
  empty = [k for k, v in sizes.items() if v == 0]
  if empty:
    raise DataError(f'{raw.source}: the {"/".join(empty)} split is empty ({n} rows; an 8:1:1 '
                    f'split needs at least 10)')

  is_train = np.zeros(n, np.bool_)
  is_train[order[:n_train]] = True
  encoder = encoding_lib.fit(raw.features, raw.numeric, is_train, num_buckets=num_buckets,
                             encoding=encoding, codes=raw.codes, source=raw.source)
  columns, _ = encoder.encode(raw.features, raw.codes, raw.source)
  x = _gather_rows(columns, order)
  labels, core = labels[order], core[order]

  group = None if raw.group is None else np.asarray(raw.group, np.int64)[order]

  spec = HybridSpec(fields=encoder.names, vocab_sizes=encoder.vocab_sizes,
                    binary_tasks=tuple(raw.binary_tasks), core_task=raw.core_task)
  bounds = [0, n_train, n_train + n_valid, n]
  splits = [Split(x[a:b], labels[a:b], core[a:b], None if group is None else group[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]
  logging.info('%s: %d rows -> train %d / valid %d / test %d, %d fields, %d ids (%s split)',
               raw.source, n, *sizes.values(), spec.num_fields, spec.total_vocab,
               'chronological' if time is not None else 'random')
  return HybridData(spec, *splits, encoder=encoder)


# --------------------------------------------------------------------------- batches


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of batches :func:`batches` yields for ``n`` rows."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_rows(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
               drop_remainder: bool, part: tuple[int, int] = (0, 1)
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(index, weight)`` of each batch of a split of ``n`` rows: which rows :func:`batches`
  takes (int32) and their weights (float32; 0 for padding). Arguments as there."""
  index_of_part, num_parts = part
  if batch_size % num_parts or not 0 <= index_of_part < num_parts:
    raise ValueError(f'cannot take part {index_of_part} of {num_parts} of a batch of '
                     f'{batch_size} rows')
  rows = slice(index_of_part * batch_size // num_parts,
               (index_of_part + 1) * batch_size // num_parts)
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
    yield index[rows].astype(np.int32), weight[rows]


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
  for index, weight in batch_rows(len(split), batch_size, shuffle=shuffle, seed=seed,
                                  epoch=epoch, drop_remainder=drop_remainder, part=part):
    yield {'x': split.x[index], 'y': split.y[index], 'core': split.core[index],
           'index': index, 'weight': weight}


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
  """Writes ``data.npz`` and ``spec.json`` (spec and encoder) into a temp dir, then renames it
  to ``final``."""
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-', dir=cache_dir)
  try:
    arrays = {f'{s}_{a}': getattr(getattr(data, s), a) for s in _SPLITS for a in _ARRAYS}
    arrays.update({f'{s}_group': getattr(data, s).group for s in _SPLITS
                   if getattr(data, s).group is not None})
    np.savez(os.path.join(tmp, 'data.npz'), **arrays)
    spec = data.spec.to_dict()
    encoder = data.encoder.to_dict() if data.encoder is not None else None
    with open(os.path.join(tmp, 'spec.json'), 'w') as f:
      json.dump({'spec': spec, 'encoder': encoder, 'key_parts': key_parts}, f, indent=1,
                default=str)
    try:
      os.replace(tmp, final)
    except OSError:
      if not os.path.isdir(final):  # lost a race to another writer: theirs is as good
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: str) -> HybridData:
  """Reads a cache entry; raises on any inconsistency."""
  with open(os.path.join(path, 'spec.json')) as f:
    stored = json.load(f)
  spec = HybridSpec.from_dict(stored['spec'])
  encoder = (encoding_lib.Encoder.from_dict(stored['encoder'])
             if stored.get('encoder') is not None else None)
  with np.load(os.path.join(path, 'data.npz'), allow_pickle=False) as npz:
    splits = [Split(*(np.asarray(npz[f'{s}_{a}']) for a in _ARRAYS),
                    group=np.asarray(npz[f'{s}_group']) if f'{s}_group' in npz else None)
              for s in _SPLITS]
  for s in splits:
    n = s.x.shape[0]
    if (s.x.dtype != np.int32 or s.x.shape != (n, spec.num_fields)
        or s.y.shape != (n, spec.num_binary) or s.core.shape != (n,)
        or (s.group is not None and s.group.shape != (n,))):
      raise ValueError('cached arrays do not match the cached spec')
  if encoder is not None and encoder.vocab_sizes != spec.vocab_sizes:
    raise ValueError('the cached encoder does not match the cached spec')
  return HybridData(spec, *splits, encoder=encoder)


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

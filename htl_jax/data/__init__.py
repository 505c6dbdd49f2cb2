"""Datasets for hybrid-target multi-task learning (docs/design.md).

The single entry point is :func:`load_dataset`: it picks the loader named by
``config.dataset``, runs the shared :func:`htl_jax.data.pipeline.prepare` and, with a cache
dir, stores the prepared arrays keyed by the input files and the data config.
:func:`read_features` reads a file to score, in chunks, with the same loader.

Every loader module exposes ``load_raw(config) -> RawTable`` and
``input_files(config) -> list[str]``; the loaders of files also expose
``read_features(config, passthrough, chunk_rows) -> Iterator[FeatureChunk]``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Iterator, Optional, Sequence

from htl_jax.data import pipeline
from htl_jax.data.schema import FeatureChunk, HybridData, HybridSpec, RawTable, Split
from htl_jax.errors import DataError

__all__ = ['DATASETS', 'FeatureChunk', 'HybridData', 'HybridSpec', 'RawTable', 'Split',
           'check_columns', 'default_cache_dir', 'input_files', 'load_dataset',
           'read_features']

# config.dataset -> loader module (imported lazily, on first use).
DATASETS = {
    'kuairand': 'htl_jax.data.kuairand',
    'kaggle_revenue': 'htl_jax.data.kaggle_revenue',
    'tabular': 'htl_jax.data.tabular',
    'synthetic': 'htl_jax.data.synthetic',
}


def default_cache_dir() -> str:
  """Where prepared arrays are cached unless ``config.cache_dir`` says otherwise."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'htl_jax')


def _loader(name: str):
  if name not in DATASETS:
    raise DataError(f'unknown dataset {name!r}; known datasets: {sorted(DATASETS)}')
  return importlib.import_module(DATASETS[name])


def input_files(config: Any) -> list[str]:
  """The files ``config``'s loader reads (DataError when the config names none)."""
  return list(_loader(config.dataset).input_files(config))


def check_columns(config: Any) -> None:
  """The data config's own consistency, no file read (the loader's ``check_columns``,
  where it has one: a tabular file's column roles).

  Raises:
    DataError: an unknown dataset, or columns that cannot play their roles.
  """
  check = getattr(_loader(config.dataset), 'check_columns', None)
  if check is not None:
    check(config)


def _file_stamp(path: str) -> dict[str, Any]:
  """Identity of an input file for the cache key: absolute path, size and mtime."""
  try:
    stat = os.stat(path)
  except OSError:
    return {'path': os.path.abspath(path), 'missing': True}
  return {'path': os.path.abspath(path), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def cache_key_parts(config: Any, files: list[str]) -> dict[str, Any]:
  """Everything the prepared arrays depend on: input files and the data config."""
  data = config.data.to_dict() if hasattr(config.data, 'to_dict') else dict(config.data)
  data.pop('passthrough', None)     # what predictions copy; not part of the arrays
  return {
      'dataset': config.dataset,
      'data_dir': config.data_dir,
      'data': data,
      'split_seed': int(config.split_seed),
      'max_rows': int(data.get('max_rows', 0) or 0),
      'files': [_file_stamp(f) for f in files],
  }


def load_dataset(config: Any, cache_dir: Optional[str] = None) -> HybridData:
  """Loads and prepares ``config.dataset``.

  Args:
    config: experiment config (``dataset``, ``data_dir``, ``data`` block, ``split_seed``).
    cache_dir: where to cache the prepared arrays; None = no cache.

  Returns:
    The prepared :class:`HybridData`.

  Raises:
    DataError: unknown dataset, missing file or column, bad labels, empty split.
  """
  loader = _loader(config.dataset)

  def build() -> HybridData:
    return pipeline.prepare(loader.load_raw(config), config)

  if not cache_dir:
    return build()
  parts = cache_key_parts(config, list(loader.input_files(config)))
  return pipeline.load_cached(parts, cache_dir, build)


def read_features(config: Any, passthrough: Sequence[str] = (), chunk_rows: int = 1 << 18
                  ) -> Iterator[FeatureChunk]:
  """Raw feature columns of the rows to score, ``chunk_rows`` rows at a time.

  Args:
    config: a run's config pointing at the input (``data.path`` for tabular files,
      ``data_dir`` for KuaiRand and Kaggle-Revenue).
    passthrough: columns of the input copied to each chunk's ``passthrough`` frame.
    chunk_rows: rows per chunk (memory stays bounded by it).

  Returns:
    An iterator of :class:`FeatureChunk` in input row order.

  Raises:
    DataError: a dataset without input files, a missing file or column.
  """
  loader = _loader(config.dataset)
  if not hasattr(loader, 'read_features'):
    raise DataError(f'dataset {config.dataset!r} reads no files, so there is nothing to '
                    'score; prediction reads kuairand, kaggle_revenue or tabular data')
  if chunk_rows < 1:
    raise ValueError(f'chunk_rows must be >= 1, got {chunk_rows}')
  return loader.read_features(config, tuple(passthrough), int(chunk_rows))

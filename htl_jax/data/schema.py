"""Data contract shared by every loader, the pipeline and the trainer (docs/design.md).

A loader turns files into a :class:`RawTable` (raw feature columns, labels in task order,
the core value and an optional timestamp). :mod:`htl_jax.data.pipeline` validates it, splits
it 8:1:1, builds vocabularies on train only (id 0 = OOV) and returns :class:`HybridData`:
int32 field ids, binary labels and the core value as numpy arrays, ready for batching, and
the fitted encoder. For prediction a loader yields :class:`FeatureChunk` s instead: the raw
feature columns of a bounded number of rows, without labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import polars as pl

from htl_jax.spec import HybridSpec

__all__ = ['FeatureChunk', 'HybridData', 'HybridSpec', 'RawTable', 'Split', 'Unparseable']


@dataclasses.dataclass
class Split:
  """One split of a dataset as numpy arrays (N rows).

  Attributes:
    x: int32 ``[N, F]`` field ids, 0 = OOV.
    y: float32 ``[N, T]`` binary labels in task order, nested (``y[:, t] <= y[:, t-1]``).
    core: float32 ``[N]`` core target on the original scale (>= 0, finite).
    group: int64 ``[N]`` the user (group) of each row, for GAUC; None where the data
      names no user column.
  """

  x: np.ndarray
  y: np.ndarray
  core: np.ndarray
  group: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return int(self.x.shape[0])


@dataclasses.dataclass
class HybridData:
  """A prepared dataset: spec plus chronological train / valid / test splits.

  ``encoder`` is the :class:`htl_jax.data.encoding.Encoder` fitted on the train rows (None
  only for data built by hand, e.g. in tests).
  """

  spec: HybridSpec
  train: Split
  valid: Split
  test: Split
  encoder: Optional[Any] = None


@dataclasses.dataclass
class RawTable:
  """What every loader returns before the shared pipeline.

  Attributes:
    features: one column per feature field, raw values (ints, strings, floats; nulls
      allowed and mapped to OOV).
    numeric: names of ``features`` columns that are numeric and get bucketized (or
      standardized then bucketized) on train statistics.
    labels: float32 ``[N, T]`` binary labels in task order (validated by the pipeline).
    core: float32 ``[N]`` core target (validated by the pipeline).
    time: ``[N]`` sortable timestamps for the chronological split, or None for a seeded
      random 8:1:1 split.
    binary_tasks: binary task names in chain order.
    core_task: core task name.
    source: the file the rows came from, for error messages.
    label_columns: source column name of each binary task and of the core (for errors).
    codes: per feature column that holds integer codes of a side table's strings, those
      strings (sorted; code ``k`` is ``codes[name][k - 1]``), see
      :mod:`htl_jax.data.encoding`.
    group: ``[N]`` int64 user (group) keys for GAUC, or None.
  """

  features: pl.DataFrame
  numeric: tuple[str, ...]
  labels: np.ndarray
  core: np.ndarray
  time: Optional[np.ndarray]
  binary_tasks: tuple[str, ...]
  core_task: str
  source: str
  label_columns: Optional[tuple[str, ...]] = None
  codes: Optional[dict[str, np.ndarray]] = None
  group: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class Unparseable:
  """The cells of one numeric column that are not numbers: how many, and the first one.

  Attributes:
    rows: the number of rows whose cell could not be parsed as a number.
    example: the first such cell, as text.
  """

  rows: int
  example: str

  def describe(self) -> str:
    """``'3 rows are not a number (e.g. 'abc')'``, the text of the loaders' errors."""
    verb = 'row is' if self.rows == 1 else 'rows are'
    return f'{self.rows} {verb} not a number (e.g. {self.example!r})'

  def plus(self, other: 'Unparseable') -> 'Unparseable':
    """Both counts together, the first example kept."""
    return Unparseable(self.rows + other.rows, self.example)


@dataclasses.dataclass
class FeatureChunk:
  """Rows of a file to score: raw features as a loader gives them for training.

  Attributes:
    features: the feature columns, with the same dtypes as ``RawTable.features``.
    passthrough: columns copied to the predictions unchanged (ids), same rows.
    codes: as ``RawTable.codes``.
    source: the file the rows came from, for error messages.
    unparseable: per numeric feature column with cells that are not numbers (which
      training rejects), their count and an example; those cells are null in ``features``
      (missing, id 0). Prediction counts them, or stops under ``strict``.
  """

  features: pl.DataFrame
  passthrough: pl.DataFrame
  codes: Optional[dict[str, np.ndarray]]
  source: str
  unparseable: dict[str, Unparseable] = dataclasses.field(default_factory=dict)

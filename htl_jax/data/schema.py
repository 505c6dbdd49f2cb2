"""Data contract shared by every loader, the pipeline and the trainer (DESIGN section 7).

A loader turns files into a :class:`RawTable` (raw feature columns, labels in task order,
the core value and an optional timestamp). :mod:`htl_jax.data.pipeline` validates it, splits
it 8:1:1, builds vocabularies on train only (id 0 = OOV) and returns :class:`HybridData`:
int32 field ids, binary labels and the core value as numpy arrays, ready for batching.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import polars as pl


class DataError(ValueError):
  """Bad input data or data config. The message names the file, column and row count.

  ``experiments.main`` prints it as one line and exits non-zero, before any training and
  without touching an existing workdir.
  """


@dataclasses.dataclass(frozen=True)
class HybridSpec:
  """Static description of a hybrid-target problem.

  Attributes:
    fields: feature field names, one int32 column each in ``Split.x``.
    vocab_sizes: per field, the number of ids including the OOV id 0.
    binary_tasks: binary task names in chain order (``y^1 >= y^2 >= ...``).
    core_task: name of the continuous core task (always the last task index).
  """

  fields: tuple[str, ...]
  vocab_sizes: tuple[int, ...]
  binary_tasks: tuple[str, ...]
  core_task: str

  def __post_init__(self):
    if len(self.fields) != len(self.vocab_sizes):
      raise ValueError(
          f'{len(self.fields)} fields but {len(self.vocab_sizes)} vocab sizes')
    if not self.binary_tasks:
      raise ValueError('a hybrid-target problem needs at least one binary task')

  @property
  def tasks(self) -> tuple[str, ...]:
    """All task names, binary tasks in order then the core task."""
    return self.binary_tasks + (self.core_task,)

  @property
  def num_tasks(self) -> int:
    return len(self.binary_tasks) + 1

  @property
  def num_binary(self) -> int:
    return len(self.binary_tasks)

  @property
  def num_fields(self) -> int:
    return len(self.fields)

  @property
  def field_offsets(self) -> tuple[int, ...]:
    """Offset of each field's ids in the one shared embedding table."""
    return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]))

  @property
  def total_vocab(self) -> int:
    return int(sum(self.vocab_sizes))


@dataclasses.dataclass
class Split:
  """One split of a dataset as numpy arrays (N rows).

  Attributes:
    x: int32 ``[N, F]`` field ids, 0 = OOV.
    y: float32 ``[N, T]`` binary labels in task order, nested (``y[:, t] <= y[:, t-1]``).
    core: float32 ``[N]`` core target on the original scale (>= 0, finite).
  """

  x: np.ndarray
  y: np.ndarray
  core: np.ndarray

  def __len__(self) -> int:
    return int(self.x.shape[0])

  def take(self, index: np.ndarray) -> 'Split':
    return Split(self.x[index], self.y[index], self.core[index])


@dataclasses.dataclass
class HybridData:
  """A prepared dataset: spec plus chronological train / valid / test splits."""

  spec: HybridSpec
  train: Split
  valid: Split
  test: Split


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

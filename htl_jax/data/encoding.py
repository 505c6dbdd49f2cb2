"""Field encodings: fitted on the training rows, applied to any rows (docs/design.md).

:func:`fit` learns one encoding per feature field from the training rows; :meth:`Encoder.encode`
turns the raw columns of any rows (a whole table at training time, or a chunk of a new file
at prediction time) into int32 ids. Training and prediction run the same code, so a row
gets the same ids in both.

* Categorical fields: the sorted unique non-null training values get ids ``1..V``; null,
  NaN and values unseen in training get the OOV id 0 (their count is reported).
* Numeric fields: non-finite values and nulls get id 0; the rest are bucketized into ids
  ``1..B`` by training quantiles (``'quantile'``: at most ``num_buckets`` buckets, equal
  edges merged) or z-scored with the training mean / std, clipped to [-3, 3] and cut into
  ``num_buckets`` uniform buckets (``'standardize'``). A field with no training value is
  all 0 (``'empty'``).

A loader may hand a categorical column over as integer *codes* of a small side table (the
KuaiRand user / video features): code ``k`` stands for ``codes[name][k - 1]``, the side
table's sorted distinct strings. The encoding stores the strings, not the codes, so another
side table (new users, hence other codes) gives every string the id it had in training.

:meth:`Encoder.to_dict` / :meth:`Encoder.from_dict` give a JSON-ready form that round-trips
every value exactly (Python writes floats with ``repr``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import polars as pl

from htl_jax.errors import DataError, first_line

ENCODINGS = ('quantile', 'standardize')
STANDARDIZE_CLIP = 3.0
Codes = Optional[Mapping[str, np.ndarray]]


# --------------------------------------------------------------------------- categorical


def _normalized(column: pl.Series) -> pl.Series:
  """A categorical column in a form that ``unique`` / ``replace_strict`` handle."""
  dtype = column.dtype
  if isinstance(dtype, (pl.Categorical, pl.Enum)):
    return column.cast(pl.String)
  if dtype == pl.Boolean:
    return column.cast(pl.Int8)
  if dtype.is_float():
    return column.fill_nan(None)
  if dtype.is_nested():
    raise DataError(f'column {column.name!r} has nested dtype {dtype}; one value per row '
                    'expected')
  return column


def _int_values(column: pl.Series) -> tuple[np.ndarray, np.ndarray]:
  """Int64 values (nulls read 0) and the null mask of an integer column."""
  nulls = column.is_null().to_numpy()
  return column.fill_null(0).cast(pl.Int64).to_numpy(), nulls


def _sorted_unique_ints(values: np.ndarray) -> np.ndarray:
  """Sorted distinct values: a presence table over ``[min, max]`` when small, else sort."""
  if values.size == 0:
    return values.astype(np.int64)
  lo, hi = int(values.min()), int(values.max())
  if hi - lo + 1 > max(4 * values.size, 1 << 16):
    return np.unique(values)
  present = np.zeros(hi - lo + 1, np.bool_)
  present[values - lo] = True
  return np.flatnonzero(present).astype(np.int64) + lo


@dataclasses.dataclass(frozen=True, eq=False)
class CategoricalField:
  """A vocabulary: ``values[i]`` (sorted, training rows only) has id ``i + 1``.

  Attributes:
    name: the feature field.
    values: int64, float64 or object (str) array of the sorted distinct training values.
  """

  name: str
  values: np.ndarray

  @property
  def size(self) -> int:
    """Number of ids, the OOV id 0 included."""
    return int(self.values.shape[0]) + 1

  @functools.cached_property
  def _int_table(self) -> Optional[tuple[int, np.ndarray]]:
    """``(lo, ids over [lo, hi])`` for an integer vocabulary of moderate span, else None."""
    if self.values.dtype != np.int64 or self.values.size == 0:
      return None
    lo, hi = int(self.values[0]), int(self.values[-1])
    if hi - lo + 1 > 4 * self.values.size + (1 << 16):
      return None
    table = np.zeros(hi - lo + 1, np.int32)
    table[self.values - lo] = np.arange(1, self.values.size + 1, dtype=np.int32)
    return lo, table

  def _int_ids(self, values: np.ndarray) -> np.ndarray:
    """Ids of int64 values (0 where not in the vocabulary)."""
    table = self._int_table
    if table is not None:
      lo, lookup = table
      offsets = values - lo
      inside = (offsets >= 0) & (offsets < lookup.shape[0])
      ids = np.zeros(values.shape, np.int32)
      ids[inside] = lookup[offsets[inside]]
      return ids
    pos = np.searchsorted(self.values, values)
    hit = self.values[np.minimum(pos, self.values.size - 1)] == values
    return np.where(hit, pos + 1, 0).astype(np.int32)

  @functools.cached_property
  def _replace_args(self) -> tuple[pl.Series, pl.Series]:
    """The vocabulary and its ids as polars Series (built once, reused for every chunk)."""
    return (pl.Series(self.values.tolist()),
            pl.Series(np.arange(1, self.size, dtype=np.int32)))

  def _general_ids(self, column: pl.Series) -> np.ndarray:
    """Ids via a polars replace (strings, floats, or mixed types)."""
    vocab, ids = self._replace_args
    if vocab.dtype == pl.String and column.dtype != pl.String:
      column = column.cast(pl.String)
    return (column.replace_strict(vocab, ids, default=0, return_dtype=pl.Int32)
            .fill_null(0).to_numpy().astype(np.int32, copy=False))

  def ids(self, column: pl.Series, codes: Optional[np.ndarray] = None) -> np.ndarray:
    """int32 ids ``[N]`` of a raw column (``codes``: the strings its integer codes stand for)."""
    column = _normalized(column)
    if self.values.size == 0:
      return np.zeros(column.len(), np.int32)
    if codes is not None:
      code_ids = np.concatenate([[0], self.ids(pl.Series(column.name, codes))]).astype(np.int32)
      values, nulls = _int_values(column)
      return code_ids[np.where(nulls, 0, values)]
    if self.values.dtype == np.int64 and column.dtype.is_integer():
      values, nulls = _int_values(column)
      ids = self._int_ids(values)
      ids[nulls] = 0
      return ids
    return self._general_ids(column)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form; ``dtype`` says how to read ``values`` back."""
    kind = {'i': 'int', 'f': 'float'}.get(self.values.dtype.kind, 'str')
    return {'name': self.name, 'type': 'categorical', 'dtype': kind,
            'values': self.values.tolist()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'CategoricalField':
    """Reads :meth:`to_dict`'s output."""
    dtype = {'int': np.int64, 'float': np.float64, 'str': object}[d['dtype']]
    return cls(d['name'], np.asarray(d['values'], dtype=dtype).reshape(-1))


def fit_categorical(name: str, column: pl.Series, is_train: np.ndarray,
                    codes: Optional[np.ndarray] = None) -> CategoricalField:
  """The vocabulary of the training rows of ``column`` (module docstring)."""
  column = _normalized(column)
  train = column.filter(pl.Series(is_train)).drop_nulls()
  if column.dtype.is_integer():
    values = _sorted_unique_ints(train.cast(pl.Int64).to_numpy())
    if codes is not None:
      values = np.asarray(codes, dtype=object)[values - 1]
  elif column.dtype.is_float():
    values = train.unique().sort().to_numpy().astype(np.float64)
  else:
    values = np.asarray(train.unique().sort().to_list(), dtype=object)
  return CategoricalField(name, values)


# --------------------------------------------------------------------------- numeric


def numeric_values(column: pl.Series, source: str) -> np.ndarray:
  """Float64 values with NaN for nulls and non-finite values; unparsable values raise."""
  if not column.dtype.is_numeric():
    parsed = column.cast(pl.Float64, strict=False)
    bad = int(((parsed.is_null()) & column.is_not_null()).sum())
    if bad:
      raise DataError(f'{source}: numeric column {column.name!r}: {bad} rows are not numbers')
    column = parsed
  values = column.cast(pl.Float64).to_numpy().astype(np.float64, copy=True)
  values[~np.isfinite(values)] = np.nan
  return values


@dataclasses.dataclass(frozen=True)
class NumericField:
  """Buckets of a numeric field (module docstring).

  Attributes:
    name: the feature field.
    encoding: 'quantile', 'standardize' or 'empty' (no training value: every id is 0).
    num_buckets: the configured number of buckets.
    edges: quantile bucket edges (``searchsorted(edges, x, 'right') + 1``).
    mean: standardize: the training mean.
    scale: standardize: the training std (1 where it is 0).
  """

  name: str
  encoding: str
  num_buckets: int
  edges: tuple[float, ...] = ()
  mean: float = 0.0
  scale: float = 1.0

  @property
  def size(self) -> int:
    """Number of ids, the null id 0 included."""
    if self.encoding == 'quantile':
      return len(self.edges) + 2
    if self.encoding == 'standardize':
      return self.num_buckets + 1
    return 1

  def bucket_ids(self, values: np.ndarray) -> np.ndarray:
    """int32 ids ``[N]`` of float64 values (NaN = missing -> 0)."""
    missing = np.isnan(values)
    if self.encoding == 'quantile':
      ids = np.searchsorted(np.asarray(self.edges, np.float64), values, side='right') + 1
    elif self.encoding == 'standardize':
      z = np.clip((values - self.mean) / self.scale, -STANDARDIZE_CLIP, STANDARDIZE_CLIP)
      scaled = (z + STANDARDIZE_CLIP) / (2 * STANDARDIZE_CLIP) * self.num_buckets
      ids = np.clip(np.floor(np.nan_to_num(scaled)), 0, self.num_buckets - 1) + 1
    else:
      return np.zeros(values.shape, np.int32)
    ids = ids.astype(np.int32)
    ids[missing] = 0
    return ids

  def ids(self, column: pl.Series, source: str = '') -> np.ndarray:
    """int32 ids ``[N]`` of a raw column."""
    return self.bucket_ids(numeric_values(column, source or column.name))

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form."""
    return {'type': 'numeric', **dataclasses.asdict(self), 'edges': list(self.edges)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'NumericField':
    """Reads :meth:`to_dict`'s output."""
    return cls(d['name'], d['encoding'], int(d['num_buckets']),
               tuple(float(e) for e in d['edges']), float(d['mean']), float(d['scale']))


def fit_numeric(name: str, values: np.ndarray, is_train: np.ndarray, num_buckets: int,
                encoding: str) -> NumericField:
  """Bucket edges (or mean / std) of the finite training values."""
  if encoding not in ENCODINGS:
    raise DataError(f'config.data.numeric_encoding={encoding!r}; expected one of {ENCODINGS}')
  train = values[is_train]
  train = train[~np.isnan(train)]
  if train.size == 0:
    return NumericField(name, 'empty', num_buckets)
  if encoding == 'quantile':
    quantiles = np.linspace(0.0, 1.0, num_buckets + 1)[1:-1]
    edges = np.unique(np.quantile(train, quantiles)) if quantiles.size else np.zeros(0)
    return NumericField(name, encoding, num_buckets, tuple(float(e) for e in edges))
  std = float(train.std())
  return NumericField(name, encoding, num_buckets, mean=float(train.mean()),
                      scale=std if std > 0 else 1.0)


# --------------------------------------------------------------------------- encoder

Field = Union[CategoricalField, NumericField]


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """Every feature field's fitted encoding, in field order."""

  fields: tuple[Field, ...]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.fields)

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    return tuple(f.size for f in self.fields)

  def encode(self, frame: pl.DataFrame, codes: Codes = None, source: str = ''
             ) -> tuple[list[np.ndarray], dict[str, int]]:
    """Ids of every field for the rows of ``frame``.

    Args:
      frame: raw feature columns (at least every field; others are ignored).
      codes: per coded column, the strings its integer codes stand for (module docstring).
      source: the file the rows came from, for error messages.

    Returns:
      One int32 ``[N]`` array per field, and per categorical field the number of rows whose
      (non-null) value was unseen in training and got the OOV id 0.

    Raises:
      DataError: a missing field column or an unparsable numeric value.
    """
    missing = [name for name in self.names if name not in frame.columns]
    if missing:
      raise DataError(f'{source or "input"}: missing feature column(s) {missing}')
    codes = codes or {}
    columns, unseen = [], {}
    for field in self.fields:
      column = frame.get_column(field.name)
      if isinstance(field, NumericField):
        columns.append(field.ids(column, source))
        continue
      try:
        ids = field.ids(column, codes.get(field.name))
      except pl.exceptions.PolarsError as e:
        raise DataError(f'{source}: could not encode categorical column {field.name!r}: '
                        f'{first_line(e)}') from None
      unseen[field.name] = int(np.count_nonzero(ids == 0)) - _normalized(column).null_count()
      columns.append(ids)
    return columns, unseen

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form, every value exact (``{'fields': [field.to_dict(), ...]}``)."""
    return {'fields': [f.to_dict() for f in self.fields]}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Encoder':
    """Reads :meth:`to_dict`'s output."""
    return cls(tuple(CategoricalField.from_dict(f) if f['type'] == 'categorical'
                     else NumericField.from_dict(f) for f in d['fields']))


def fit(frame: pl.DataFrame, numeric: Sequence[str], is_train: np.ndarray, *,
        num_buckets: int, encoding: str, codes: Codes = None, source: str = '') -> Encoder:
  """Fits every column of ``frame`` on the rows where ``is_train`` (module docstring).

  Args:
    frame: raw feature columns, one per field, in field order.
    numeric: the names of the numeric fields; the others are categorical.
    is_train: bool ``[N]``, True for training rows.
    num_buckets: numeric fields: the number of buckets (quantile: an upper bound).
    encoding: numeric fields: 'quantile' or 'standardize'.
    codes: per coded categorical column, the strings its codes stand for.
    source: the file the rows came from, for error messages.

  Returns:
    The fitted :class:`Encoder`.
  """
  numeric = set(numeric)
  codes = codes or {}
  fields: list[Field] = []
  for name in frame.columns:
    column = frame.get_column(name)
    if name in numeric:
      fields.append(fit_numeric(name, numeric_values(column, source), is_train, num_buckets,
                                encoding))
      continue
    try:
      fields.append(fit_categorical(name, column, is_train, codes.get(name)))
    except (pl.exceptions.PolarsError, DataError) as e:
      raise DataError(f'{source}: could not encode categorical columns: {e}') from e
  return Encoder(tuple(fields))

"""Score a file with a trained run, in bounded memory: chunks in, a predictions file out.

:func:`predict_file` reads the input with the run's own loader (KuaiRand directory,
Kaggle transactions, tabular CSV / Parquet) ``chunk_rows`` rows at a time, encodes each
chunk with the preprocessing fitted at training time
(:class:`htl_jax.run_files.Preprocessing`),
runs the trainer's eval step (:func:`htl_jax.train.step.eval_step`, compiled data-parallel
as in training) on batches of ``config.eval_batch_size`` rows and appends, per input row and
in input order:

* the passthrough columns (``config.data.passthrough``, e.g. ``user_id,video_id``),
* ``prob_<task>`` for every binary task (float32),
* ``pred_<core task>``, the core prediction on the original scale (float32).

Rows are carried over between chunks so that every batch but the last is full, exactly as
the trainer batches a split: the same rows in the same order give bit-identical
predictions, hence the metrics of ``metrics.json``. Values unseen in training get the OOV
id 0; their count per field is logged and returned. A numeric cell that is not a number
(``abc``: training rejects it) is scored as missing (id 0); its count per column is logged
and returned, and with ``strict=True`` (``--strict``) it stops the run with one
:class:`~htl_jax.errors.DataError` naming the file, the columns, their counts over the whole
input and an example.

The output is Parquet, or CSV when its name ends in ``.csv``. ``out`` is checked before
anything is read (not a directory, in an existing, writable directory); the file is written
to a temporary name beside it and renamed at the end, so a failed run leaves no partial file.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, NoReturn, Optional, Sequence

from absl import logging
import numpy as np
import polars as pl

from htl_jax import data as data_lib
from htl_jax.data import kaggle_revenue, pipeline, tabular
from htl_jax.data.encoding import Encoder
from htl_jax.data.schema import FeatureChunk, Unparseable
from htl_jax.errors import ConfigError, DataError
from htl_jax.serve.run import TrainedRun, load_run
from htl_jax import run_files
from htl_jax.train import parallel
from htl_jax.train import step as step_lib

PROB_PREFIX = 'prob_'
CORE_PREFIX = 'pred_'
DEFAULT_CHUNK_ROWS = 1 << 18


def output_columns(spec) -> tuple[str, ...]:
  """Prediction column names: ``prob_<task>`` per binary task, then ``pred_<core>``."""
  return tuple(PROB_PREFIX + t for t in spec.binary_tasks) + (CORE_PREFIX + spec.core_task,)


# ----------------------------------------------------------------------------- input


def check_out(out: str, inputs: Sequence[str] = (), workdir: str = '') -> None:
  """Raises a one-line ConfigError unless a predictions file can be written at ``out``.

  ``out`` must not be a directory (nor end in a separator), nor one of the ``inputs`` (the
  files scored) nor a file of the training run's ``workdir`` (a read command never changes
  it), and its directory must exist and be writable (the file is written there under a
  temporary name, then renamed).
  """
  target = os.path.realpath(out)
  if any(os.path.realpath(p) == target for p in inputs):
    raise ConfigError(f'{out}: is an input of this command (--data); write the predictions '
                      'to another --out')
  if workdir and _inside(target, os.path.realpath(workdir)):
    raise ConfigError(f'{out}: lies in the training run {workdir}, which scoring never '
                      'changes; write the predictions to another --out')
  if os.path.isdir(out) or out.endswith(os.sep):
    raise ConfigError(f'{out}: is a directory; --out names the predictions file '
                      '(.parquet, or .csv)')
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    what = 'is not a directory' if os.path.exists(parent) else 'does not exist'
    raise ConfigError(f'{out}: the directory {parent} {what} (--out)')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f'{out}: the directory {parent} is not writable (--out)')


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def config_for_input(config: Any, path: str) -> Any:
  """A copy of the run's config that reads ``path`` (all of its rows) with the same loader.

  Tabular runs read the file ``path``; KuaiRand runs a directory with the log and the user
  and video tables; Kaggle-Revenue runs a directory holding ``transactions.csv`` (or that
  file).

  Raises:
    DataError: a path that does not exist or does not fit the dataset.
  """
  config = config.copy_and_resolve_references()
  config.data.max_rows = 0
  if not os.path.exists(path):
    raise DataError(f'{path}: no such file or directory (--data)')
  if config.dataset == 'tabular':
    config.data.path = path
  elif config.dataset == 'kuairand':
    if not os.path.isdir(path):
      raise DataError(f'{path}: a kuairand run scores a directory holding the log, user and '
                      'video CSV files (--data=DIR)')
    config.data_dir = path
  elif config.dataset == 'kaggle_revenue':
    if os.path.isfile(path) and os.path.basename(path) == kaggle_revenue.FILE_NAME:
      path = os.path.dirname(path)
    config.data_dir = path
  else:
    raise DataError(f'dataset {config.dataset!r} reads no files, so there is nothing to '
                    'score; prediction reads kuairand, kaggle_revenue or tabular data')
  return config


def passthrough_columns(config: Any, override: Optional[str] = None) -> tuple[str, ...]:
  """``override`` or ``config.data.passthrough`` as a tuple of column names."""
  text = config.data.get('passthrough', '') if override is None else override
  return tabular.split_names(text)


# ----------------------------------------------------------------------------- scoring


class BatchScorer:
  """The trainer's eval step on fixed-size batches (the run's ``eval_batch_size``)."""

  def __init__(self, run: TrainedRun, batch_size: Optional[int] = None):
    self.batch_size = int(batch_size or run.config.eval_batch_size)
    self._setup = run.setup
    self._state = parallel.replicate(run.state)

  def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities ``[N, T]`` and core predictions ``[N]`` of int32 ids ``[N, F]``.

    The last batch is padded as the trainer's evaluation pads it
    (:func:`htl_jax.data.pipeline.batch_rows`). Each batch's result is read before the next
    is dispatched.
    """
    probs, core = [], []
    for index, weight in pipeline.batch_rows(x.shape[0], self.batch_size, shuffle=False,
                                             seed=0, epoch=0, drop_remainder=False):
      real = int(np.sum(weight > 0))
      batch = {'x': x[index], 'index': index, 'weight': weight}
      out = parallel.unreplicate(step_lib.eval_program(self._setup, self._state,
                                                       parallel.shard(batch)))
      probs.append(out['probs'][:real])
      core.append(out['core'][:real])
    return np.concatenate(probs), np.concatenate(core)


def _full_batches(chunks: Iterator[tuple[np.ndarray, pl.DataFrame]], batch_size: int
                  ) -> Iterator[tuple[np.ndarray, pl.DataFrame]]:
  """Re-cuts chunks so that every piece but the last is a multiple of ``batch_size`` rows."""
  held_x: list[np.ndarray] = []
  held_rows: list[pl.DataFrame] = []
  held = 0
  for x, rows in chunks:
    held_x.append(x)
    held_rows.append(rows)
    held += x.shape[0]
    if held < batch_size:
      continue
    x_all, rows_all = np.concatenate(held_x), pl.concat(held_rows, how='vertical')
    cut = held - held % batch_size
    yield x_all[:cut], rows_all.slice(0, cut)
    held_x, held_rows, held = [x_all[cut:]], [rows_all.slice(cut)], held - cut
  if held:
    yield np.concatenate(held_x), pl.concat(held_rows, how='vertical')


# ----------------------------------------------------------------------------- output


class _Writer:
  """Appends frames to a Parquet or CSV file under a temporary name; renames on close."""

  def __init__(self, out: str):
    self.out = out
    self.csv = out.lower().endswith('.csv')
    parent = os.path.dirname(os.path.abspath(out))
    self._tmp_dir = tempfile.mkdtemp(prefix='.predict-', dir=parent)
    self._parts: list[str] = []
    self._csv_file = open(os.path.join(self._tmp_dir, 'out.csv'), 'wb') if self.csv else None

  def write(self, frame: pl.DataFrame) -> None:
    if self._csv_file is not None:
      frame.write_csv(self._csv_file, include_header=not self._parts)
      self._parts.append('')
      return
    part = os.path.join(self._tmp_dir, f'part-{len(self._parts):06d}.parquet')
    frame.write_parquet(part)
    self._parts.append(part)

  def close(self) -> None:
    """Moves the complete file to ``out`` (Parquet parts are merged in streaming mode)."""
    if self._csv_file is not None:
      self._csv_file.close()
      os.replace(self._csv_file.name, self.out)
    else:
      merged = os.path.join(self._tmp_dir, 'out.parquet')
      pl.scan_parquet(self._parts).sink_parquet(merged, maintain_order=True)
      os.replace(merged, self.out)
    shutil.rmtree(self._tmp_dir, ignore_errors=True)

  def abort(self) -> None:
    if self._csv_file is not None:
      self._csv_file.close()
    shutil.rmtree(self._tmp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass
class PredictionSummary:
  """What :func:`predict_file` did.

  Attributes:
    rows: rows scored (= rows written).
    seconds: wall time from the first read to the renamed output.
    unseen: per categorical field, rows whose value was unseen in training (OOV id 0).
    out: the predictions file.
    unparseable: per numeric feature column with such cells, rows whose value could not be
      parsed as a number (scored as missing, id 0); empty for a clean input.
  """

  rows: int
  seconds: float
  unseen: dict[str, int]
  out: str
  unparseable: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def rows_per_second(self) -> float:
    return self.rows / max(self.seconds, 1e-9)


@dataclasses.dataclass
class _Counts:
  """What the chunks read so far held: unseen values and cells that are not numbers."""

  unseen: dict[str, int] = dataclasses.field(default_factory=dict)
  unparseable: dict[str, Unparseable] = dataclasses.field(default_factory=dict)

  def add_unseen(self, counts: dict[str, int]) -> None:
    for name, count in counts.items():
      self.unseen[name] = self.unseen.get(name, 0) + count

  def add_unparseable(self, chunk: FeatureChunk) -> None:
    for name, found in chunk.unparseable.items():
      known = self.unparseable.get(name)
      self.unparseable[name] = found if known is None else known.plus(found)


def _reject_unparseable(source: str, counts: _Counts, rest: Iterator[FeatureChunk]
                        ) -> NoReturn:
  """``strict``: counts the cells that are not numbers in the rest of the input, then stops."""
  for chunk in rest:
    counts.add_unparseable(chunk)
  parts = [f'column {name!r}: {found.describe()}' for name, found in counts.unparseable.items()]
  raise DataError(f'{source}: ' + '; '.join(parts) + ' (--strict; without it such values are '
                  'scored as missing and counted)')


def _encoded(encoder: Encoder, chunks: Iterator[FeatureChunk], counts: _Counts, strict: bool
             ) -> Iterator[tuple[np.ndarray, pl.DataFrame]]:
  """int32 ids ``[n, F]`` and passthrough rows of every chunk; counts unseen values and
  cells that are not numbers (``strict``: stops at the first chunk that has one)."""
  for chunk in chunks:
    counts.add_unparseable(chunk)
    if strict and chunk.unparseable:
      _reject_unparseable(chunk.source, counts, chunks)
    columns, chunk_unseen = encoder.encode(chunk.features, chunk.codes, chunk.source)
    counts.add_unseen(chunk_unseen)
    yield np.stack(columns, axis=1).astype(np.int32, copy=False), chunk.passthrough


def _check_names(spec, passthrough: Sequence[str]) -> None:
  clash = sorted(set(passthrough) & set(output_columns(spec)))
  if clash:
    raise DataError(f'passthrough column(s) {clash} clash with the prediction columns '
                    f'{list(output_columns(spec))}')


def _score_into(out: str, scorer: BatchScorer, spec,
                pieces: Iterator[tuple[np.ndarray, pl.DataFrame]]) -> int:
  """Scores every piece and writes its rows to ``out``; returns the number of rows."""
  names = output_columns(spec)
  writer = _Writer(out)
  rows = 0
  try:
    for x, kept in pieces:
      probs, core = scorer(x)
      values = [probs[:, t] for t in range(spec.num_binary)] + [core]
      frame = pl.DataFrame([pl.Series(n, v) for n, v in zip(names, values)])
      writer.write(kept.hstack(frame) if kept.width else frame)
      rows += x.shape[0]
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return rows


def predict_file(workdir: str, data: str, out: str, *,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 passthrough: Optional[str] = None,
                 strict: bool = False,
                 run: Optional[TrainedRun] = None) -> PredictionSummary:
  """Scores every row of ``data`` with the best checkpoint of ``workdir`` (module docstring).

  Args:
    workdir: a finished training run.
    data: the input: a tabular file, a KuaiRand directory, or a Kaggle directory / file.
    out: the predictions file (Parquet, or CSV when the name ends in ``.csv``).
    chunk_rows: input rows read and encoded at a time (memory is bounded by it).
    passthrough: comma-separated columns to copy; None = ``config.data.passthrough``.
    strict: a numeric cell that is not a number stops the run (DataError) instead of being
      scored as missing and counted.
    run: an already loaded run (skips :func:`htl_jax.serve.run.load_run`).

  Returns:
    A :class:`PredictionSummary`.

  Raises:
    ConfigError: ``out`` is a directory, or its directory is missing or not writable.
    RunError: ``workdir`` holds no finished run.
    DataError: a missing file or column, a bad value, an empty input, or with ``strict`` a
      numeric cell that is not a number.
  """
  start = time.perf_counter()
  check_out(out, workdir=workdir)     # before any work: a bad --out fails at once
  if run is None:                     # the cheap parts first: bad input fails in seconds
    run_files.finished_metrics(workdir)
    config, prep = run_files.load_config(workdir), run_files.load_preprocessing(workdir)
  else:
    config, prep = run.config, run.preprocessing
  source_config = config_for_input(config, data)
  check_out(out, inputs=data_lib.input_files(source_config), workdir=workdir)
  spec = prep.spec
  columns = passthrough_columns(config, passthrough)
  _check_names(spec, columns)
  counts = _Counts()
  chunks = data_lib.read_features(source_config, columns, chunk_rows)
  pieces = _full_batches(_encoded(prep.encoder, chunks, counts, strict),
                         int(config.eval_batch_size))
  first = next(pieces, None)          # bad input fails here, before any output exists
  if first is None:
    raise DataError(f'{data}: no rows to score')
  run = run or load_run(workdir)
  rows = _score_into(out, BatchScorer(run), spec, itertools.chain([first], pieces))
  summary = PredictionSummary(
      rows=rows, seconds=time.perf_counter() - start, unseen=counts.unseen, out=out,
      unparseable={name: found.rows for name, found in counts.unparseable.items()})
  _log_summary(run, summary, counts)
  return summary


def _log_summary(run: TrainedRun, summary: PredictionSummary, counts: _Counts) -> None:
  oov = {k: v for k, v in summary.unseen.items() if v}
  if oov:
    logging.info('values unseen in training, mapped to the OOV id 0 (rows per field): %s',
                 ', '.join(f'{k} {v}' for k, v in oov.items()))
  else:
    logging.info('no value unseen in training')
  if counts.unparseable:
    logging.warning('values that are not numbers, scored as missing (id 0; --strict rejects '
                    'them) (rows per column): %s',
                    ', '.join(f'{k} {v.rows} (e.g. {v.example!r})'
                              for k, v in counts.unparseable.items()))
  logging.info('%d rows scored with %s (best step %d) in %.1f s (%.0f rows/s) -> %s',
               summary.rows, run.workdir, run.best_step, summary.seconds,
               summary.rows_per_second, summary.out)

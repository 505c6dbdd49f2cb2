"""Feeding the training steps: which rows each step trains on, and how they reach the devices.

Every epoch is a seeded shuffle of the training split (``config.seed`` and the epoch
number, :func:`htl_jax.data.pipeline.batch_rows`), cut into global batches; process ``p``
feeds its part of each, split over its local devices. Two ways, the same run (tested):

- ``feed='device'``: the training split stays on every device
  (:func:`resident_split`); each epoch's row numbers go there once (:func:`epoch_rows`) and
  each step gathers its own batch (:func:`htl_jax.train.step.train_step_on_rows`), so
  nothing travels per step;
- ``feed='host'``: each batch is gathered on the host (:func:`train_batches`) and put on the
  devices two steps ahead.

``feed='auto'`` picks ``device`` up to :data:`RESIDENT_SPLIT_LIMIT` bytes of training arrays.
Every step runs in :func:`htl_jax.train.step.train_steps`, several to a dispatch
(:func:`schedule`: as many as fit between two boundaries, up to ``steps_per_dispatch``), so
the host's work per step is a fraction of one call; :class:`Feeder` pairs each dispatch with
its batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import numpy as np

from htl_jax.data import pipeline
from htl_jax.data.schema import HybridData, Split
from htl_jax.train import parallel

# feed='auto' keeps the training split on the devices up to this many bytes.
RESIDENT_SPLIT_LIMIT = 1 << 30


def resolve_feed(config, train: Split) -> str:
  """``config.feed`` with 'auto' resolved: 'device' when the training split's arrays fit in
  :data:`RESIDENT_SPLIT_LIMIT` bytes, else 'host'."""
  if config.feed != 'auto':
    return config.feed
  size = train.x.nbytes + train.y.nbytes + train.core.nbytes
  return 'device' if size <= RESIDENT_SPLIT_LIMIT else 'host'


def steps_per_epoch(data: HybridData, config) -> int:
  """Full global batches in one epoch of the training split (the last partial one dropped)."""
  return pipeline.num_batches(len(data.train), config.batch_size, drop_remainder=True)


def train_batches(data: HybridData, config, start_step: int) -> Iterator[dict]:
  """Endless epochs of shuffled training batches (this process's part), from ``start_step``."""
  epoch, skip = divmod(start_step, steps_per_epoch(data, config))
  while True:
    for i, batch in enumerate(pipeline.batches(data.train, config.batch_size, shuffle=True,
                                               seed=config.seed, epoch=epoch,
                                               drop_remainder=True,
                                               part=parallel.process_part())):
      if i >= skip:
        yield batch
    epoch, skip = epoch + 1, 0


def epoch_rows(data: HybridData, config, epoch: int) -> np.ndarray:
  """``[local devices, steps per epoch, B / devices]``: the rows of every batch of an epoch
  that each local device trains on (the same rows :func:`train_batches` gathers)."""
  rows = np.stack([index for index, _ in pipeline.batch_rows(
      len(data.train), config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
      drop_remainder=True, part=parallel.process_part())])
  n = parallel.local_device_count()
  return rows.reshape(rows.shape[0], n, -1).transpose(1, 0, 2)


def resident_split(split: Split) -> dict[str, np.ndarray]:
  """The arrays of a training split that ``feed='device'`` keeps on every device."""
  return {'x': split.x, 'y': split.y, 'core': split.core}


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """One call of the compiled training program: steps ``first + 1 .. first + num_steps``.

  ``diagnosed``: the program takes Fig. 5's per-task diagnostics (a run without a gradient
  process takes them at evaluations only, or at every step with
  ``grad_diagnostics='every_step'``).
  """

  first: int
  num_steps: int
  diagnosed: bool

  @property
  def last(self) -> int:
    """The step count after this dispatch."""
    return self.first + self.num_steps


def is_eval_step(step: int, config, total_steps: int) -> bool:
  """Whether the run evaluates after ``step`` steps."""
  return step % config.eval_every == 0 or step == total_steps


def schedule(config, start: int, total_steps: int, per_epoch: int, max_steps: int,
             diagnose_at_eval_only: bool) -> Iterator[Dispatch]:
  """The dispatches from ``start`` to ``total_steps``: as many steps as possible (up to
  ``max_steps``) between two boundaries (a log, evaluation or checkpoint step, an epoch's
  end). With ``diagnose_at_eval_only`` an evaluation's step is a dispatch of its own."""
  step = start
  while step < total_steps:
    def next_multiple(every: int) -> int:
      return (step // every + 1) * every
    boundary = min(next_multiple(config.log_every), next_multiple(config.eval_every),
                   next_multiple(config.checkpoint_every), next_multiple(per_epoch),
                   total_steps)
    if diagnose_at_eval_only and is_eval_step(boundary, config, total_steps):
      if boundary - step == 1:
        yield Dispatch(step, 1, True)
        step += 1
        continue
      boundary -= 1
    count = min(max_steps, boundary - step)
    yield Dispatch(step, count, not diagnose_at_eval_only)
    step += count


class Feeder:
  """The run's dispatches with their batches: ``for dispatch, source in feeder``.

  ``source`` is what :func:`htl_jax.train.step.train_steps` reads: ``(epoch_rows,
  resident)`` on the devices (``feed='device'``), or a block of ``max_steps`` batches
  stacked per device, put on the devices two dispatches ahead (``feed='host'``; a short
  block is padded with its last batch, which no step reads).

  Args:
    data: the prepared dataset (its training split is fed).
    config: the run's config (``feed``, ``batch_size``, ``seed``, the boundaries).
    dispatches: the run's :func:`schedule`.
    max_steps: the most steps of a dispatch.
  """

  def __init__(self, data: HybridData, config, dispatches: list[Dispatch], max_steps: int):
    self.mode = resolve_feed(config, data.train)
    self._data, self._config = data, config
    self._dispatches, self._max_steps = dispatches, max_steps
    self._per_epoch = steps_per_epoch(data, config)
    if self.mode == 'device':
      self._resident = parallel.replicate(resident_split(data.train))
      self._rows: Optional[tuple[int, Any]] = None     # (epoch, its rows on the devices)

  @property
  def has_dispatches(self) -> bool:
    return bool(self._dispatches)

  def example_source(self) -> Any:
    """A source of the shapes every dispatch has (to compile the program ahead)."""
    if self.mode == 'host':
      return next(self._host_blocks())
    return self._rows_of(0), self._resident

  def _rows_of(self, epoch: int) -> Any:
    """:func:`epoch_rows` of ``epoch`` on the devices, kept until the next epoch's."""
    if self._rows is None or self._rows[0] != epoch:
      self._rows = (epoch, parallel.put_sharded(epoch_rows(self._data, self._config, epoch)))
    return self._rows[1]

  def __iter__(self) -> Iterator[tuple[Dispatch, Any]]:
    if self.mode == 'host':
      blocks = parallel.prefetch(self._host_blocks(), already_sharded=True)
      yield from zip(self._dispatches, blocks)
      return
    for dispatch in self._dispatches:
      yield dispatch, (self._rows_of(dispatch.first // self._per_epoch), self._resident)

  def _host_blocks(self) -> Iterator[dict[str, np.ndarray]]:
    """``[local devices, max_steps, B / devices, ...]`` batches of every dispatch."""
    if not self._dispatches:
      return
    batches = train_batches(self._data, self._config, self._dispatches[0].first)
    for dispatch in self._dispatches:
      taken = [parallel.shard(next(batches)) for _ in range(dispatch.num_steps)]
      taken += taken[-1:] * (self._max_steps - len(taken))
      yield {k: np.stack([b[k] for b in taken], axis=1) for k in taken[0]}

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
:class:`Feeder` hides the choice from the loop: ``feeder(state, step, diagnosed)`` runs one
training step.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from htl_jax.data import pipeline
from htl_jax.data.schema import HybridData, Split
from htl_jax.train import parallel
from htl_jax.train.step import Steps

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


class Feeder:
  """``feeder(state, step, diagnosed) -> (state, metrics)``: one training step, fed.

  Args:
    data: the prepared dataset (its training split is fed).
    config: the run's config (``feed``, ``batch_size``, ``seed``).
    steps: the compiled steps of the run's setup.
    start_step: the first step to feed (a resumed run continues its epoch).
  """

  def __init__(self, data: HybridData, config, steps: Steps, start_step: int):
    self.mode = resolve_feed(config, data.train)
    self._data, self._config, self._steps = data, config, steps
    self._per_epoch = steps_per_epoch(data, config)
    if self.mode == 'host':
      self._batches = parallel.prefetch(train_batches(data, config, start_step))
    else:
      self._resident = parallel.put_replicated(resident_split(data.train))
      self._epoch, self._rows = None, None

  def __call__(self, state: Any, step: int, diagnosed: bool) -> tuple[Any, dict]:
    steps = self._steps
    if self.mode == 'host':
      fn = steps.train_diagnosed if diagnosed else steps.train
      return fn(state, next(self._batches))
    epoch = step // self._per_epoch
    if epoch != self._epoch:
      self._epoch = epoch
      self._rows = parallel.put_sharded(epoch_rows(self._data, self._config, epoch))
    fn = steps.train_on_rows_diagnosed if diagnosed else steps.train_on_rows
    return fn(state, self._rows, self._resident)

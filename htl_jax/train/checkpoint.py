"""Orbax checkpoints: the latest state for resuming, and the best by validation metric.

Two ``CheckpointManager``s under ``<workdir>/checkpoints``:

- ``latest/``: saved periodically; a restarted run resumes from its newest step and
  continues exactly as if it had never stopped (state, temperature, PRNG key, optimizer and
  gradient-process states, and the loop's early-stopping counters are all saved);
- ``best/``: the state with the best validation value of the core task's metric, used for
  the final test evaluation.

Saves happen only after the loop has checked that every step since the last save was
finite, so a non-finite loss never overwrites a good checkpoint.

:func:`restore_serving` reads only the parameters and the temperature of ``best/`` (orbax's
partial restore), for prediction and export.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from htl_jax.train import run_files


class Checkpoints:
  """The ``latest`` and ``best`` checkpoint managers of one workdir."""

  def __init__(self, workdir: str, best_mode: str, keep_latest: int = 2):
    root = os.path.abspath(os.path.join(workdir, run_files.CHECKPOINTS))
    self.latest = ocp.CheckpointManager(
        os.path.join(root, 'latest'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True))
    self.best = ocp.CheckpointManager(
        os.path.join(root, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m['value'], best_mode=best_mode))

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, state: Any, loop: dict,
            metrics: Optional[dict] = None) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               loop=ocp.args.JsonSave(loop)),
                 metrics=metrics, force=True)
    manager.wait_until_finished()

  def save_latest(self, step: int, state: Any, loop: dict) -> None:
    if self.latest.latest_step() != step:
      self._save(self.latest, step, state, loop)

  def save_best(self, step: int, state: Any, loop: dict, value: float) -> None:
    if self.best.latest_step() != step:
      self._save(self.best, step, state, loop, {'value': float(value)})

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(like), loop=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['loop'])

  def restore_latest(self, like: Any) -> Optional[tuple[Any, dict]]:
    step = self.latest.latest_step()
    return None if step is None else self._restore(self.latest, step, like)

  def restore_best(self, like: Any) -> Optional[tuple[Any, dict]]:
    step = self.best.best_step()
    return None if step is None else self._restore(self.best, step, like)

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_serving(workdir: str, like: Any) -> Optional[tuple[Any, int]]:
  """The best checkpoint's parameters and temperature, and its step; None without one.

  Args:
    workdir: a training run's workdir.
    like: the abstract :class:`htl_jax.train.state.ServingState` (shapes and dtypes), a
      subset of the saved train state: only its arrays are read.
  """
  directory = os.path.abspath(os.path.join(workdir, run_files.CHECKPOINTS, 'best'))
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      return None
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          like)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return restored['state'], int(step)
  finally:
    manager.close()

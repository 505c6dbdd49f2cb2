"""Orbax checkpoints: the latest state for resuming, and the best by validation metric.

Two ``CheckpointManager``s under ``<workdir>/checkpoints``:

- ``latest/``: saved periodically (at evaluation and ``checkpoint_every`` steps, at most once
  every ``checkpoint_seconds``: orbax's ``ContinuousCheckpointingPolicy`` decides, on the
  primary process for all of them; always on SIGTERM / SIGINT and at the end); a restarted run
  resumes from its newest step and continues exactly as if it had never stopped (state,
  temperature, PRNG key, optimizer and gradient-process states, and the loop's
  early-stopping counters are all saved);
- ``best/``: the states with the best two validation values of the model-selection metric;
  the best one is used for the final test evaluation, prediction and export. With
  ``checkpoint_seconds`` > 0 a new best state waits in host memory and is written just
  before the next ``latest`` one, so that the two on disk always agree.

Saves happen only after the loop has checked that every step since the last save was
finite, so a non-finite loss never overwrites a good checkpoint.

:func:`restore_serving` reads only the parameters and the temperature of ``best/`` (orbax's
partial restore), for prediction and export.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy

from htl_jax.errors import RunError, first_line
from htl_jax import run_files


class Checkpoints:
  """The ``latest`` and ``best`` checkpoint managers of one workdir.

  A checkpoint that does not read completely (a disk that filled, a partial copy of a
  workdir) is moved to ``checkpoints/damaged/`` with one warning, never deleted, and the
  newest readable one is used; one written by another config (other shapes) is an error.
  A save that fails (no space left) is one :class:`htl_jax.errors.RunError`; orbax writes a
  checkpoint under a temporary name, so the previous one stays readable.
  """

  def __init__(self, workdir: str, best_mode: str, keep_latest: int = 2,
               min_seconds: float = 0.0):
    """``min_seconds``: the least time between two periodic writes (0: every :meth:`due`
    step writes, and every best state is written at once)."""
    self.min_seconds = float(min_seconds)
    self._pending_best: Optional[tuple[int, Any, dict, float]] = None
    self._best_in_memory: Optional[tuple[Any, dict]] = None
    self.root = os.path.abspath(os.path.join(workdir, run_files.CHECKPOINTS))
    policy = (save_decision_policy.ContinuousCheckpointingPolicy(
        minimum_interval_secs=self.min_seconds) if self.min_seconds > 0 else None)
    self.latest = _manager(os.path.join(self.root, 'latest'), ocp.StandardCheckpointHandler(),
                           ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True,
                                                        save_decision_policy=policy))
    # Two best checkpoints: the second one stands in if the best is damaged.
    self.best = _manager(os.path.join(self.root, 'best'), ocp.StandardCheckpointHandler(),
                         ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                      best_fn=lambda m: m['value'],
                                                      best_mode=best_mode))

  def _save(self, manager: ocp.CheckpointManager, step: int, state: Any, loop: dict,
            metrics: Optional[dict] = None) -> None:
    try:
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 loop=ocp.args.JsonSave(loop)),
                   metrics=metrics, force=True)
      manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as error:
      previous = [s for s in manager.all_steps() if s != step]
      raise RunError(
          f'cannot save the checkpoint of step {step} in {manager.directory}: '
          f'{first_line(error)[:300]}; the previous one (step '
          f'{max(previous) if previous else "none"}) is intact') from None

  def due(self, step: int) -> bool:
    """Whether a periodic ``latest`` save of ``step`` should write (orbax's policy: no
    newer one on disk, ``min_seconds`` since the last; the same answer in every process)."""
    return self.latest.should_save(step)

  def save_latest(self, step: int, state: Any, loop: dict) -> None:
    """Writes the waiting best state, then ``state`` as the latest (whatever the policy:
    the caller asked :meth:`due`, or it is the last or a stop's save)."""
    self.flush_best()
    if self.latest.latest_step() != step:
      self._save(self.latest, step, state, loop)

  def save_best(self, step: int, state: Any, loop: dict, value: float) -> None:
    """A new best (host) state: written now, or with the next latest one (``min_seconds``)."""
    if self.min_seconds <= 0:
      self._write_best(step, state, loop, value)
      return
    self._pending_best = (step, state, loop, value)
    self._best_in_memory = (state, loop)

  def flush_best(self) -> None:
    if self._pending_best is not None:
      self._write_best(*self._pending_best)
      self._pending_best = None

  def _write_best(self, step: int, state: Any, loop: dict, value: float) -> None:
    if self.best.latest_step() != step:
      self._save(self.best, step, state, loop, {'value': float(value)})

  def restore_latest(self, like: Any) -> Optional[tuple[Any, dict]]:
    """The newest readable ``latest`` checkpoint (state, loop JSON), or None."""
    return self._restore_newest(self.latest, sorted(self.latest.all_steps()), like)

  def restore_best(self, like: Any) -> Optional[tuple[Any, dict]]:
    """The best readable ``best`` checkpoint (state, loop JSON), or None; this process's
    best state itself when it kept one in memory (``min_seconds`` > 0)."""
    if self._best_in_memory is not None:
      return self._best_in_memory
    best = self.best.best_step()
    steps = sorted(self.best.all_steps(), key=lambda s: (s == best, s))   # the best last
    return self._restore_newest(self.best, steps, like)

  @staticmethod
  def _restore_newest(manager: ocp.CheckpointManager, steps: list[int], like: Any
                      ) -> Optional[tuple[Any, dict]]:
    """The last of ``steps`` that reads completely (state, loop JSON), or None."""
    found = _last_readable(manager, steps, like, ocp.args.Composite(
        state=ocp.args.StandardRestore(like), loop=ocp.args.JsonRestore()))
    return None if found is None else (found[0]['state'], dict(found[0]['loop']))

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _manager(directory: str, state_handler: Any,
             options: Optional[ocp.CheckpointManagerOptions] = None) -> ocp.CheckpointManager:
  """A manager of ``state`` and ``loop`` items (their handlers known, so that metadata and
  restores need no earlier save)."""
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': state_handler, 'loop': ocp.JsonCheckpointHandler()})


def _check_shapes(manager: ocp.CheckpointManager, step: int, like: Any) -> None:
  """RunError when the checkpoint's arrays have other shapes than ``like``'s (another
  config in the same workdir); unreadable metadata is left to the restore."""
  try:
    stored = manager.item_metadata(step)['state']
    stored = getattr(stored, 'tree', stored)
    shapes = {jax.tree_util.keystr(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(stored)
              if hasattr(leaf, 'shape')}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return                     # unreadable metadata: the restore says what is wrong
  for path, leaf in jax.tree_util.tree_leaves_with_path(like):
    key = jax.tree_util.keystr(path)
    if key in shapes and shapes[key] != tuple(leaf.shape):
      raise RunError(
          f'{manager.directory}: the checkpoint of step {step} was written by another '
          f'config ({key} has shape {shapes[key]}, this config needs {tuple(leaf.shape)}); '
          'resume with the config of that run, or give this one another --workdir')


def _last_readable(manager: ocp.CheckpointManager, steps: list[int], like: Any, args: Any,
                   move_damaged: bool = True) -> Optional[tuple[Any, int]]:
  """The items of the last of ``steps`` that reads completely, restored with ``args``, and
  its step; the damaged ones are set aside on the way (``move_damaged``; a reader that
  must not change the workdir only skips them, with a warning). None without steps.

  Raises:
    RunError: ``like``'s shapes are not the checkpoint's, or no step reads completely.
  """
  for step in reversed(steps):
    _check_shapes(manager, step, like)
    try:
      return manager.restore(step, args=args), int(step)
    except Exception as error:  # pylint: disable=broad-except   # any damage orbax meets
      if move_damaged:
        set_aside(manager, step, error)
      else:
        logging.warning('checkpoint step %d in %s does not read (%s); using the one before',
                        step, manager.directory, first_line(error)[:300])
  if steps:
    directory = os.path.abspath(str(manager.directory))
    where = (f'the damaged ones were moved to '
             f'{os.path.join(os.path.dirname(directory), "damaged")}' if move_damaged
             else 'nothing was changed')
    raise RunError(f'{directory}: no checkpoint reads completely ({where})')
  return None


def set_aside(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  """Moves a checkpoint that does not read to ``checkpoints/damaged/``; returns its path."""
  directory = os.path.abspath(str(manager.directory))
  target = os.path.join(os.path.dirname(directory), 'damaged',
                        f'{os.path.basename(directory)}-{step}')
  os.makedirs(os.path.dirname(target), exist_ok=True)
  suffix = 0
  while os.path.exists(target + (f'.{suffix}' if suffix else '')):
    suffix += 1
  target += f'.{suffix}' if suffix else ''
  os.replace(os.path.join(directory, str(step)), target)
  manager.reload()
  logging.warning('checkpoint step %d in %s does not read (%s); moved to %s, using the '
                  'newest readable one', step, directory, first_line(error)[:300], target)
  return target


def restore_serving(workdir: str, like: Any) -> Optional[tuple[Any, int]]:
  """The best checkpoint's parameters and temperature, and its step; None without one.

  A damaged best checkpoint is skipped and the one before it used (with a warning); nothing
  in the workdir is changed (prediction and export only read it).

  Args:
    workdir: a training run's workdir.
    like: the abstract :class:`htl_jax.train.state.ServingState` (shapes and dtypes), a
      subset of the saved train state: only its arrays are read.
  """
  directory = os.path.abspath(os.path.join(workdir, run_files.CHECKPOINTS, 'best'))
  if not os.path.isdir(directory):
    return None
  manager = _manager(directory, ocp.PyTreeCheckpointHandler(),
                     ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          like)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    # Each save there was a new best: the newest first.
    found = _last_readable(manager, sorted(manager.all_steps()), like, args,
                           move_damaged=False)
    return None if found is None else (found[0]['state'], found[1])
  finally:
    manager.close()

"""A multi-process ``jax.distributed`` run as ONE worker of a study (docs/design.md).

The reproduction and tuning entry points share their work through Optuna: each worker takes
a cell or trial and trains it. When the worker is several processes started with
``jax.distributed`` (several hosts, see ``htl_jax.runtime.distributed``), every one of them
must train the same run at the same time, since each training step is a collective over all
of them. So only the primary process talks to Optuna, and it tells the others (the
followers) what to do, in lockstep (each message is a broadcast from process 0,
:func:`htl_jax.train.parallel.broadcast_json`):

- :func:`announce` ``{'run': work}``: train this (a cell, or a trial's hyperparameters);
- :func:`share`: after an evaluation, the primary's pruning decision, so that every process
  stops a pruned trial at the same step;
- :func:`keep_waiting`: the primary waits for runs of other workers (sent every poll, so
  no collective stays open for long);
- :func:`finish`: no work is left.

The followers run :func:`follow`. With one process every function here is a no-op (or
returns its argument), so single-process code paths are unchanged. The workdir must be on a
file system that every process sees, as for ``experiments.main``'s checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable

from htl_jax.train import parallel


def is_group() -> bool:
  """True when this worker is several processes."""
  return parallel.process_count() > 1


def is_follower() -> bool:
  """True in a process that does what the primary process of its run announces."""
  return is_group() and not parallel.is_primary()


def announce(work: dict[str, Any]) -> None:
  """Primary: the followers start ``work`` (then train it together with the primary)."""
  if is_group():
    parallel.broadcast_json({'run': work})


def keep_waiting() -> None:
  """Primary: nothing to run yet; the followers keep waiting."""
  if is_group():
    parallel.broadcast_json({'wait': True})


def finish() -> None:
  """Primary: no work is left; the followers return from :func:`follow`."""
  if is_group():
    parallel.broadcast_json({'stop': True})


def share(value: Any) -> Any:
  """Every process: the primary's ``value`` (the followers pass anything, e.g. None)."""
  return parallel.broadcast_json(value) if is_group() else value


def follow(run: Callable[[dict[str, Any]], None]) -> None:
  """Follower: ``run(work)`` for every announced work, until the primary finishes."""
  while True:
    message = parallel.broadcast_json(None)
    if 'stop' in message:
      return
    if 'run' in message:
      run(message['run'])

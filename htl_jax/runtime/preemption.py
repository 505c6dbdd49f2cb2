"""Preemption: SIGTERM / SIGINT stop a run at a step boundary, after a checkpoint.

SLURM, Kubernetes and spot machines send SIGTERM some time before they kill a job; Ctrl-C
sends SIGINT. The commands run inside :func:`watch` (a library function never installs a
signal handler); while it is active, the first of either only raises a flag: the
training loop finishes the step it is on, saves a checkpoint, writes its files and stops
with :class:`htl_jax.errors.PreemptedError` (exit code 75), and running the same command
again resumes the run exactly. A second signal acts as usual (Ctrl-C twice quits at once).

With several processes (``jax.distributed``) every process must save the SAME step. JAX's
preemption service catches SIGTERM in each process and agrees on the step
(:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`, asked after every
step), so there this module leaves the signals alone: SIGTERM is JAX's, and a SIGINT that
reached one process only could not stop the others at the same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils

_requested: list[str] = []


def _handler(signum, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  _requested.append(name)
  signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else
                signal.default_int_handler)      # a second one acts as usual
  logging.warning('%s received: stopping after the current step, with a checkpoint', name)


def install() -> bool:
  """Turns SIGTERM / SIGINT into a stop request for the rest of the process (a command's
  start, after ``jax.distributed``). False where it leaves them alone: not the main thread,
  or several processes (JAX's preemption service has SIGTERM there)."""
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    return False
  _requested.clear()
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _handler)
  return True


@contextlib.contextmanager
def watch() -> Iterator[None]:
  """Turns SIGTERM / SIGINT into a stop request for the block (main thread only)."""
  if (threading.current_thread() is not threading.main_thread()
      or jax.process_count() > 1):
    yield
    return
  signals = (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.signal(s, _handler) for s in signals}
  _requested.clear()
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _requested.clear()


def stop_requested(step: int) -> str:
  """The signal's name once the run must stop after ``step`` ('' to go on).

  With several processes, call it from every process after every step: all of them then
  see the request at the same step.
  """
  if _requested:
    return _requested[0]
  if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
    return 'SIGTERM'
  return ''


TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


def _exit_on_sigterm(signum, frame) -> None:
  del frame
  raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
  """SIGTERM ends a command that does not train (prediction, export) as an exception, exit
  code 143, so its ``finally`` blocks remove what it had half written (its temporary files)
  instead of the process vanishing mid-write. Commands that train replace this with
  :func:`install` (a checkpoint first). Main thread only."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

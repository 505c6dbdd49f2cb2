"""Silences what an abandoned orbax read or write prints after the failure is reported.

When one array of a checkpoint fails to read or write (a full disk, a damaged file), orbax
gives up on the others; their TensorStore callbacks still fire, on the event loop orbax has
closed meanwhile, and each ``RuntimeError: Event loop is closed`` is printed with its
traceback (through ``sys.excepthook`` from TensorStore's threads, or as unraisable), and
asyncio logs every abandoned write task ("Task exception was never retrieved"): tens of
tracebacks around the one line that says what happened. It is orbax's to fix (it should
cancel its pending TensorStore futures before closing its loop; to be reported upstream
with the reproduction in tests/test_faults.py). Until then the commands call
:func:`install`, which drops exactly those and passes every other exception and log record
on; library code never calls it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional


def _is_closed_loop_noise(error: Optional[BaseException]) -> bool:
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


class _AbandonedOrbaxTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's abandoned writes."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ('exception was never retrieved' in text and 'orbax' in text)


def install() -> None:
  """Drops the noise above for the rest of the process (once; later calls do nothing)."""
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook
  if getattr(previous_excepthook, 'drops_closed_loop_noise', False):
    return

  def excepthook(kind, error, traceback) -> None:
    if not _is_closed_loop_noise(error):
      previous_excepthook(kind, error, traceback)

  def unraisablehook(unraisable: Any) -> None:
    if not _is_closed_loop_noise(unraisable.exc_value):
      previous_unraisablehook(unraisable)

  excepthook.drops_closed_loop_noise = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  logging.getLogger('asyncio').addFilter(_AbandonedOrbaxTasks())

"""What ``htl-reproduce`` and ``htl-tune`` show while they work: one line on stdout per run
they start, with the runs done of all, what runs, the time so far and an ETA.

A *run* is one training run: a tuning trial of ``trial_seeds`` seeds is that many runs, a
seed of the table one. Runs finished before this command started (a resumed study, a seed's
``metrics.json``) count as done at once and leave the ETA alone: it is this process's time
per run so far times the runs left (with several workers sharing a study, each one's ETA is
for the whole, and pessimistic). The library's logs go to the workdir's log file (the
commands' ``--verbose`` keeps them on stderr), so these lines are what the terminal shows.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def duration(seconds: float) -> str:
  """``3h02m``, ``4m05s``, ``12s``."""
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


class Progress:
  """Runs done of ``total``, and the lines that say so.

  Args:
    total: the runs the command will have done at its end (more may be added).
    stream: where the lines go (None: nowhere; the library's default).
    clock: seconds (tests pass their own).
  """

  def __init__(self, total: int = 0, stream: Optional[TextIO] = None,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.done, self.stream, self.clock = int(total), 0, stream, clock
    self.started_at = clock()
    self.done_here = 0            # finished by this process (the ETA's rate)

  @classmethod
  def to_stdout(cls) -> 'Progress':
    return cls(stream=sys.stdout)

  def add(self, runs: int) -> None:
    """``runs`` more runs to do (a study whose size is known only once it is open)."""
    self.total += int(runs)

  def skip(self, runs: int) -> None:
    """``runs`` of the total were done before this command (they are not timed)."""
    self.done += int(runs)

  def finished(self, runs: int = 1) -> None:
    """``runs`` runs finished here."""
    self.done += int(runs)
    self.done_here += int(runs)

  def eta(self) -> Optional[float]:
    """Seconds left at this process's pace so far (None before its first run ends)."""
    if self.done_here == 0:
      return None
    per_run = (self.clock() - self.started_at) / self.done_here
    return per_run * max(self.total - self.done, 0)

  def line(self, what: str) -> str:
    eta = self.eta()
    width = len(str(self.total))
    share = 100.0 * self.done / self.total if self.total else 100.0
    return (f'[{self.done:>{width}}/{self.total} runs {share:3.0f}%] {what} · '
            f'{duration(self.clock() - self.started_at)} so far · ETA '
            f'{duration(eta) if eta is not None else "after the first run"}')

  def say(self, what: str) -> None:
    """One line (``what`` runs now, or happened) with the counts and the ETA."""
    if self.stream is not None:
      print(self.line(what), file=self.stream, flush=True)

  def summary(self, text: str) -> None:
    """The last line: what was made and where (no counts)."""
    if self.stream is not None:
      print(text, file=self.stream, flush=True)

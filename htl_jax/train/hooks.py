"""The periodic actions of the training loop, each a small object tested on its own.

The loop (:mod:`htl_jax.train.loop`) runs the compiled steps one dispatch at a time; after
each dispatch these act at their steps (flax's examples hand reporting and checkpointing to
periodic actions the same way):

- :class:`Progress` (every ``log_every`` steps, at evaluations and before a stop): reads
  the dispatches' metrics from the devices in one transfer, stops on the first non-finite
  step (:class:`htl_jax.errors.NonFiniteError`), adds Fig. 5's diagnostics to the
  :class:`DiagnosticsWindow` and reports loss, temperature and examples/s;
- :class:`EarlyStopping` (at evaluations): the selection rule's best value and step, and
  whether ``patience`` evaluations passed without improvement;
- :func:`preemption_signal` (every dispatch): whether SIGTERM / SIGINT asked the run to stop
  (the loop then saves a checkpoint and raises :class:`htl_jax.errors.PreemptedError`);
- checkpoint cadence: :meth:`htl_jax.train.checkpoint.Checkpoints.due`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import numpy as np

from htl_jax.errors import NonFiniteError
from htl_jax.optim import TaskDiagnostics
from htl_jax.runtime import preemption
from htl_jax.selection import Selection


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """The loop's model-selection state, saved with every checkpoint.

  The best value (and its checkpoint) follows every improvement; the patience counts the
  evaluations since the last SIGNIFICANT one, an improvement by more than
  ``min_improvement`` (relative; :meth:`htl_jax.selection.Selection.significant`) over the
  value that last reset it, as keras' and flax's ``min_delta`` do. So a run that creeps (a
  learning rate of 1e-5) stops instead of running to its epoch cap, while its best
  checkpoint is still its best. ``min_improvement=0`` counts every improvement. Ours has a
  direction (Gini and Delta_m are maximized), and lets an undefined value neither improve
  nor count.

  Attributes:
    best_value: the best validation value so far (None before the first defined one).
    best_step: the step of that value's checkpoint.
    bad_evals: evaluations since the last significant improvement.
    stopped: True once ``bad_evals`` reached the patience.
    train_seconds: training time so far (evaluations excluded), across restarts.
    anchor: the value of the last significant improvement.
  """

  best_value: Optional[float] = None
  best_step: int = 0
  bad_evals: int = 0
  stopped: bool = False
  train_seconds: float = 0.0
  anchor: Optional[float] = None

  def update(self, step: int, value: Optional[float], rule: Selection, patience: int,
             min_improvement: float = 0.0) -> 'EarlyStopping':
    """After an evaluation: a new best and / or one more bad evaluation."""
    if value is None:          # an undefined value neither improves nor counts
      return self
    new = self
    if rule.better(value, self.best_value):
      new = dataclasses.replace(new, best_value=float(value), best_step=step)
    if rule.significant(value, self.anchor, min_improvement):
      return dataclasses.replace(new, anchor=float(value), bad_evals=0)
    bad = self.bad_evals + 1
    return dataclasses.replace(new, bad_evals=bad, stopped=bad >= patience)

  def trained(self, seconds: float) -> 'EarlyStopping':
    """``seconds`` more of training time."""
    return dataclasses.replace(self, train_seconds=self.train_seconds + seconds)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'EarlyStopping':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class DiagnosticsWindow:
  """Fig. 5's per-task diagnostics summed over the steps since the last evaluation."""

  sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  steps: int = 0

  def add(self, diagnostics: Any, num_steps: int) -> None:
    """Adds the first ``num_steps`` steps of a dispatch's :class:`TaskDiagnostics` (host
    arrays ``[devices, max_steps, K]``; a None field was not recorded)."""
    for name, values in diagnostics._asdict().items():
      if values is not None:
        values = np.asarray(values[0][:num_steps], np.float64)
        self.sums[name] = self.sums.get(name, 0.0) + values.sum(axis=0)
    self.steps += num_steps

  def record(self, tasks) -> dict[str, dict[str, float]]:
    """Per task, the window's means (``metrics.jsonl``'s ``grad``: the
    :class:`TaskDiagnostics` field names); empty without steps."""
    if not self.steps:
      return {}
    return {t: {name: float(v[i] / self.steps) for name, v in self.sums.items()}
            for i, t in enumerate(tasks)}


class Progress:
  """Reads the dispatches' metrics in one host transfer and reports the training progress.

  Args:
    writer: the run's :class:`htl_jax.train.writers.RunWriter`.
    batch_size: global examples a step (for examples/s).
  """

  def __init__(self, writer: Any, batch_size: int):
    self.writer, self.batch_size = writer, batch_size
    self.pending: list[tuple[Any, dict]] = []
    self.window = DiagnosticsWindow()
    self.last: dict[str, Any] = {}
    self.examples_per_s = 0.0
    self._start, self._steps = time.perf_counter(), 0

  def add(self, dispatch: Any, metrics: dict) -> None:
    """A dispatch's (device) metrics, read at the next :meth:`report`."""
    self.pending.append((dispatch, metrics))
    self._steps += dispatch.num_steps

  def drain(self, on_non_finite: Any) -> None:
    """Reads the pending metrics: raise on the first non-finite step (after
    ``on_non_finite()``), add the diagnostics to the window, keep the last step's loss."""
    if not self.pending:
      return
    host = jax.device_get([m for _, m in self.pending])
    for (dispatch, _), m in zip(self.pending, host):
      finite = np.asarray(m['finite'])[:, :dispatch.num_steps]
      if not bool(np.all(finite)):
        bad = dispatch.first + 1 + int(np.argmin(np.all(finite, axis=0)))
        raise NonFiniteError(f'non-finite loss or gradient at step {bad}; training '
                             f'stopped, last good checkpoint: {on_non_finite()}')
      if dispatch.diagnosed:
        self.window.add(m['diagnostics'], dispatch.num_steps)
    dispatch, m = self.pending[-1][0], host[-1]
    i = dispatch.num_steps - 1
    self.last = {'loss': float(m['loss'][0][i]), 'tau': float(m['tau'][0][i]),
                 'task_losses': [float(v) for v in m['task_losses'][0][i]]}
    self.pending = []

  def report(self, step: int, on_non_finite: Any) -> None:
    """:meth:`drain`, then the progress bar or log line and its TensorBoard scalars."""
    self.drain(on_non_finite)
    elapsed = time.perf_counter() - self._start
    self.examples_per_s = self._steps * self.batch_size / max(elapsed, 1e-9)
    self.writer.progress(step, self.last['loss'], self.last['tau'], self.examples_per_s)
    self._start, self._steps = time.perf_counter(), 0

  def restart_timer(self) -> None:
    """Evaluation time is not training time."""
    self._start = time.perf_counter()

  def take_window(self) -> DiagnosticsWindow:
    """The window since the last evaluation; a new one starts."""
    window, self.window = self.window, DiagnosticsWindow()
    return window


def preemption_signal(step: int) -> str:
  """The signal's name once the run must stop after ``step`` ('' to go on)."""
  return preemption.stop_requested(step)


__all__ = ['DiagnosticsWindow', 'EarlyStopping', 'Progress', 'TaskDiagnostics',
           'preemption_signal']

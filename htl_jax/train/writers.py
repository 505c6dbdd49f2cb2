"""What a run writes while it trains: ``metrics.jsonl``, TensorBoard events and progress.

- :class:`RunWriter` writes one ``metrics.jsonl`` line per evaluation (truncated to the
  resumed step on restart, so a resumed run writes no duplicates), the same values as
  TensorBoard scalars (``tensorboardX``, no TensorFlow; event files in the workdir next to
  ``metrics.jsonl``), and progress: a ``tqdm`` bar with examples/s and ETA when stderr is a
  terminal, plain log lines every ``log_every`` steps otherwise.
- at the end of a run, :meth:`RunWriter.hparams` writes the config next to the final
  metrics for TensorBoard's HParams tab (one session per workdir, in its own event files),
  so the runs of a tuning study or a reproduction can be compared there.
- :func:`defined_metrics`: metrics as valid JSON: an undefined value (one class in a split,
  a constant core) becomes ``None`` with one warning naming the task, split and reason.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

from absl import logging
import tensorboardX
from tensorboardX import summary as tb_summary
import tqdm

# Why a metric can be undefined, by metric name (htl_jax.metrics returns NaN for these).
_REASONS = {
    'auc': 'the split has one class only',
    'spearman': 'the core target or its prediction is constant in the split',
    'gini': 'the core target sums to zero in the split',
    'nrmse': 'the core target is constant in the split (std 0)',
    'nmae': 'the core target has mean 0 in the split',
}


def defined_metrics(metrics: dict[str, dict[str, float]], split: str,
                    warned: Optional[set] = None) -> dict[str, dict[str, Optional[float]]]:
  """``{task: {metric: value}}`` with every non-finite value replaced by ``None``.

  Args:
    metrics: the output of :func:`htl_jax.metrics.evaluate_tasks`.
    split: the split's name, for the warning.
    warned: ``(task, split, metric)`` already warned about (updated in place), so a run
      warns once per undefined metric, not once per evaluation.
  """
  warned = set() if warned is None else warned
  out: dict[str, dict[str, Optional[float]]] = {}
  for task, values in metrics.items():
    out[task] = {}
    for name, value in values.items():
      if value is not None and math.isfinite(value):
        out[task][name] = float(value)
        continue
      out[task][name] = None
      if (task, split, name) not in warned:
        warned.add((task, split, name))
        logging.warning('%s %s is undefined on the %s split: %s; written as null and skipped '
                        'by model selection', task, name, split,
                        _REASONS.get(name, 'degenerate values'))
  return out


def flat_hparams(config: Any) -> dict[str, bool | int | float | str]:
  """The config's fields as ``{'name': value}``, nested blocks flattened (``data.path``).

  Numbers, strings and booleans stay as they are, sequences become text
  (``hidden_dims: '(128, 64, 32)'``); None values are left out.
  """
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  out: dict[str, bool | int | float | str] = {}

  def add(prefix: str, tree: dict) -> None:
    for key, value in sorted(tree.items()):
      name = f'{prefix}{key}'
      if isinstance(value, dict):
        add(f'{name}.', value)
      elif isinstance(value, (bool, int, float, str)):
        out[name] = value
      elif isinstance(value, (list, tuple)):
        out[name] = str(tuple(value))

  add('', values)
  return out


def final_metrics(result: dict[str, Any]) -> dict[str, float]:
  """``metrics.json``'s validation and test metrics as ``{'final/<split>/<task>/<metric>':
  value}``, undefined (None) ones left out."""
  return {f'final/{split}/{task}/{name}': float(value)
          for split in ('valid', 'test')
          for task, values in result.get(split, {}).items()
          for name, value in values.items() if value is not None}


def _step_of(line: str) -> float:
  """A ``metrics.jsonl`` line's step; infinite for a blank or partial line (a process killed
  mid-write leaves the last line cut), so it is dropped on resume."""
  try:
    return float(json.loads(line).get('step', 0))
  except ValueError:
    return math.inf


# Whether runs draw a tqdm bar: None = when stderr is a terminal (the long commands turn it
# off: their own progress lines are on stdout).
PROGRESS_BAR: Optional[bool] = None


class RunWriter:
  """The run's ``metrics.jsonl``, TensorBoard events and progress display."""

  def __init__(self, workdir: str, resume_step: int, total_steps: int,
               progress_bar: Optional[bool] = None, primary: bool = True):
    """Opens the writers; with ``primary=False`` (not the primary process) nothing is written."""
    self.primary = primary
    self.total_steps = total_steps
    if not primary:
      return
    self.path = os.path.join(workdir, 'metrics.jsonl')
    lines = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = [line for line in f if _step_of(line) <= resume_step]
    with open(self.path, 'w') as f:
      f.writelines(lines)
    self.events = tensorboardX.SummaryWriter(logdir=workdir, purge_step=resume_step + 1)
    if progress_bar is None:
      progress_bar = sys.stderr.isatty() if PROGRESS_BAR is None else PROGRESS_BAR
    show_bar = progress_bar
    self.bar = (tqdm.tqdm(total=total_steps, initial=resume_step, unit='step',
                          dynamic_ncols=True, file=sys.stderr) if show_bar else None)

  def progress(self, step: int, loss: float, tau: float, examples_per_s: float) -> None:
    """Called every ``log_every`` steps: the bar (with ETA) or one log line."""
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f'{loss:.4f}', tau=f'{tau:.3g}',
                           ex_per_s=f'{examples_per_s:.0f}', refresh=False)
    else:
      logging.info('step %d/%d  loss %.4f  tau %.3g  %.0f examples/s', step,
                   self.total_steps, loss, tau, examples_per_s)
    self.events.add_scalar('train/loss', loss, step)
    self.events.add_scalar('train/tau', tau, step)
    self.events.add_scalar('train/examples_per_s', examples_per_s, step)

  def evaluation(self, record: dict[str, Any]) -> None:
    """One ``metrics.jsonl`` line, and its numbers as TensorBoard scalars."""
    if not self.primary:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    step = record['step']
    for task, loss in record.get('task_losses', {}).items():
      self.events.add_scalar(f'train/loss/{task}', loss, step)
    for task, values in record.get('valid', {}).items():
      for name, value in values.items():
        if value is not None:
          self.events.add_scalar(f'valid/{task}/{name}', value, step)
    for task, values in record.get('grad', {}).items():
      for name, value in values.items():
        self.events.add_scalar(f'grad/{task}/{name}', value, step)
    self.events.flush()

  def hparams(self, config: Any, result: dict[str, Any]) -> None:
    """At the end of a run: the config (:func:`flat_hparams`) and the final metrics
    (:func:`final_metrics`, also as scalars at the last step) for TensorBoard's HParams tab.

    Written into the run's own event files (``SummaryWriter.add_hparams`` would open a
    sub-run folder), so each workdir is one session of the HParams table.
    """
    if not self.primary:
      return
    metrics = final_metrics(result)
    experiment, start, end = tb_summary.hparams(flat_hparams(config), metrics)
    for proto in (experiment, start, end):
      self.events.file_writer.add_summary(proto)
    step = int(result.get('steps', self.total_steps))
    for tag, value in metrics.items():
      self.events.add_scalar(tag, value, step)
    self.events.flush()

  def close(self) -> None:
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.close()
    self.events.close()

"""The loop's periodic actions, each on its own (htl_jax.train.hooks): no model, no compile."""

from __future__ import annotations

import types

import numpy as np
import pytest

from htl_jax.errors import NonFiniteError
from htl_jax.optim import TaskDiagnostics
from htl_jax.selection import Selection
from htl_jax.train import hooks

NRMSE = Selection('core', 'nrmse', True)          # lower is better
DELTA_M = Selection('delta_m', 'delta_m', False)  # higher is better, in %


def _run(rule, values, patience, min_improvement=0.0):
  stop = hooks.EarlyStopping()
  for step, value in enumerate(values, start=1):
    stop = stop.update(step * 10, value, rule, patience, min_improvement)
  return stop


def test_early_stopping_keeps_the_best_and_stops_after_patience_bad_evaluations():
  stop = _run(NRMSE, [1.0, 0.9, 0.95, 0.96, 0.97], patience=3)
  assert (stop.best_value, stop.best_step, stop.bad_evals, stop.stopped) == (0.9, 20, 3, True)
  assert not _run(NRMSE, [1.0, 0.9, 0.95, 0.96], patience=3).stopped


def test_early_stopping_follows_the_rules_direction():
  stop = _run(DELTA_M, [-1.0, 2.0, 1.0], patience=5)
  assert (stop.best_value, stop.best_step, stop.bad_evals) == (2.0, 20, 1)


def test_a_creeping_run_stops_while_its_best_checkpoint_stays_its_best():
  """Improvements below min_improvement (relative) move the best but not the patience."""
  values = [1.0, 0.99997, 0.99994, 0.99992]
  stop = _run(NRMSE, values, patience=3, min_improvement=1e-4)
  assert stop.stopped and stop.best_value == 0.99992 and stop.best_step == 40
  assert not _run(NRMSE, values, patience=3, min_improvement=0.0).stopped


def test_delta_m_margin_is_in_percentage_points():
  # min_improvement 1e-4 is 0.01 points of Delta_m: +0.005 is not significant, +0.02 is.
  assert not DELTA_M.significant(1.005, 1.0, 1e-4)
  assert DELTA_M.significant(1.02, 1.0, 1e-4)


def test_an_undefined_value_neither_improves_nor_counts():
  stop = _run(NRMSE, [None, 1.0, None, None], patience=1)
  assert (stop.best_value, stop.best_step, stop.bad_evals, stop.stopped) == (1.0, 20, 0, False)


def test_early_stopping_round_trips_through_json_and_ignores_unknown_keys():
  stop = _run(NRMSE, [1.0, 0.9, 0.95], patience=3).trained(12.5)
  assert hooks.EarlyStopping.from_json({**stop.to_json(), 'from_a_newer_version': 1}) == stop


def _diagnostics(norms):
  """A dispatch's host diagnostics ``[devices=1, steps, K]`` with Algorithm 1's fields off."""
  norms = np.asarray(norms, np.float32)[None]
  return TaskDiagnostics(norm=norms, norm_processed=2 * norms, cos_core=np.ones_like(norms))


def test_diagnostics_window_averages_the_recorded_steps_only():
  window = hooks.DiagnosticsWindow()
  window.add(_diagnostics([[1.0, 2.0], [3.0, 4.0], [99.0, 99.0]]), num_steps=2)
  window.add(_diagnostics([[5.0, 6.0]]), num_steps=1)
  record = window.record(('click', 'watch_time'))
  assert record['click'] == {'norm': 3.0, 'norm_processed': 6.0, 'cos_core': 1.0}
  assert record['watch_time']['norm'] == 4.0 and 'eq16_share' not in record['watch_time']
  assert hooks.DiagnosticsWindow().record(('click',)) == {}


class _Writer:
  def __init__(self):
    self.lines = []

  def progress(self, step, loss, tau, examples_per_s):
    self.lines.append((step, loss, tau, examples_per_s > 0))


def _dispatch_metrics(losses, finite):
  steps = len(losses)
  return {'finite': np.asarray([finite]), 'loss': np.asarray([losses]),
          'tau': np.full((1, steps), 5.0), 'task_losses': np.ones((1, steps, 2)),
          'diagnostics': _diagnostics([[1.0, 1.0]] * steps)}


def test_progress_reports_the_last_step_and_fills_the_window():
  writer = _Writer()
  progress = hooks.Progress(writer, batch_size=8)
  for first in (0, 2):
    dispatch = types.SimpleNamespace(first=first, num_steps=2, diagnosed=True)
    progress.add(dispatch, _dispatch_metrics([1.0, 0.5 + first], [True, True]))
  progress.report(4, on_non_finite=lambda: 'unused')
  assert writer.lines == [(4, 2.5, 5.0, True)]
  assert progress.take_window().steps == 4 and progress.window.steps == 0


def test_progress_stops_on_the_first_non_finite_step_naming_it():
  progress = hooks.Progress(_Writer(), batch_size=8)
  dispatch = types.SimpleNamespace(first=10, num_steps=3, diagnosed=False)
  progress.add(dispatch, _dispatch_metrics([1.0, np.nan, np.nan], [True, False, False]))
  with pytest.raises(NonFiniteError, match=r'at step 12; .*checkpoint: ckpt/10'):
    progress.drain(on_non_finite=lambda: 'ckpt/10')


def test_no_preemption_signal_without_a_signal():
  assert hooks.preemption_signal(5) == ''

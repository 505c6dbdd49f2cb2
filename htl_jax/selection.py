"""Model selection: the one rule that picks the best checkpoint, stops early and ranks trials.

The paper leaves the rule open; DESIGN section 10 declares two, the same for every model of
a table, named in ``table.md``:

- ``selection='core'``: the core task's ``best_metric`` (NRMSE for the MSE head, Gini for the
  ZILN head, unless ``best_metric`` names another core metric).
- ``selection='delta_m'``: Delta_m (Maninis et al., CVPR 2019, "Attentive Single-Tasking of
  Multiple Tasks"), as LibMTL reports it: the mean over tasks of the mean over each task's
  reported metrics of the signed relative change against a reference run, in percent,

  ``Delta_m = 100 / T * sum_t 1 / M_t * sum_m s_m (M_tm - R_tm) / |R_tm|``,

  with ``s_m = -1`` where lower is better (logloss, NRMSE, NMAE) and ``+1`` elsewhere, so a
  positive Delta_m is better than the reference on balance, and every task weighs the same
  whatever its number of metrics. The reference is the DNN baseline at the dataset's
  defaults over the same seeds (:mod:`htl_jax.repro.reference` runs it), read from the file
  ``config.selection_reference``. A metric that is undefined (``null``) in either, or whose
  reference is 0, is skipped and named (:func:`delta_m`'s ``skipped``).

:func:`selection` is THE function: training (best checkpoint, early stopping), tuning (the
objective, its direction and pruning), the reproduction runner and serving (which serves the
best checkpoint training kept) all call it, so they agree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Optional

from htl_jax.errors import ConfigError
from htl_jax.metrics import CORE_METRICS, LOWER_IS_BETTER

RULES = ('core', 'delta_m')
DELTA_M = 'delta_m'
REFERENCE_FORMAT = 1

Metrics = Mapping[str, Mapping[str, Optional[float]]]


def _finite(value: Any) -> bool:
  return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def delta_m(metrics: Metrics, reference: Metrics,
            skipped: Optional[list[str]] = None) -> Optional[float]:
  """Delta_m of ``metrics`` against ``reference``, in percent (module docstring).

  Args:
    metrics: ``{task: {metric: value}}`` (a split of ``metrics.json``).
    reference: the same structure, the reference run's values.
    skipped: if given, ``'task metric'`` of every metric left out (undefined on either side,
      absent from the reference, or a reference of 0) is appended to it.

  Returns:
    The mean over tasks of the mean signed relative change of their metrics; None when no
    task has a metric to compare.
  """
  per_task = []
  for task, values in metrics.items():
    changes = []
    for name, value in values.items():
      ref = reference.get(task, {}).get(name)
      if not (_finite(value) and _finite(ref)) or ref == 0:
        if skipped is not None:
          skipped.append(f'{task} {name}')
        continue
      sign = -1.0 if name in LOWER_IS_BETTER else 1.0
      changes.append(sign * (float(value) - float(ref)) / abs(float(ref)))
    if changes:
      per_task.append(sum(changes) / len(changes))
  if not per_task:
    return None
  return 100.0 * sum(per_task) / len(per_task)


@dataclasses.dataclass(frozen=True)
class Selection:
  """A declared selection rule (module docstring).

  Attributes:
    rule: ``'core'`` or ``'delta_m'``.
    metric: what is compared: a core metric's name, or ``'delta_m'``.
    lower_is_better: its direction.
    reference: the reference run's validation metrics (``delta_m`` only).
    reference_path: where they were read from ('' for ``core``).
  """

  rule: str
  metric: str
  lower_is_better: bool
  reference: Optional[Metrics] = None
  reference_path: str = ''

  @property
  def name(self) -> str:
    return self.metric

  @property
  def direction(self) -> str:
    """Optuna's name of the direction: ``'minimize'`` or ``'maximize'``."""
    return 'minimize' if self.lower_is_better else 'maximize'

  @property
  def mode(self) -> str:
    """Orbax's ``best_mode``: ``'min'`` or ``'max'``."""
    return 'min' if self.lower_is_better else 'max'

  def value(self, metrics: Metrics, skipped: Optional[list[str]] = None
            ) -> Optional[float]:
    """The rule's value of one split's ``{task: {metric: value}}`` (None: undefined)."""
    if self.rule == DELTA_M:
      return delta_m(metrics, self.reference or {}, skipped)
    value = list(metrics.values())[-1].get(self.metric)
    return float(value) if _finite(value) else None

  def better(self, value: Optional[float], best: Optional[float]) -> bool:
    """True when ``value`` improves on ``best`` (None: undefined, never better; a defined
    value beats an undefined best)."""
    if not _finite(value):
      return False
    if best is None:
      return True
    return value < best if self.lower_is_better else value > best

  def significant(self, value: Optional[float], anchor: Optional[float],
                  min_improvement: float) -> bool:
    """True when ``value`` improves on ``anchor`` by more than ``min_improvement``: relative
    to ``|anchor|`` for a core metric, and in percentage points (``100 min_improvement``)
    for Delta_m, which is a relative change already. A defined value beats a None anchor."""
    if not self.better(value, anchor):
      return False
    if anchor is None:
      return True
    margin = (100.0 * min_improvement if self.rule == DELTA_M
              else min_improvement * abs(anchor))
    return abs(value - anchor) > margin

  def describe(self) -> str:
    """One line for reports: the rule, its metric and direction."""
    if self.rule == DELTA_M:
      return ('selection=delta_m: Delta_m in % against the reference run (higher is '
              'better; LibMTL\'s mean over tasks of the mean relative change of every '
              'reported validation metric)')
    direction = 'lower' if self.lower_is_better else 'higher'
    return f'selection=core: the core task\'s validation {self.metric} ({direction} is better)'


def core_metric(config: Any) -> str:
  """The core rule's metric: ``config.best_metric``, else NRMSE (MSE head) or Gini (ZILN)."""
  return config['best_metric'] or ('gini' if config['head'] == 'ziln' else 'nrmse')


def selection(config: Any) -> Selection:
  """THE selection rule of a run (module docstring), from ``config.selection``.

  Raises:
    ConfigError: an unknown rule or core metric, or ``delta_m`` without a readable
      reference file.
  """
  rule = config['selection']
  if rule not in RULES:
    raise ConfigError(f'config.selection={rule!r} is not one of {list(RULES)}')
  if rule == 'core':
    name = core_metric(config)
    if name not in CORE_METRICS:
      raise ConfigError(f'config.best_metric={name!r} is not one of {list(CORE_METRICS)}')
    return Selection('core', name, name in LOWER_IS_BETTER)
  path = str(config['selection_reference'])
  if not path:
    raise ConfigError('config.selection=delta_m needs config.selection_reference=PATH, the '
                      'reference.json of a reference run (htl-reproduce and htl-tune write '
                      'one)')
  reference = read_reference(path)
  return Selection(DELTA_M, DELTA_M, False, reference['valid'], os.path.abspath(path))


# ----------------------------------------------------------------------------- reference file


def read_reference(path: str) -> dict[str, Any]:
  """A ``reference.json`` (:func:`reference_record`); ConfigError when unreadable."""
  path = os.path.abspath(path)
  try:
    stamp = os.stat(path).st_mtime_ns
  except OSError:
    raise ConfigError(f'config.selection_reference={path}: no such file') from None
  return _read_reference(path, stamp)


@functools.lru_cache(maxsize=8)
def _read_reference(path: str, stamp: int) -> dict[str, Any]:
  del stamp                  # part of the cache key only: a rewritten file is read again
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as error:
    raise ConfigError(f'config.selection_reference={path}: not a readable JSON file '
                      f'({type(error).__name__})') from None
  if record.get('format') != REFERENCE_FORMAT or not isinstance(record.get('valid'), dict):
    raise ConfigError(f'config.selection_reference={path}: not a reference.json of this '
                      f'version (format {record.get("format")!r}, expected '
                      f'{REFERENCE_FORMAT})')
  return record


def mean_metrics(results: list[Metrics]) -> dict[str, dict[str, Optional[float]]]:
  """Per task and metric, the mean over ``results`` of the defined values (None if none)."""
  out: dict[str, dict[str, Optional[float]]] = {}
  for result in results:
    for task, values in result.items():
      for name in values:
        out.setdefault(task, {}).setdefault(name, None)
  for task, values in out.items():
    for name in values:
      defined = [float(r[task][name]) for r in results
                 if _finite(r.get(task, {}).get(name))]
      values[name] = sum(defined) / len(defined) if defined else None
  return out


def reference_record(runs: list[dict[str, Any]], model: str, seeds: list[int],
                     overrides: Mapping[str, Any]) -> dict[str, Any]:
  """``reference.json``'s content from the reference's finished runs (``metrics.json``s):
  the mean over seeds of each split's metrics."""
  return {'format': REFERENCE_FORMAT, 'model': model, 'seeds': list(seeds),
          'overrides': dict(overrides),
          'valid': mean_metrics([r['valid'] for r in runs]),
          'test': mean_metrics([r['test'] for r in runs])}

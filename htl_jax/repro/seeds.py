"""A tuning trial is several seeds: their runs trained side by side, judged on their mean.

One seed's validation value picks noise (docs/design.md, section 10: the top trials of a
study lie closer together than one seed's spread), so a trial trains ``trial_seeds`` runs
of its configuration, seeds ``seed, seed + 1, ...``, each in its own run dir
``<trial dir>/seed<k>``. Its value is the mean over the seeds of each run's best validation
value of the selection rule (:func:`htl_jax.selection.selection`), and its spread is kept
with it.

The runs advance side by side, one evaluation each in turn (:meth:`Run.evaluations
<htl_jax.train.loop.Run.evaluations>`), so after every round the pruner can see the MEAN of
the seeds' best values so far: pruning works on the mean, not on one seed. A seed that
stopped early keeps its best value in the mean. The seeds share one data preparation and one
set of compiled programs (only the seed differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from htl_jax.selection import selection
from htl_jax.train import parallel
from htl_jax.train.loop import Run, prepare

# after_round(report index, mean of the seeds' best values so far or None) may raise (e.g.
# optuna.TrialPruned) to stop every run of the trial.
AfterRound = Callable[[int, Optional[float]], None]


def seed_dir(trial_dir: str, seed: int) -> str:
  return os.path.join(trial_dir, f'seed{seed}')


def seed_configs(config, trial_seeds: int) -> list[Any]:
  """``config`` with seeds ``config.seed .. config.seed + trial_seeds - 1``."""
  configs = []
  for k in range(trial_seeds):
    copy = config.copy_and_resolve_references()
    copy.seed = int(config.seed) + k
    configs.append(copy)
  return configs


@dataclasses.dataclass(frozen=True)
class SeedsResult:
  """What a trial's seeds gave.

  Attributes:
    results: every seed's ``metrics.json`` content, in seed order.
    values: every seed's validation value of the selection rule (None: undefined).
  """

  results: list[dict[str, Any]]
  values: list[Optional[float]]

  @property
  def defined(self) -> list[float]:
    return [v for v in self.values if v is not None and math.isfinite(v)]

  @property
  def mean(self) -> Optional[float]:
    """The trial's value: the mean over seeds (None if a seed's value is undefined)."""
    defined = self.defined
    return float(np.mean(defined)) if defined and len(defined) == len(self.values) else None

  @property
  def std(self) -> Optional[float]:
    """The sample std over seeds (ddof = 1; None for one seed)."""
    defined = self.defined
    return float(np.std(defined, ddof=1)) if len(defined) > 1 else None

  @property
  def runs_at_cap(self) -> int:
    """Runs that ended at their step budget rather than by early stopping."""
    return sum(1 for r in self.results if r.get('stop') == 'cap')


def _mean_best(runs: Sequence[Run]) -> Optional[float]:
  best = [r.stopping.best_value for r in runs]
  if any(b is None for b in best):
    return None
  return float(np.mean(best))


def train_seeds(configs: Sequence[Any], trial_dir: str, after_round: AfterRound,
                report_index: Callable[[int], int]) -> SeedsResult:
  """Trains every config (one per seed) in ``<trial_dir>/seed<k>``, side by side.

  Each round advances the seeds that are furthest behind by one evaluation; once every
  active seed has evaluated the same step, ``after_round(report_index(step), mean)`` gets
  the mean of every seed's best value so far (a stopped seed keeps its best). Runs resume
  from their checkpoints (a retried trial), also when a kill left them at different steps.

  Returns:
    Every seed's final metrics and selection value.
  """
  rule = selection(configs[0])
  prepared = prepare(configs[0], trial_dir)
  with contextlib.ExitStack() as stack:
    runs = [stack.enter_context(Run(config, seed_dir(trial_dir, int(config.seed)),
                                    prepared))
            for config in configs]
    steps = [_resumed_step(r) for r in runs]
    evaluations = [r.evaluations() for r in runs]
    active = [k for k, r in enumerate(runs) if not r.stopping.stopped]
    while active:
      behind = min(steps[k] for k in active)
      for k in [k for k in active if steps[k] == behind]:
        evaluation = next(evaluations[k], None)
        if evaluation is None:
          active.remove(k)
        else:
          steps[k] = evaluation.step
      if active and len({steps[k] for k in active}) == 1:
        after_round(report_index(steps[active[0]]), _mean_best(runs))
    results = [r.finish() for r in runs]
  return SeedsResult(results, [rule.value(r['valid']) for r in results])


def _resumed_step(run: Run) -> int:
  """The step a run starts from (0 fresh, else its latest checkpoint's)."""
  return int(parallel.unreplicate(run.rstate.step))

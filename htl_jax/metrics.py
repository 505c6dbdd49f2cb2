"""Evaluation metrics for hybrid targets (numpy in, python float out).

Binary tasks are scored with ``auc`` and ``logloss``; the continuous core task
with ``nrmse``, ``nmae``, ``spearman`` and ``gini`` (paper Section 5.1.3, and the
normalized Gini of Wang, Liu, Miao 2019, "A Deep Probabilistic Model for
Customer Lifetime Value Prediction", arXiv 1912.07753). Every metric is computed
on the original label scale, in float64, with sorting instead of python loops
(1M predictions take well under a second per metric).

Degenerate inputs never raise or warn: a metric whose definition divides by
zero (one class only, constant targets, zero mean, empty arrays, NaN inside a
rank-based metric) returns ``nan``.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

BINARY_METRICS = ('auc', 'logloss')
GROUPED_METRICS = ('gauc',)        # binary tasks, where a user (group) column is known
CORE_METRICS = ('nrmse', 'nmae', 'spearman', 'gini', 'xauc')
LOWER_IS_BETTER = frozenset({'logloss', 'nrmse', 'nmae'})
# XAUC's pairs: every pair of a split up to this many, else this many sampled pairs.
XAUC_PAIRS = 1_000_000

# The probability clamp of the binary losses (Eq. 8), the towers' outputs and log loss.
PROB_EPS = 1e-7
_NAN = float('nan')


def _as_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flattens both arrays to float64 vectors of equal length."""
  y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
  y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
  if y_true.shape != y_pred.shape:
    raise ValueError(
        f'y_true and y_pred differ in size: {y_true.size} vs {y_pred.size}')
  return y_true, y_pred


def _has_nan(*arrays: np.ndarray) -> bool:
  return any(bool(np.isnan(a).any()) for a in arrays)


def _tie_groups(sorted_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Start index of each run of equal values in ``sorted_x`` and its mean rank."""
  n = sorted_x.size
  starts_group = np.empty(n, dtype=bool)
  starts_group[0] = True
  np.not_equal(sorted_x[1:], sorted_x[:-1], out=starts_group[1:])
  starts = np.flatnonzero(starts_group)
  ends = np.append(starts[1:], n)  # exclusive: the run holds ranks starts+1..ends
  return starts, (starts + ends + 1) / 2.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x`` where tied values share the mean of their ranks."""
  order = np.argsort(x)  # any sort: tied values get the same rank anyway
  starts, group_rank = _tie_groups(x[order])
  ranks = np.empty(x.size, dtype=np.float64)
  ranks[order] = np.repeat(group_rank, np.diff(np.append(starts, x.size)))
  return ranks


def auc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """ROC AUC (Mann-Whitney U), ties in ``y_pred`` counted as one half.

  Uses average ranks, so it equals ``sklearn.metrics.roc_auc_score``. Labels are
  positive where ``y_true > 0.5``. Returns nan when only one class is present.
  """
  y_true, y_pred = _as_pair(y_true, y_pred)
  if y_true.size == 0 or _has_nan(y_true, y_pred):
    return _NAN
  positive = y_true > 0.5
  n_pos = int(positive.sum())
  n_neg = y_true.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return _NAN
  order = np.argsort(y_pred)
  starts, group_rank = _tie_groups(y_pred[order])
  positives_per_group = np.add.reduceat(positive[order].astype(np.float64), starts)
  rank_sum = float(np.dot(positives_per_group, group_rank))
  return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Mean binary cross-entropy with ``y_pred`` clipped to ``[1e-7, 1 - 1e-7]``."""
  y_true, y_pred = _as_pair(y_true, y_pred)
  if y_true.size == 0:
    return _NAN
  p = np.clip(y_pred, PROB_EPS, 1.0 - PROB_EPS)
  return float(-np.mean(y_true * np.log(p) + (1.0 - y_true) * np.log1p(-p)))


def nrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """``sqrt(mean((y - yhat)^2)) / std(y)`` with the population std (ddof=0).

  nan when ``y`` is constant (or empty).
  """
  y_true, y_pred = _as_pair(y_true, y_pred)
  if y_true.size == 0:
    return _NAN
  std = float(np.std(y_true))
  if not std > 0.0:
    return _NAN
  return float(np.sqrt(np.mean(np.square(y_true - y_pred)))) / std


def nmae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """``mean(|y - yhat|) / mean(y)``; nan when ``mean(y) == 0`` (or empty)."""
  y_true, y_pred = _as_pair(y_true, y_pred)
  if y_true.size == 0:
    return _NAN
  mean = float(np.mean(y_true))
  if mean == 0.0:
    return _NAN
  return float(np.mean(np.abs(y_true - y_pred))) / mean


def spearman(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Spearman rank correlation with average ranks for ties.

  Equals ``scipy.stats.spearmanr(y_true, y_pred).statistic``; nan when either
  side is constant (scipy warns there, this does not).
  """
  y_true, y_pred = _as_pair(y_true, y_pred)
  if y_true.size < 2 or _has_nan(y_true, y_pred):
    return _NAN
  a = _average_ranks(y_true)
  b = _average_ranks(y_pred)
  a -= a.mean()
  b -= b.mean()
  denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
  if not denom > 0.0:
    return _NAN
  return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def _raw_gini(y_true: np.ndarray, order: np.ndarray) -> float:
  """``2 * sum(gain) / n - 1`` for the cumulative share of ``y_true`` in ``order``."""
  cumulative = np.cumsum(y_true[order])
  gain = cumulative / cumulative[-1]
  return 2.0 * float(gain.sum()) / y_true.size - 1.0


def gini(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Normalized Gini coefficient of the ZILN paper (Wang et al. 2019, Sec. 4.3).

  Examples are sorted by prediction, descending; ``gain`` is the cumulative
  share of the total true value; ``raw = 2 * sum(gain) / n - 1``; the result is
  ``raw`` divided by the same quantity with ``y_true`` as the prediction, so a
  perfect ordering scores 1 and a reversed one scores below 0 on skewed
  targets.

  Tied predictions keep their input order (a stable sort on ``-y_pred``), so
  the value depends on row order when predictions tie; the reference code
  (pandas ``sort_values``, quicksort) leaves that order unspecified.

  nan when ``sum(y_true) == 0`` or the ideal ``raw`` is 0.
  """
  y_true, y_pred = _as_pair(y_true, y_pred)
  if y_true.size == 0 or _has_nan(y_true, y_pred):
    return _NAN
  if float(y_true.sum()) == 0.0:
    return _NAN
  ideal = _raw_gini(y_true, np.argsort(-y_true))  # ties in y: same gain
  if ideal == 0.0:
    return _NAN
  model = _raw_gini(y_true, np.argsort(-y_pred, kind='stable'))
  return model / ideal


def gauc(y_true: np.ndarray, y_pred: np.ndarray, group: np.ndarray) -> float:
  """Group AUC: the AUC of each group (user), averaged with the group's rows as weights.

  ``sum_u n_u AUC_u / sum_u n_u`` over the groups whose labels hold both classes (a group
  with one class has no AUC and is left out), as in Zhou et al., "Deep Interest Network for
  Click-Through Rate Prediction" (KDD 2018, Eq. 1) with impressions as weights, the way
  watch-time papers on KuaiRand report it. nan when no group has both classes.

  Args:
    y_true: ``[N]`` labels (positive where > 0.5).
    y_pred: ``[N]`` scores.
    group: ``[N]`` group keys (any sortable dtype: user ids).
  """
  y_true, y_pred = _as_pair(y_true, y_pred)
  group = np.asarray(group).reshape(-1)
  if group.shape != y_true.shape:
    raise ValueError(f'group has {group.size} rows, the labels {y_true.size}')
  if y_true.size == 0 or _has_nan(y_true, y_pred):
    return _NAN
  order = np.lexsort((y_pred, group))          # by group, then by score
  g, s, positive = group[order], y_pred[order], y_true[order] > 0.5
  starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
  sizes = np.diff(np.r_[starts, g.size])
  group_id = np.repeat(np.arange(starts.size), sizes)
  # Average ranks of the scores within each group (ties share their mean rank).
  tie_start = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
  tie_id = np.cumsum(tie_start) - 1
  tie_first = np.flatnonzero(tie_start)
  tie_size = np.diff(np.r_[tie_first, g.size])
  position = np.arange(g.size) - starts[group_id]          # 0-based within the group
  tie_rank = position[tie_first] + (tie_size + 1) / 2.0     # 1-based mean rank of a tie run
  ranks = tie_rank[tie_id]
  n_pos = np.bincount(group_id, weights=positive, minlength=starts.size)
  n_neg = sizes - n_pos
  rank_sum = np.bincount(group_id, weights=np.where(positive, ranks, 0.0),
                         minlength=starts.size)
  both = (n_pos > 0) & (n_neg > 0)
  if not both.any():
    return _NAN
  aucs = (rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])
  return float(np.sum(sizes[both] * aucs) / np.sum(sizes[both]))


@functools.lru_cache(maxsize=8)
def xauc_pairs(n: int, num_pairs: int = XAUC_PAIRS, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
  """The pairs ``(i, j)``, ``i != j``, that :func:`xauc` compares among ``n`` rows: every
  pair ``i < j`` when there are at most ``num_pairs``, else ``num_pairs`` pairs drawn
  uniformly (with replacement) from ``np.random.default_rng(seed)``."""
  if n < 2:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  if n * (n - 1) // 2 <= num_pairs:
    i, j = np.triu_indices(n, k=1)
  else:
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, num_pairs)
    j = (i + rng.integers(1, n, num_pairs)) % n         # uniform over the other rows
  i.flags.writeable = j.flags.writeable = False          # cached: shared by every call
  return i, j


def xauc(y_true: np.ndarray, y_pred: np.ndarray, num_pairs: int = XAUC_PAIRS,
         seed: int = 0) -> float:
  """XAUC: the fraction of pairs that the prediction orders as the true values are ordered.

  Zhan et al., "Deconfounding Duration Bias in Watch-time Prediction for Video
  Recommendation" (KDD 2022): over pairs of rows with different true values (watch times),
  the share where the prediction's order agrees, a tie in the prediction counting one
  half. Like that paper it is estimated on sampled pairs when a split has more than
  ``num_pairs`` pairs (:func:`xauc_pairs`: fixed pairs for a given size and seed, so every
  model of a split is scored on the same pairs); a smaller split uses every pair (exact).
  nan when no pair has different true values.
  """
  y_true, y_pred = _as_pair(y_true, y_pred)
  if _has_nan(y_true, y_pred):
    return _NAN
  i, j = xauc_pairs(y_true.size, num_pairs, seed)
  true_order = np.sign(y_true[i] - y_true[j])
  kept = true_order != 0
  if not kept.any():
    return _NAN
  agree = true_order[kept] * np.sign(y_pred[i][kept] - y_pred[j][kept])
  return float(np.mean(np.where(agree > 0, 1.0, np.where(agree == 0, 0.5, 0.0))))


_METRIC_FNS = {
    'auc': auc,
    'logloss': logloss,
    'nrmse': nrmse,
    'nmae': nmae,
    'spearman': spearman,
    'gini': gini,
    'xauc': xauc,
}


def evaluate_tasks(
    y: np.ndarray,
    probs: np.ndarray,
    core: np.ndarray,
    core_pred: np.ndarray,
    task_names: Sequence[str],
    group: Optional[np.ndarray] = None,
) -> dict[str, dict[str, float]]:
  """Scores every binary task and the core task.

  Args:
    y: ``[N, T]`` binary labels, tasks in chain order.
    probs: ``[N, T]`` predicted probabilities.
    core: ``[N]`` core targets on the original scale.
    core_pred: ``[N]`` core predictions on the original scale.
    task_names: ``T + 1`` names, the core task last.
    group: ``[N]`` user (group) keys, or None; with them every binary task also gets
      ``gauc``.

  Returns:
    ``{binary_name: {'auc', 'logloss'[, 'gauc']}, ..., core_name: {'nrmse', 'nmae',
    'spearman', 'gini', 'xauc'}}``.
  """
  y = np.asarray(y)
  probs = np.asarray(probs)
  if y.ndim == 1:
    y = y[:, None]
  if probs.ndim == 1:
    probs = probs[:, None]
  if y.shape != probs.shape:
    raise ValueError(f'labels {y.shape} and probabilities {probs.shape} differ')
  num_binary = y.shape[1]
  if len(task_names) != num_binary + 1:
    raise ValueError(
        f'expected {num_binary + 1} task names ({num_binary} binary + core), '
        f'got {list(task_names)}')
  results: dict[str, dict[str, float]] = {}
  for t, name in enumerate(task_names[:-1]):
    results[name] = {m: _METRIC_FNS[m](y[:, t], probs[:, t]) for m in BINARY_METRICS}
    if group is not None:
      results[name]['gauc'] = gauc(y[:, t], probs[:, t], group)
  results[task_names[-1]] = {m: _METRIC_FNS[m](core, core_pred) for m in CORE_METRICS}
  return results

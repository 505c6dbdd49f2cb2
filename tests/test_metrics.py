"""Tests for htl_jax.metrics against sklearn, scipy and hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from htl_jax import metrics


def _tied_binary(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """Labels correlated with predictions rounded to one decimal (many ties)."""
  rng = np.random.default_rng(seed)
  pred = np.round(rng.random(n), 1)
  labels = (rng.random(n) < 0.2 + 0.6 * pred).astype(np.float32)
  return labels, pred


def _tied_continuous(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """Zero-inflated targets and predictions with heavy ties on both sides."""
  rng = np.random.default_rng(seed)
  y = np.round(rng.lognormal(size=n) * (rng.random(n) < 0.4), 1)
  pred = np.round(y + rng.normal(scale=2.0, size=n), 0)
  return y, pred


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
  labels, pred = _tied_binary(seed)
  assert abs(metrics.auc(labels, pred) - sk_metrics.roc_auc_score(labels, pred)) < 1e-10


def test_auc_hand_worked():
  # Positives score 0.35 and 0.8; negatives 0.1 and 0.4. Of the 4 (pos, neg)
  # pairs, 3 are ordered correctly: (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4).
  assert metrics.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
  # All four scores tie: every pair counts one half.
  assert metrics.auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5


@pytest.mark.parametrize('seed', [0, 1])
def test_logloss_matches_sklearn_on_clipped(seed):
  labels, pred = _tied_binary(seed)
  pred = pred.copy()
  pred[:3] = [0.0, 1.0, 1e-12]  # exercise the clipping
  clipped = np.clip(pred, 1e-7, 1 - 1e-7)
  expected = sk_metrics.log_loss(labels, clipped, labels=[0, 1])
  assert abs(metrics.logloss(labels, pred) - expected) < 1e-10


def test_logloss_hand_worked():
  # -(log 0.8 + log(1 - 0.4)) / 2
  expected = -(math.log(0.8) + math.log(0.6)) / 2
  value = metrics.logloss(np.array([1, 0]), np.array([0.8, 0.4]))
  assert value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_spearman_matches_scipy_with_ties(seed):
  y, pred = _tied_continuous(seed)
  expected = stats.spearmanr(y, pred).statistic
  assert abs(metrics.spearman(y, pred) - expected) < 1e-10


def test_nrmse_nmae_hand_worked():
  y = np.array([1.0, 2.0, 3.0, 4.0])
  pred = np.array([1.0, 2.0, 3.0, 6.0])
  # Errors 0, 0, 0, -2: RMSE = sqrt(4 / 4) = 1; std(y) = sqrt((2.25 + .25 + .25 + 2.25) / 4)
  # = sqrt(1.25), so NRMSE = 1 / sqrt(1.25).
  assert metrics.nrmse(y, pred) == pytest.approx(1 / math.sqrt(1.25), abs=1e-12)
  # MAE = 2 / 4 = 0.5; mean(y) = 2.5, so NMAE = 0.2.
  assert metrics.nmae(y, pred) == pytest.approx(0.2, abs=1e-12)


def test_nrmse_uses_population_std():
  rng = np.random.default_rng(3)
  y, pred = rng.normal(size=50), rng.normal(size=50)
  expected = np.sqrt(np.mean((y - pred) ** 2)) / np.std(y, ddof=0)
  assert metrics.nrmse(y, pred) == pytest.approx(expected, rel=1e-12)


def test_gini_hand_worked():
  y = np.array([0.0, 1.0, 3.0, 6.0])  # total 10
  pred = np.array([0.1, 0.4, 0.3, 0.9])
  # Model order (pred descending) visits y = 6, 1, 3, 0: gain = .6, .7, 1, 1,
  # sum 3.3, raw = 2 * 3.3 / 4 - 1 = 0.65. Ideal order 6, 3, 1, 0: gain = .6, .9,
  # 1, 1, sum 3.5, raw = 0.75. Normalized: 0.65 / 0.75 = 13 / 15.
  assert metrics.gini(y, pred) == pytest.approx(13 / 15, abs=1e-12)


def test_gini_perfect_ordering_is_one():
  y, _ = _tied_continuous(4)
  assert metrics.gini(y, y) == pytest.approx(1.0, abs=1e-12)
  assert metrics.gini(y, 3.0 * y + 7.0) == pytest.approx(1.0, abs=1e-12)


def test_gini_reversed_is_negative():
  y = np.array([0.0, 0.0, 0.0, 10.0])
  # Reversed: the 10 comes last, gain = 0, 0, 0, 1, raw = 2 * 1 / 4 - 1 = -0.5.
  # Ideal: gain = 1, 1, 1, 1, raw = 1. Normalized: -0.5.
  assert metrics.gini(y, -y) == pytest.approx(-0.5, abs=1e-12)
  y, _ = _tied_continuous(5)
  assert metrics.gini(y, -y) < 0.0


def test_gini_ties_keep_input_order():
  y = np.array([0.0, 1.0, 3.0, 6.0])
  # All predictions tie, so the stable sort keeps the input order 0, 1, 3, 6:
  # gain = 0, .1, .4, 1, sum 1.5, raw = 2 * 1.5 / 4 - 1 = -0.25; / 0.75 = -1/3.
  assert metrics.gini(y, np.zeros(4)) == pytest.approx(-1 / 3, abs=1e-12)
  assert metrics.gini(y[::-1], np.zeros(4)) == pytest.approx(1.0, abs=1e-12)


def test_degenerate_inputs_give_nan_without_warnings():
  ones = np.ones(5)
  assert math.isnan(metrics.auc(ones, np.linspace(0, 1, 5)))  # one class only
  assert math.isnan(metrics.nrmse(ones, np.zeros(5)))  # std(y) = 0
  assert math.isnan(metrics.nmae(np.array([-1.0, 1.0]), np.zeros(2)))  # mean(y) = 0
  assert math.isnan(metrics.spearman(ones, np.arange(5.0)))  # constant y
  assert math.isnan(metrics.spearman(np.arange(5.0), ones))  # constant prediction
  assert math.isnan(metrics.gini(np.zeros(5), np.arange(5.0)))  # no value at all
  assert math.isnan(metrics.auc(np.array([0, 1]), np.array([0.5, np.nan])))
  empty = np.zeros(0)
  for name in metrics.BINARY_METRICS + metrics.CORE_METRICS:
    assert math.isnan(getattr(metrics, name)(empty, empty)), name
  # Constant but well-defined cases stay finite.
  assert metrics.logloss(ones, np.full(5, 0.5)) == pytest.approx(math.log(2), abs=1e-12)
  assert metrics.nmae(ones, np.zeros(5)) == 1.0


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match='differ in size'):
    metrics.auc(np.zeros(3), np.zeros(4))


def test_returns_python_floats():
  labels, pred = _tied_binary(6, n=100)
  for name in metrics.BINARY_METRICS + metrics.CORE_METRICS:
    assert type(getattr(metrics, name)(labels, pred.astype(np.float32))) is float, name


def test_evaluate_tasks():
  rng = np.random.default_rng(7)
  n = 300
  y = np.stack([rng.random(n) < 0.6, rng.random(n) < 0.3], axis=1).astype(np.float32)
  probs = rng.random((n, 2)).astype(np.float32)
  core = rng.lognormal(size=n)
  core_pred = core + rng.normal(size=n)
  result = metrics.evaluate_tasks(y, probs, core, core_pred, ['click', 'like', 'watch'])
  assert list(result) == ['click', 'like', 'watch']
  for t, name in enumerate(['click', 'like']):
    assert result[name] == {'auc': metrics.auc(y[:, t], probs[:, t]),
                            'logloss': metrics.logloss(y[:, t], probs[:, t])}
  assert set(result['watch']) == set(metrics.CORE_METRICS)
  assert result['watch']['gini'] == metrics.gini(core, core_pred)
  assert set(metrics.LOWER_IS_BETTER) == {'logloss', 'nrmse', 'nmae'}
  with pytest.raises(ValueError, match='3 task names'):
    metrics.evaluate_tasks(y, probs, core, core_pred, ['click', 'watch'])


# ----------------------------------------------------------------------------- XAUC, GAUC


def _xauc_brute_force(y: np.ndarray, pred: np.ndarray, pairs) -> float:
  """The fraction of correctly ordered pairs, pair by pair (ties in the prediction: 1/2)."""
  scores = []
  for i, j in pairs:
    if y[i] == y[j]:
      continue
    agree = (y[i] - y[j]) * (pred[i] - pred[j])
    scores.append(1.0 if agree > 0 else 0.5 if agree == 0 else 0.0)
  return float(np.mean(scores))


@pytest.mark.parametrize('seed', [0, 1])
def test_xauc_equals_every_pair_brute_force(seed):
  y, pred = _tied_continuous(seed, n=300)             # 44,850 pairs: every pair is used
  pairs = [(i, j) for i in range(300) for j in range(i + 1, 300)]
  assert metrics.xauc(y, pred) == pytest.approx(_xauc_brute_force(y, pred, pairs), abs=1e-12)


def test_xauc_samples_pairs_as_zhan_et_al_and_equals_brute_force_on_them():
  y, pred = _tied_continuous(3, n=3000)               # 4.5M pairs: 20,000 are sampled
  i, j = metrics.xauc_pairs(3000, num_pairs=20_000, seed=0)
  assert len(i) == 20_000 and not np.any(i == j)
  sampled = metrics.xauc(y, pred, num_pairs=20_000)
  assert sampled == pytest.approx(_xauc_brute_force(y, pred, zip(i, j)), abs=1e-12)
  a, b = np.triu_indices(3000, k=1)                    # every pair, vectorized
  kept = y[a] != y[b]
  agree = np.sign(y[a] - y[b])[kept] * np.sign(pred[a] - pred[b])[kept]
  exact = float(np.mean(np.where(agree > 0, 1.0, np.where(agree == 0, 0.5, 0.0))))
  assert abs(sampled - exact) < 0.015                  # an estimate of the same quantity
  assert metrics.xauc(y, y) == 1.0 and metrics.xauc(y, -y) == 0.0
  assert math.isnan(metrics.xauc(np.ones(10), np.arange(10.0)))   # no pair to order


def _gauc_brute_force(y, pred, group) -> float:
  total = weight = 0.0
  for g in np.unique(group):
    rows = group == g
    if 0 < y[rows].sum() < rows.sum():
      total += rows.sum() * sk_metrics.roc_auc_score(y[rows], pred[rows])
      weight += rows.sum()
  return total / weight


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_gauc_equals_per_user_sklearn_weighted_by_rows(seed):
  labels, pred = _tied_binary(seed, n=3000)
  group = np.random.default_rng(seed).integers(0, 120, 3000)
  assert metrics.gauc(labels, pred, group) == pytest.approx(
      _gauc_brute_force(labels, pred, group), abs=1e-12)
  one_class = np.zeros(10)
  assert math.isnan(metrics.gauc(one_class, np.arange(10.0), np.arange(10)))


def test_evaluate_tasks_adds_gauc_with_a_user_column():
  labels, pred = _tied_binary(4, n=500)
  group = np.arange(500) % 17
  result = metrics.evaluate_tasks(labels[:, None], pred[:, None], pred, pred, ['c', 'y'],
                                  group=group)
  assert result['c']['gauc'] == metrics.gauc(labels, pred, group)
  assert 'gauc' not in metrics.evaluate_tasks(labels[:, None], pred[:, None], pred, pred,
                                              ['c', 'y'])['c']

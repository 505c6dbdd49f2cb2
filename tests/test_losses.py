"""Tests for htl_jax.losses: hand-worked values, references, stability, jit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from htl_jax import losses


def _softplus(x: float) -> float:
  return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def test_bce_matches_sklearn():
  rng = np.random.default_rng(0)
  probs = rng.random(64).astype(np.float32)
  probs[:2] = [0.0, 1.0]  # clamped to [1e-7, 1 - 1e-7]
  labels = (rng.random(64) < 0.5).astype(np.float32)
  expected = sk_metrics.log_loss(
      labels, np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7), labels=[0, 1])
  assert float(losses.bce(probs, labels)) == pytest.approx(expected, rel=1e-5)


def test_mse_and_weights():
  # ((1 - 1)^2 + (2 - 0)^2 + (3 - 5)^2) / 3 = 8 / 3.
  pred, target = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 0.0, 5.0])
  assert float(losses.mse(pred, target)) == pytest.approx(8 / 3, rel=1e-6)
  # Weight 0 on the last row: (0 + 4) / 2 = 2.
  weight = jnp.array([1.0, 1.0, 0.0])
  assert float(losses.mse(pred, target, weight)) == pytest.approx(2.0, rel=1e-6)
  probs, labels = jnp.array([0.9, 0.2, 0.5]), jnp.array([1.0, 0.0, 1.0])
  expected = float(losses.bce(probs[:2], labels[:2]))
  assert float(losses.bce(probs, labels, weight)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.mse(pred, target, jnp.zeros(3))) == 0.0  # all padding


def test_aitm_calibrator_hand_worked():
  probs = jnp.array([[0.5, 0.7, 0.2], [0.9, 0.3, 0.4]])
  # Row 1: max(0.7 - 0.5, 0) + max(0.2 - 0.7, 0) = 0.2.
  # Row 2: max(0.3 - 0.9, 0) + max(0.4 - 0.3, 0) = 0.1.
  # 0.6 * mean(0.2, 0.1) = 0.6 * 0.15 = 0.09.
  assert float(losses.aitm_calibrator(probs, 0.6)) == pytest.approx(0.09, rel=1e-5)
  assert float(losses.aitm_calibrator(probs[:, :1], 0.6)) == 0.0  # a single task


def test_tafe_dtl_loss_hand_worked():
  probs = jnp.array([[0.8, 0.3], [0.6, 0.5], [0.9, 0.2]])
  labels = jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
  # Row 1 reached both steps: stopped after k=2, p_2 - p_3 = 0.3 - 0 = 0.3.
  # Row 2 stopped after k=1: p_1 - p_2 = 0.6 - 0.5 = 0.1.
  # Row 3 stopped after k=0: p_0 - p_1 = 1 - 0.9 = 0.1.
  expected = -(math.log(0.3) + math.log(0.1) + math.log(0.1)) / 3
  assert float(losses.tafe_dtl_loss(probs, labels)) == pytest.approx(expected, rel=1e-5)
  # Non-monotone probabilities: p_1 - p_2 = 0.3 - 0.5 < 0 is clamped to 1e-7.
  clamped = losses.tafe_dtl_loss(jnp.array([[0.3, 0.5]]), jnp.array([[1.0, 0.0]]))
  assert float(clamped) == pytest.approx(-math.log(1e-7), rel=1e-5)


def test_ziln_mean_hand_worked():
  logits = jnp.array([[0.0, 1.0, 0.0], [2.0, -0.5, -100.0]])
  # Row 1: sigmoid(0) = 0.5, sigma = softplus(0) = log 2: 0.5 * exp(1 + (log 2)^2 / 2).
  # Row 2: softplus(-100) ~ 4e-44 is floored at sqrt(1e-7), so sigma^2 / 2 = 5e-8.
  expected = [0.5 * math.exp(1.0 + math.log(2.0) ** 2 / 2),
              1 / (1 + math.exp(-2.0)) * math.exp(-0.5 + 5e-8)]
  np.testing.assert_allclose(losses.ziln_mean(logits), expected, rtol=1e-6)


def test_ziln_loss_matches_scipy_lognormal():
  logits = np.array([[0.3, 1.2, 0.4], [-1.0, 0.1, -0.7], [2.0, 3.0, 1.5], [0.5, 0.0, 0.0]])
  y = np.array([2.5, 0.0, 30.0, 0.7])
  expected = []
  for (l, mu, s), target in zip(logits, y):
    sigma = max(_softplus(s), math.sqrt(1e-7))
    positive = float(target > 0)
    # BCE(1[y > 0], l) = softplus(l) - 1[y > 0] * l.
    classification = _softplus(l) - positive * l
    log_pdf = stats.lognorm.logpdf(target, s=sigma, scale=math.exp(mu)) if positive else 0.0
    expected.append(classification - positive * log_pdf)
  value = losses.ziln_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(y, jnp.float32))
  assert float(value) == pytest.approx(float(np.mean(expected)), rel=1e-5)
  # Weighted: only rows 0 and 2 count.
  weighted = losses.ziln_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(y, jnp.float32),
                              jnp.array([1.0, 0.0, 1.0, 0.0]))
  assert float(weighted) == pytest.approx((expected[0] + expected[2]) / 2, rel=1e-5)


def test_ziln_is_finite_at_extremes():
  logits = jnp.array([[100.0, 50.0, -100.0], [-100.0, -50.0, 100.0], [0.0, 0.0, -100.0]])
  y = jnp.array([1e6, 0.0, 1e-6])
  value, grad = jax.value_and_grad(losses.ziln_loss)(logits, y)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(grad))
  # A zero target only sees the classification term: its mu and s get no gradient.
  np.testing.assert_array_equal(grad[1, 1:], 0.0)


def test_pairwise_ranking_loss_hand_worked():
  scores = jnp.array([2.0, 0.5, 1.0, -1.0])
  reached_prev = jnp.array([1.0, 1.0, 1.0, 0.0])
  converted = jnp.array([1.0, 0.0, 1.0, 0.0])
  # Winners (converted): rows 0 and 2. Losers (reached, not converted): row 1
  # only (row 3 never reached the previous step). Pairs (0, 1) and (2, 1):
  # (log(1 + e^-(2 - 0.5)) + log(1 + e^-(1 - 0.5))) / 2.
  expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-0.5))) / 2
  value = losses.pairwise_ranking_loss(scores, reached_prev, converted)
  assert float(value) == pytest.approx(expected, rel=1e-6)
  # Padding row 2 drops the pair (2, 1).
  weighted = losses.pairwise_ranking_loss(
      scores, reached_prev, converted, jnp.array([1.0, 1.0, 0.0, 1.0]))
  assert float(weighted) == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
  # No loser at all: 0.
  assert float(losses.pairwise_ranking_loss(scores, converted, converted)) == 0.0


def test_pairwise_ranking_total():
  logits = jnp.array([[0.1, 2.0, 0.3], [0.2, 0.5, -0.4], [0.3, 1.0, 1.1], [-0.5, -1.0, 0.0]])
  labels = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  total = losses.pairwise_ranking_total(logits, labels)
  assert total.shape == (3,)
  assert float(total[0]) == 0.0
  for t in (1, 2):
    direct = losses.pairwise_ranking_loss(logits[:, t], labels[:, t - 1], labels[:, t])
    assert float(total[t]) == pytest.approx(float(direct), rel=1e-6)
  # Step 2: winner row 0 (score 0.3), loser row 2 (1.1): log(1 + e^-(0.3 - 1.1)).
  assert float(total[2]) == pytest.approx(math.log1p(math.exp(0.8)), rel=1e-6)


def test_pairwise_ranking_loss_large_batch():
  batch = 8192
  rng = np.random.default_rng(1)
  scores = rng.normal(size=batch).astype(np.float32)
  reached_prev = (rng.random(batch) < 0.5).astype(np.float32)
  converted = np.zeros(batch, np.float32)
  converted[:3] = reached_prev[:3] = 1.0  # 3 winners keep the numpy reference small
  losers = (reached_prev == 1) & (converted == 0)
  diffs = scores[:3, None].astype(np.float64) - scores[None, losers]
  expected = np.mean(np.logaddexp(0.0, -diffs))
  value = losses.pairwise_ranking_loss(scores, reached_prev, converted)
  assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_all_losses_jit():

  def combined(probs, logits, labels, ziln_logits, core, weight):
    return jnp.stack([
        losses.bce(probs[:, 0], labels[:, 0], weight),
        losses.mse(core, core * 0.5, weight),
        losses.ziln_loss(ziln_logits, core, weight),
        jnp.mean(losses.ziln_mean(ziln_logits)),
        losses.aitm_calibrator(probs, 0.6),
        losses.tafe_dtl_loss(probs, labels),
        jnp.sum(losses.pairwise_ranking_total(logits, labels, weight)),
    ])

  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
  labels = jnp.asarray(rng.random((16, 2)) < 0.5, jnp.float32)
  labels = labels.at[:, 1].multiply(labels[:, 0])  # sequential constraint
  args = (jax.nn.sigmoid(logits), logits, labels,
          jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
          jnp.asarray(rng.lognormal(size=16) * (rng.random(16) < 0.5), jnp.float32),
          jnp.ones(16).at[-2:].set(0.0))
  eager = combined(*args)
  jitted = jax.jit(combined)(*args)
  assert jitted.shape == (7,)
  assert np.all(np.isfinite(jitted))
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)

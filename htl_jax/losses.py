"""Task losses for hybrid targets (pure ``jax.numpy``, jit-able, scalar outputs).

* ``bce`` / ``bce_with_logits``: the binary task losses ``L_t`` (paper Eq. 1).
* ``mse``: the core loss ``L_core`` of the MSE head.
* ``ziln_loss`` / ``ziln_mean``: the zero-inflated lognormal head of Wang, Liu,
  Miao 2019 (arXiv 1912.07753, Eq. 2-4), with the reference code's scale floor
  ``sigma = max(softplus(s), sqrt(1e-7))``.
* ``aitm_calibrator``: AITM's behavioural expectation calibrator (Xi et al.
  KDD 2021, Eq. 11), penalizing ``p_t > p_{t-1}``.
* ``tafe_dtl_loss``: our reconstruction of TAFE's dependence task learning loss
  (Tao et al. RecSys 2023) over the outcomes "stopped after step k".
* ``pairwise_ranking_loss`` / ``pairwise_ranking_total``: the in-batch pairwise
  ranking loss of Durmus et al. 2024 for every binary step after the first.

Every loss averages over the leading batch axis. ``bce``, ``bce_with_logits``,
``mse`` and ``ziln_loss`` (and the auxiliary losses) take an optional
``weight`` of shape ``[B]`` (1 for real rows, 0 for padding) and then return
the weighted mean; a batch whose weights are all zero gives 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

PROB_EPS = 1e-7
ZILN_EPS = 1e-7
_LOG_2PI = math.log(2.0 * math.pi)


def _batch_mean(per_example: Array, weight: Array | None) -> Array:
  """Mean over the batch axis (weighted when ``weight`` is given), then the rest."""
  if per_example.ndim > 1:
    per_example = jnp.mean(per_example.reshape(per_example.shape[0], -1), axis=1)
  if weight is None:
    return jnp.mean(per_example)
  weight = jnp.asarray(weight, per_example.dtype).reshape(-1)
  total = jnp.sum(weight)
  return jnp.sum(weight * per_example) / jnp.maximum(total, jnp.finfo(per_example.dtype).tiny)


def _float(x: Array, dtype: jnp.dtype | None = None) -> Array:
  """``x`` as a jax array of ``dtype``, or of its own float dtype (ints -> float32)."""
  x = jnp.asarray(x)
  if dtype is not None:
    return x.astype(dtype)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def bce(probs: Array, labels: Array, weight: Array | None = None) -> Array:
  """Binary cross-entropy on probabilities clamped to ``[1e-7, 1 - 1e-7]`` (Eq. 1).

  Args:
    probs: ``[B]`` or ``[B, ...]`` predicted probabilities.
    labels: same shape, in ``{0, 1}``.
    weight: optional ``[B]`` row weights.

  Returns:
    Scalar mean loss.
  """
  probs = _float(probs)
  labels = _float(labels, probs.dtype)
  # Clamping p and 1 - p separately keeps the lower bound 1e-7 exact for both
  # logs in float32, where 1 - 1e-7 itself would round to 1 - 1.19e-7.
  p = jnp.clip(probs, PROB_EPS, 1.0 - PROB_EPS)
  q = jnp.clip(1.0 - probs, PROB_EPS, 1.0 - PROB_EPS)
  per_example = -(labels * jnp.log(p) + (1.0 - labels) * jnp.log(q))
  return _batch_mean(per_example, weight)


def _bce_with_logits_elementwise(logits: Array, labels: Array) -> Array:
  """``softplus(z) - y z``; ``jax.nn.softplus`` is stable with exact gradients."""
  return jax.nn.softplus(logits) - labels * logits


def bce_with_logits(logits: Array, labels: Array, weight: Array | None = None) -> Array:
  """Numerically stable binary cross-entropy on logits; finite for any finite logit."""
  logits = _float(logits)
  labels = _float(labels, logits.dtype)
  return _batch_mean(_bce_with_logits_elementwise(logits, labels), weight)


def mse(pred: Array, target: Array, weight: Array | None = None) -> Array:
  """Mean squared error, the core loss of the MSE head."""
  pred = _float(pred)
  target = _float(target, pred.dtype)
  return _batch_mean(jnp.square(pred - target), weight)


def _ziln_params(logits: Array) -> tuple[Array, Array, Array]:
  """Splits ``[B, 3]`` logits into ``(l, mu, sigma)`` with the scale floor."""
  logits = _float(logits)
  l, mu, s = logits[..., 0], logits[..., 1], logits[..., 2]
  sigma = jnp.maximum(jax.nn.softplus(s), math.sqrt(ZILN_EPS))
  return l, mu, sigma


def ziln_loss(logits: Array, y: Array, weight: Array | None = None) -> Array:
  """Zero-inflated lognormal loss (Wang et al. 2019, Eq. 2-3).

  ``BCE(1[y > 0], l) - 1[y > 0] * log LogNormal(y; mu, sigma)`` per example,
  averaged over the batch, where
  ``log LogNormal(y; mu, sigma) = -log y - log sigma - log(2 pi) / 2
  - (log y - mu)^2 / (2 sigma^2)``.

  Args:
    logits: ``[B, 3]`` head outputs ``[l, mu, s]``.
    y: ``[B]`` non-negative targets on the original scale.
    weight: optional ``[B]`` row weights.

  Returns:
    Scalar mean loss.
  """
  l, mu, sigma = _ziln_params(logits)
  y = _float(y, l.dtype)
  positive = (y > 0.0).astype(l.dtype)
  classification = _bce_with_logits_elementwise(l, positive)
  log_y = jnp.log(jnp.where(y > 0.0, y, 1.0))  # zeros never reach the log
  log_pdf = (-log_y - jnp.log(sigma) - 0.5 * _LOG_2PI
             - jnp.square(log_y - mu) / (2.0 * jnp.square(sigma)))
  return _batch_mean(classification - positive * log_pdf, weight)


def ziln_mean(logits: Array) -> Array:
  """Expected value of the ZILN head, ``sigmoid(l) * exp(mu + sigma^2 / 2)`` (Eq. 4).

  Args:
    logits: ``[B, 3]`` head outputs ``[l, mu, s]``.

  Returns:
    ``[B]`` predictions on the original scale.
  """
  l, mu, sigma = _ziln_params(logits)
  return jax.nn.sigmoid(l) * jnp.exp(mu + 0.5 * jnp.square(sigma))


def aitm_calibrator(probs: Array, alpha: float, weight: Array | None = None) -> Array:
  """AITM behavioural expectation calibrator (Xi et al. 2021, Eq. 11).

  ``alpha * mean_b sum_{t >= 2} max(p_t - p_{t-1}, 0)``: penalizes a later step
  predicted more likely than the one before it. 0 for a single task.

  Args:
    probs: ``[B, T]`` probabilities of the binary chain, in order.
    alpha: calibrator weight.
    weight: optional ``[B]`` row weights.

  Returns:
    Scalar penalty.
  """
  probs = _float(probs)
  violation = jnp.maximum(probs[:, 1:] - probs[:, :-1], 0.0)
  return alpha * _batch_mean(jnp.sum(violation, axis=1), weight)


def tafe_dtl_loss(probs: Array, labels: Array, weight: Array | None = None) -> Array:
  """Dependence task learning loss of TAFE (our reconstruction, DESIGN section 5).

  With ``p_0 = 1``, ``p_{T+1} = 0``, ``y_0 = 1``, ``y_{T+1} = 0``, the outcomes
  "stopped after step k" (k = 0..T) are mutually exclusive with probability
  ``p_k - p_{k+1}`` for monotone ``p``. The loss is their negative log-likelihood
  ``-mean_b sum_k 1[y_k = 1, y_{k+1} = 0] log(max(p_k - p_{k+1}, 1e-7))``.

  Args:
    probs: ``[B, T]`` probabilities ``p_1..p_T`` of reaching each step.
    labels: ``[B, T]`` binary labels ``y_1..y_T``.
    weight: optional ``[B]`` row weights.

  Returns:
    Scalar mean loss.
  """
  probs = _float(probs)
  labels = _float(labels, probs.dtype)
  batch = probs.shape[0]
  ones = jnp.ones((batch, 1), probs.dtype)
  zeros = jnp.zeros((batch, 1), probs.dtype)
  p = jnp.concatenate([ones, probs, zeros], axis=1)  # [B, T + 2]
  y = jnp.concatenate([ones, labels, zeros], axis=1)
  stopped_after = y[:, :-1] * (1.0 - y[:, 1:])  # [B, T + 1], k = 0..T
  log_outcome = jnp.log(jnp.maximum(p[:, :-1] - p[:, 1:], PROB_EPS))
  return _batch_mean(-jnp.sum(stopped_after * log_outcome, axis=1), weight)


@jax.jit
def _pairwise_sum_count(scores: Array, winner: Array, loser: Array) -> tuple[Array, Array]:
  """Sum of ``softplus(-(s_i - s_j))`` over pairs with ``winner_i * loser_j`` and the pair count.

  Jitted so the ``[B, B]`` intermediates are fused instead of materialized.
  """
  pair_mask = winner[:, None] * loser[None, :]
  pair_loss = jax.nn.softplus(scores[None, :] - scores[:, None])  # [i, j]: -(s_i - s_j)
  return jnp.sum(pair_mask * pair_loss), jnp.sum(pair_mask)


def pairwise_ranking_loss(
    scores: Array,
    reached_prev: Array,
    converted: Array,
    weight: Array | None = None,
) -> Array:
  """In-batch pairwise ranking loss for one conversion step (Durmus et al. 2024).

  Over all pairs ``(i, j)`` with ``converted_i = 1`` and ``reached_prev_j = 1,
  converted_j = 0``: ``mean log(1 + exp(-(s_i - s_j)))``. 0 when there is no
  such pair. Memory is one ``[B, B]`` float array at most (B = 8192 is fine).

  Args:
    scores: ``[B]`` scores (logits) of the step.
    reached_prev: ``[B]`` labels of the previous step.
    converted: ``[B]`` labels of this step.
    weight: optional ``[B]`` row weights; rows with weight 0 join no pair.

  Returns:
    Scalar mean loss over the pairs.
  """
  scores = _float(scores).reshape(-1)
  converted = _float(converted, scores.dtype).reshape(-1)
  reached_prev = _float(reached_prev, scores.dtype).reshape(-1)
  winner = converted
  loser = reached_prev * (1.0 - converted)
  if weight is not None:
    weight = _float(weight, scores.dtype).reshape(-1)
    winner = winner * weight
    loser = loser * weight
  total, count = _pairwise_sum_count(scores, winner, loser)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def pairwise_ranking_total(
    logits: Array, labels: Array, weight: Array | None = None) -> Array:
  """Pairwise ranking loss of every binary task.

  Args:
    logits: ``[B, T]`` logits of the binary chain.
    labels: ``[B, T]`` binary labels.
    weight: optional ``[B]`` row weights.

  Returns:
    ``[T]``: entry ``t >= 1`` is ``pairwise_ranking_loss(logits[:, t],
    labels[:, t - 1], labels[:, t])``; entry 0 is 0 (the first step has no
    previous step).
  """
  logits = _float(logits)
  labels = _float(labels, logits.dtype)
  per_task = [jnp.zeros((), logits.dtype)]
  for t in range(1, logits.shape[1]):
    per_task.append(
        pairwise_ranking_loss(logits[:, t], labels[:, t - 1], labels[:, t], weight))
  return jnp.stack(per_task)

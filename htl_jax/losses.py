"""The training objective: task losses, core heads and transforms, the per-task loss terms.

One home for everything the loss is made of (docs/design.md: ``L = L_core + sum_t L_t``).
Losses are pure ``jax.numpy``, jit-able, with scalar outputs:

* ``bce``: the binary task losses ``L_t`` on clamped probabilities (paper Eq. 8; optax's
  ``sigmoid_binary_cross_entropy`` takes logits, and our towers give probabilities).
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

Every loss averages over the leading batch axis. ``bce``, ``mse`` and ``ziln_loss`` (and
the auxiliary losses) take an optional ``weight`` of shape ``[B]`` (1 for real rows, 0 for
padding) and then return the weighted mean; a batch whose weights are all zero gives 0.

The core head (docs/design.md): :class:`CoreTransform` (``none`` | ``standardize`` |
``log1p``, fitted on train) with :func:`core_loss` (MSE on the transformed target, or ZILN on
raw values) and :func:`core_prediction` (back on the original scale, so metrics are always
on it). :class:`TrainingObjective` turns a model's output into the per-task losses (K terms, core
last), which the per-task gradients differentiate.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from htl_jax.metrics import PROB_EPS
from htl_jax.models.interface import HybridModel, ModelOutput

Array = jax.Array

ZILN_EPS = 1e-7     # the reference code's variance floor (module docstring)
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
  """Binary cross-entropy on probabilities clamped to ``[1e-7, 1 - 1e-7]`` (Eq. 8).

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
  """``softplus(z) - y z``, ZILN's classification term; ``jax.nn.softplus`` is stable with
  exact gradients (optax's sigmoid BCE writes the same function with two log-sigmoids, which
  rounds differently)."""
  return jax.nn.softplus(logits) - labels * logits


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
  """Dependence task learning loss of TAFE (our reconstruction, docs/design.md).

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


# ----------------------------------------------------------------------------- core head


CORE_TRANSFORMS = ('none', 'standardize', 'log1p')


@dataclasses.dataclass(frozen=True)
class CoreTransform:
  """An invertible map of the core target, fitted on the train split."""

  kind: str = 'none'
  mean: float = 0.0
  std: float = 1.0
  target_mean: float = 0.0   # training mean of the transformed target (the head's init bias)

  @classmethod
  def fit(cls, kind: str, core_train: np.ndarray) -> 'CoreTransform':
    if kind not in CORE_TRANSFORMS:
      raise ValueError(f'core_transform must be one of {CORE_TRANSFORMS}, got {kind!r}')
    core_train = np.asarray(core_train, np.float64)
    if kind == 'standardize':
      std = float(np.std(core_train))
      return cls(kind, float(np.mean(core_train)), std if std > 0 else 1.0, 0.0)
    if kind == 'log1p':
      return cls(kind, target_mean=float(np.mean(np.log1p(core_train))))
    return cls(kind, target_mean=float(np.mean(core_train)))

  def forward(self, y: jax.Array) -> jax.Array:
    if self.kind == 'standardize':
      return (y - self.mean) / self.std
    if self.kind == 'log1p':
      return jnp.log1p(y)
    return y

  def inverse(self, z: jax.Array) -> jax.Array:
    if self.kind == 'standardize':
      return z * self.std + self.mean
    if self.kind == 'log1p':
      return jnp.expm1(z)
    return z


def core_loss(head: str, core_out: jax.Array, core: jax.Array,
              transform: CoreTransform, weight: jax.Array | None = None) -> jax.Array:
  """The core task's loss: MSE on the transformed target, or the ZILN loss on raw values."""
  if head == 'ziln':
    return ziln_loss(core_out, core, weight=weight)
  return mse(core_out[:, 0], transform.forward(core), weight=weight)


def core_prediction(head: str, core_out: jax.Array, transform: CoreTransform) -> jax.Array:
  """Point prediction of the core value on the original scale, ``[B]``."""
  if head == 'ziln':
    return ziln_mean(core_out)
  return transform.inverse(core_out[:, 0])


# ----------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True)
class TrainingObjective:
  """Static loss settings (hashable, bound into the jitted step)."""

  head: str
  core_transform: CoreTransform
  aitm_alpha: float = 0.0
  tafe_dtl_weight: float = 0.0
  lambda_pair: float = 0.0
  binary_losses: bool = True    # False: a single-task core model (its class fact)

  @classmethod
  def from_config(cls, config, core_transform: CoreTransform,
                  model: type[HybridModel]) -> 'TrainingObjective':
    """The objective of ``config`` for a model of class ``model`` (its class facts say
    which auxiliary loss it trains and whether it trains the binary tasks)."""
    return cls(head=config['head'], core_transform=core_transform,
               aitm_alpha=(float(config['aitm_alpha'])
                           if model.auxiliary_loss == 'aitm_calibrator' else 0.0),
               tafe_dtl_weight=(float(config['tafe_dtl_weight'])
                                if model.auxiliary_loss == 'tafe_dtl' else 0.0),
               lambda_pair=float(config['lambda_pair']),
               binary_losses=model.trains_binary_tasks)

  def loss_terms(self, out: ModelOutput, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, ...]:
    """Per-task losses of one batch, K scalars, core last (weighted means over real examples).

    Binary task ``t`` reads ``out.task_probs[t]`` where the model sets them, so (without an
    auxiliary loss that ties the tasks) its term depends on its own tower only.
    """
    y, weight = batch['y'], batch['weight']
    num_binary = y.shape[1]
    core = core_loss(self.head, out.core, batch['core'], self.core_transform, weight)
    if not self.binary_losses:
      return (jnp.zeros_like(core),) * num_binary + (core,)
    probs = (out.task_probs if out.task_probs is not None
             else [out.probs[:, t] for t in range(num_binary)])
    binary = [bce(probs[t], y[:, t], weight=weight) for t in range(num_binary)]
    extra = self._auxiliary_losses(out.probs, y)
    if extra is not None:
      binary = [term + extra[t] for t, term in enumerate(binary)]
    return (*binary, core)

  def _auxiliary_losses(self, probs: jax.Array, y: jax.Array) -> jax.Array | None:
    """``[T]`` AITM / TAFE / pairwise terms added to the binary losses; None if all are off."""
    if not (self.aitm_alpha or self.tafe_dtl_weight or self.lambda_pair):
      return None
    extra = jnp.zeros((y.shape[1],), probs.dtype)
    if self.aitm_alpha:
      extra = extra.at[-1].add(aitm_calibrator(probs, self.aitm_alpha))
    if self.tafe_dtl_weight:
      extra = extra.at[-1].add(self.tafe_dtl_weight * tafe_dtl_loss(probs, y))
    if self.lambda_pair:
      clipped = jnp.clip(probs, PROB_EPS, 1 - PROB_EPS)
      scores = jnp.log(clipped) - jnp.log1p(-clipped)
      extra = extra + self.lambda_pair * pairwise_ranking_total(scores, y)
    return extra

  def predict_core(self, out: ModelOutput) -> jax.Array:
    """Core predictions on the original scale, ``[B]``."""
    return core_prediction(self.head, out.core, self.core_transform)

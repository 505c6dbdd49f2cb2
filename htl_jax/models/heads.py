"""Core-task heads: MSE on a transformed target, or ZILN (Wang, Liu, Miao 2019).

The MSE head regresses ``core_transform(y)`` (``none`` | ``standardize`` | ``log1p``, fitted on
train) and predictions are mapped back, so metrics are always on the original scale. The
ZILN head outputs logits ``[l, mu, s]`` and predicts ``sigmoid(l) * exp(mu + sigma^2 / 2)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from htl_jax import losses

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
    return losses.ziln_loss(core_out, core, weight=weight)
  return losses.mse(core_out[:, 0], transform.forward(core), weight=weight)


def core_prediction(head: str, core_out: jax.Array, transform: CoreTransform) -> jax.Array:
  """Point prediction of the core value on the original scale, ``[B]``."""
  if head == 'ziln':
    return losses.ziln_mean(core_out)
  return transform.inverse(core_out[:, 0])

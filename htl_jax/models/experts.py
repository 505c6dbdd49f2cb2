"""Mixture-of-experts building blocks shared by the MMoE, PLE, AdaTT and TAFE baselines.

- :class:`ExpertBank`: ``n`` independent ReLU MLP experts over one input, returning
  ``[B, n, D]``.
- :class:`SoftmaxGate`: a linear gate followed by a softmax over ``n`` items,
  ``g(x) = softmax(W x)`` (MMoE Eq. 5, PLE Eq. 3, AdaTT Eq. 4).
- :func:`mix`: the gate-weighted sum of expert outputs, ``sum_i g_i(x) f_i(x)``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.models.layers import MLP, XAVIER


class ExpertBank(nn.Module):
  """``num`` experts with the same architecture and separate parameters.

  Every expert reads the same input ``x [B, I]``; the output is ``[B, num, dims[-1]]``.
  The experts run one by one as plain 2-D matmuls: on XLA:CPU that is about a third faster
  (forward and backward) than one ``nn.vmap``-batched matmul over the expert axis.
  """

  dims: Sequence[int]
  num: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.num < 1:
      raise ValueError(f'an expert bank needs at least one expert, got {self.num}')
    outputs = [MLP(self.dims, name=f'expert_{i}')(x)[-1] for i in range(self.num)]
    return jnp.stack(outputs, axis=1)


class SoftmaxGate(nn.Module):
  """Sample-wise gate ``softmax(W x + b)`` over ``num`` items: ``[B, I] -> [B, num]``."""

  num: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    logits = nn.Dense(self.num, kernel_init=XAVIER, name='logits')(x)
    return jax.nn.softmax(logits, axis=-1)


def mix(weights: jax.Array, experts: jax.Array) -> jax.Array:
  """Gate-weighted sum of expert outputs: ``[B, n], [B, n, D] -> [B, D]``."""
  return jnp.einsum('bn,bnd->bd', weights, experts)

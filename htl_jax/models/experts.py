"""Mixture-of-experts building blocks shared by the MMoE, PLE, AdaTT and TAFE baselines.

- :class:`ExpertBank`: ``n`` independent ReLU MLP experts over one input, evaluated as one
  batched computation (``nn.vmap`` over the expert axis), returning ``[B, n, D]``.
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


class _Expert(nn.Module):
  """One expert: a ReLU MLP; returns its last hidden layer."""

  dims: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return MLP(self.dims, name='mlp')(x)[-1]


class ExpertBank(nn.Module):
  """``num`` experts with the same architecture and separate parameters.

  Every expert reads the same input ``x [B, I]``; the output is ``[B, num, dims[-1]]``.
  Parameters carry a leading expert axis of size ``num``.
  """

  dims: Sequence[int]
  num: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.num < 1:
      raise ValueError(f'an expert bank needs at least one expert, got {self.num}')
    experts = nn.vmap(
        _Expert,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=None,
        out_axes=1,
        axis_size=self.num,
    )
    return experts(self.dims, name='experts')(x)


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

"""Mixture-of-experts building blocks shared by the MMoE, PLE, AdaTT and TAFE baselines.

- :class:`ExpertBank`: ``n`` independent ReLU MLP experts over one input, returning
  ``[B, n, D]``.
- :class:`ExpertWeights` and :func:`apply_banks`: the same experts' parameters, and several
  banks applied together (PLE's and AdaTT's levels, whose banks may read one input).
- :class:`SoftmaxGate`: a linear gate followed by a softmax over ``n`` items,
  ``g(x) = softmax(W x)`` (MMoE Eq. 5, PLE Eq. 3, AdaTT Eq. 4).
- :func:`mix`: the gate-weighted sum of expert outputs, ``sum_i g_i(x) f_i(x)``.

The experts keep one parameter per expert and layer (``expert_<i>/dense_<j>/{kernel,bias}``,
as ``nn.Dense`` creates them, so per-parameter gradient processes such as MetaBalance see
each expert's layers separately), but run as few, large matmuls: the first layers of all
experts that read the same input are ONE matmul over their kernels concatenated along the
output axis (``x @ [W_1 | ... | W_n]``), and every deeper layer is ONE batched matmul over
the experts' stacked kernels (expert axis leading): fewer, larger matmuls than one 2-D
matmul per expert and layer, or a ``'bnd,nde->bne'`` einsum (docs/benchmarks.md has the
measurements).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.models.layers import XAVIER

# One bank's weights: per layer, (kernels [n, in, out], biases [n, out]).
BankWeights = list[tuple[jax.Array, jax.Array]]


class _DenseWeights(nn.Module):
  """The ``kernel`` and ``bias`` of one ``nn.Dense`` layer (same names, shapes and init)."""

  in_features: int
  features: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', XAVIER, (self.in_features, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return kernel, bias


class _MLPWeights(nn.Module):
  """The parameters of one ReLU MLP expert, as ``layers.MLP`` names them (``dense_<j>``)."""

  in_features: int
  dims: Sequence[int]

  @nn.compact
  def __call__(self) -> list[tuple[jax.Array, jax.Array]]:
    sizes = [self.in_features, *self.dims]
    return [_DenseWeights(sizes[j], sizes[j + 1], name=f'dense_{j}')()
            for j in range(len(self.dims))]


def _bank_weights(dims: Sequence[int], num: int, in_features: int) -> BankWeights:
  """Declares ``expert_<i>`` MLPs in the calling module; per layer, stacked over experts."""
  if num < 1:
    raise ValueError(f'an expert bank needs at least one expert, got {num}')
  experts = [_MLPWeights(in_features, tuple(dims), name=f'expert_{i}')() for i in range(num)]
  return [(jnp.stack([e[j][0] for e in experts]), jnp.stack([e[j][1] for e in experts]))
          for j in range(len(dims))]


class ExpertWeights(nn.Module):
  """The parameters of ``num`` experts reading ``in_features`` inputs, not applied.

  Its parameters are those of an :class:`ExpertBank` of the same name, so a model can
  declare several banks and run them together with :func:`apply_banks`.
  """

  dims: Sequence[int]
  num: int
  in_features: int

  @nn.compact
  def __call__(self) -> BankWeights:
    return _bank_weights(self.dims, self.num, self.in_features)


def apply_banks(banks: Sequence[BankWeights], inputs: Sequence[jax.Array]
                ) -> list[jax.Array]:
  """Every bank's experts on its input: ``[B, n_b, D]`` per bank.

  Banks whose inputs are the same array (``is``) share one first-layer matmul over all
  their kernels concatenated; deeper layers run as one batched matmul per bank.
  """
  groups: list[list[int]] = []
  for b, x in enumerate(inputs):
    for group in groups:
      if inputs[group[0]] is x:
        group.append(b)
        break
    else:
      groups.append([b])
  outputs: list[jax.Array] = [None] * len(banks)  # type: ignore[list-item]
  for group in groups:
    x = inputs[group[0]]
    kernels = jnp.concatenate([banks[b][0][0] for b in group])      # [n, I, D]
    biases = jnp.concatenate([banks[b][0][1] for b in group])       # [n, D]
    n, in_dim, width = kernels.shape
    wide = jnp.transpose(kernels, (1, 0, 2)).reshape(in_dim, n * width)
    hidden = nn.relu(x @ wide + biases.reshape(-1)).reshape(x.shape[0], n, width)
    start = 0
    for b in group:
      size = banks[b][0][0].shape[0]
      outputs[b] = _deeper_layers(banks[b][1:], hidden[:, start:start + size])
      start += size
  return outputs


def _deeper_layers(layers: BankWeights, hidden: jax.Array) -> jax.Array:
  """Layers 2.. of a bank: ``[B, n, D] -> [B, n, D']``, one batched matmul per layer.

  The expert axis leads inside (``[n, B, D]``): XLA:CPU runs a batched matmul whose batch
  axis is the leading one of both operands without transposing around every layer.
  """
  if not layers:
    return hidden
  hidden = jnp.transpose(hidden, (1, 0, 2))
  for kernels, biases in layers:
    hidden = nn.relu(jnp.einsum('nbd,nde->nbe', hidden, kernels) + biases[:, None, :])
  return jnp.transpose(hidden, (1, 0, 2))


class ExpertBank(nn.Module):
  """``num`` experts with the same architecture and separate parameters.

  Every expert reads the same input ``x [B, I]``; the output is ``[B, num, dims[-1]]``.
  """

  dims: Sequence[int]
  num: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return apply_banks([_bank_weights(self.dims, self.num, x.shape[-1])], [x])[0]


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

"""Building blocks shared by HTLNet and the baselines.

- :class:`Tower`: the per-task MLP ``[128, 64, 32]`` with ReLU and Xavier init (Appendix B.1);
  it also returns the output of its FIRST hidden layer, the transferred representation
  ``rep^t`` of HTLNet.
- :class:`LabelEmbedding`: the Label Embedding Unit (LEU, Eq. 11-12) with Gumbel-softmax.
- :class:`AttentionFusion` / :class:`ConcatFusion`: the Information Fusion Unit (IFU,
  Eq. 13-14) and its concatenation ablation.
- :func:`flatten_fields`: ``[B, F, d] -> [B, F*d]``, the concatenated field embeddings ``e``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.metrics import PROB_EPS

XAVIER = nn.initializers.xavier_uniform()


def flatten_fields(emb: jax.Array) -> jax.Array:
  """Concatenate the field embeddings: ``[B, F, d] -> [B, F*d]`` (the vector ``e``)."""
  return emb.reshape(emb.shape[0], -1)


class PartsDense(nn.Module):
  """``nn.Dense`` on ``concat(parts, -1)`` without materialising the concatenation.

  ``y = sum_i x_i @ W[rows of part i] + b``: the same parameters (``kernel`` of shape
  ``[sum of part widths, features]``, ``bias``) and the same values as a Dense layer on the
  concatenated input, but no ``[B, sum of widths]`` copy, and the backward pass computes
  input gradients only for the parts that need them (a stop-gradient part gets none).
  """

  features: int

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    widths = [x.shape[-1] for x in parts]
    kernel = self.param('kernel', XAVIER, (sum(widths), self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    starts = [sum(widths[:i]) for i in range(len(parts))]
    # The widest part (the embeddings e) first, so the big matmul leads the sum.
    order = sorted(range(len(parts)), key=lambda i: -widths[i])
    out = None
    for i in order:
      term = parts[i] @ kernel[starts[i]:starts[i] + widths[i]]
      out = term if out is None else out + term
    return out + bias


class MLP(nn.Module):
  """ReLU MLP with Xavier-initialised kernels; returns every hidden layer's output.

  The input is one array, or a list (or tuple) of parts whose concatenation is the input
  (the first layer is then a :class:`PartsDense`, with the parameters of a Dense layer).
  """

  dims: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> list[jax.Array]:
    hidden = []
    for i, dim in enumerate(self.dims):
      if i == 0 and isinstance(x, (list, tuple)):
        x = nn.relu(PartsDense(dim, name='dense_0')(x))
      else:
        x = nn.relu(nn.Dense(dim, kernel_init=XAVIER, name=f'dense_{i}')(x))
      hidden.append(x)
    return hidden


class Tower(nn.Module):
  """A task tower: MLP then a linear output of ``out_dim`` units.

  Returns ``(output, rep)`` where ``rep`` is the first hidden layer's output (Appendix B.1:
  the representation HTLNet transfers to later tasks). ``x`` may be a sequence of parts of
  the input (see :class:`MLP`).
  """

  dims: Sequence[int]
  out_dim: int = 1
  out_bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    hidden = MLP(self.dims, name='mlp')(x)
    out = nn.Dense(self.out_dim, kernel_init=XAVIER, bias_init=self.out_bias_init,
                   name='out')(hidden[-1])
    return out, hidden[0]


def gumbel_noise(key: jax.Array, shape: tuple[int, ...],
                 example_index: Optional[jax.Array]) -> jax.Array:
  """Gumbel(0, 1) noise ``[B, *shape]``, drawn per example from ``fold_in(key, index)``.

  Keying the noise by the example's position in the split (not by its place in the local
  batch) gives the same noise for the same example on 1 or N devices.
  """
  if example_index is None:
    raise ValueError('gumbel_noise needs example_index')
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_index)
  return jax.vmap(lambda k: jax.random.gumbel(k, shape))(keys)


class LabelEmbedding(nn.Module):
  """Label Embedding Unit (LEU), Eq. 11-12 of the paper.

  ``p = softmax(([log(1 - yhat), log(yhat)] + g) / tau)`` and ``le = p @ E`` with a table
  ``E in R^{2 x L_d}`` (row 0 = label 0, row 1 = label 1). ``g`` is Gumbel noise (training
  only, when enabled) and ``yhat`` is clamped to ``[1e-7, 1 - 1e-7]``.
  """

  dim: int

  @nn.compact
  def __call__(self, prob: jax.Array, tau: jax.Array,
               noise: Optional[jax.Array] = None) -> jax.Array:
    table = self.param('table', XAVIER, (2, self.dim))
    prob = jnp.clip(prob, PROB_EPS, 1.0 - PROB_EPS)
    log_probs = jnp.stack([jnp.log1p(-prob), jnp.log(prob)], axis=-1)
    if noise is not None:
      log_probs = log_probs + noise
    weights = jax.nn.softmax(log_probs / tau, axis=-1)
    return weights @ table


class AttentionFusion(nn.Module):
  """Information Fusion Unit (IFU), Eq. 13-14.

  For the vectors ``x^1..x^t`` of the preceding tasks:
  ``w_u = softmax_u(<h2(x^u), h3(x^u)> / sqrt(k))`` and ``out = sum_u w_u h1(x^u)`` with
  ``h1, h2, h3`` Dense(k). The paper writes Eq. 13's list from ``e^0``; the list here starts
  at the first task (docs/design.md says why: the shared embedding is every tower's input
  already, and is of another width).
  """

  dim: int

  @nn.compact
  def __call__(self, items: Sequence[jax.Array]) -> jax.Array:
    in_dim, k = items[0].shape[-1], self.dim
    w1, w2, w3 = (self.param(f'{n}_kernel', XAVIER, (in_dim, k)) for n in ('h1', 'h2', 'h3'))
    b1, b2, b3 = (self.param(f'{n}_bias', nn.initializers.zeros, (k,))
                  for n in ('h1', 'h2', 'h3'))
    if len(items) == 1:                     # softmax over one item: w = 1
      return items[0] @ w1 + b1
    # Since the weights sum to 1, sum_u w_u h1(x^u) = h1(sum_u w_u x^u): h1 runs once on
    # the weighted input; h2 and h3 run as one matmul per item.
    w23, b23 = jnp.concatenate([w2, w3], axis=1), jnp.concatenate([b2, b3])
    scores = []
    for x in items:
      h = x @ w23 + b23
      scores.append(jnp.sum(h[:, :k] * h[:, k:], axis=-1))
    weights = jax.nn.softmax(jnp.stack(scores) / jnp.sqrt(float(k)), axis=0)   # [U, B]
    mixed = sum(weights[u][:, None] * x for u, x in enumerate(items))        # [B, in]
    return mixed @ w1 + b1


class ConcatFusion(nn.Module):
  """Ablation ``fusion='concat'``: concatenate ``x^1..x^t`` and project with Dense(k)."""

  dim: int

  @nn.compact
  def __call__(self, items: Sequence[jax.Array]) -> jax.Array:
    return nn.Dense(self.dim, kernel_init=XAVIER, name='proj')(jnp.concatenate(items, -1))


def make_fusion(kind: str, dim: int, name: str) -> nn.Module:
  """The IFU (``'attention'``) or its ablation (``'concat'``)."""
  if kind == 'attention':
    return AttentionFusion(dim, name=name)
  if kind == 'concat':
    return ConcatFusion(dim, name=name)
  raise ValueError(f"fusion must be 'attention' or 'concat', got {kind!r}")

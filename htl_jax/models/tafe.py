"""TAFE baseline: task-aware feature extraction with monotone chain probabilities.

Seed paper 2 of the project: Tao et al., "Task Aware Feature Extraction Framework for
Sequential Dependence Multi-Task Learning", RecSys 2023 (https://doi.org/10.1145/3604915.3608772).
Only the paper's abstract is available to us, so this module is OUR RECONSTRUCTION from it
(docs/design.md), not the authors' architecture:

(a) task-aware feature extraction: for task ``t`` a sample-wise gate
    ``a^t = softmax(W_t e + b_t)`` over the ``F`` field embeddings (``e = flatten(embs[0])``)
    re-weights them, ``x^t_f = F * a^t_f * emb_f`` (the factor ``F`` makes a uniform gate the
    identity), and a task-specific expert (ReLU MLP ``cfg.shared_dims``, [128, 64], then a
    [32] tower) feeds task ``t``'s tower;
(b) monotone probabilities ``p_t = p_{t-1} * sigmoid(z_t)`` with ``p_0 = 1``, where ``z_t``
    is tower ``t``'s logit; the core task has its own gate, expert and tower.

(c) the dependence task learning loss is :func:`htl_jax.losses.tafe_dtl_loss`, applied by the
trainer. The gates read the shared input and ``p_t`` reads towers ``1..t``, so
``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.models import experts as moe
from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class TaskAwareExtractor(nn.Module):
  """Field gate, re-weighting and task-specific expert: ``[B, F, d] -> [B, D]``."""

  expert_dims: Sequence[int]

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    num_fields = emb.shape[1]
    gate = moe.SoftmaxGate(num_fields, name='field_gate')(layers.flatten_fields(emb))
    reweighted = emb * (num_fields * gate)[:, :, None]
    return layers.MLP(self.expert_dims, name='expert')(layers.flatten_fields(reweighted))[-1]


class TAFE(HybridModel):
  """Reconstructed TAFE: per-task field gates and experts, ``p_t = p_{t-1} sigmoid(z_t)``."""

  splits_hidden_dims = True
  auxiliary_loss = 'tafe_dtl'

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    extracted = [TaskAwareExtractor(self.cfg.shared_dims, name=f'extractor_{t}')(embs[0])
                 for t in range(self.spec.num_tasks)]
    logits, core = self.towers(extracted, self.cfg.tower_dims)
    return ModelOutput(jnp.cumprod(jax.nn.sigmoid(logits), axis=-1), core)

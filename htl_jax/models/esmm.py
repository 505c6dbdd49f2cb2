"""ESMM baseline: Entire Space Multi-task Model, generalized to a T-step chain.

Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate", SIGIR 2018 (https://doi.org/10.1145/3209978.3210104).

ESMM models ``pCTCVR = pCTR * pCVR`` (Eq. 2) so that every probability is trained over the
entire impression space. For the chain ``y^1 >= y^2 >= ... >= y^T`` tower ``t`` outputs the
conditional probability ``q_t = P(y^t = 1 | y^{t-1} = 1)`` (``q_1 = P(y^1 = 1)``) and the
model returns ``p_t = prod_{u <= t} q_u``, monotone non-increasing in ``t``; the losses are
applied to ``p_t`` only, as in the paper. The core task has its own tower. All towers read
``e = flatten(embs[0])`` and ``p_t`` reads towers ``1..t``, so ``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class ESMM(HybridModel):
  """Chain ESMM: ``p_t = q_1 * ... * q_t`` with a conditional tower per step."""

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    e = layers.flatten_fields(embs[0])
    logits, core = self.towers([e] * self.spec.num_tasks, self.cfg.hidden_dims)
    return ModelOutput(jnp.cumprod(jax.nn.sigmoid(logits), axis=-1), core)  # p_t = prod q_u

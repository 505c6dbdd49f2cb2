"""MMoE baseline: Multi-gate Mixture-of-Experts.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (https://doi.org/10.1145/3219819.3220007).
``cfg.num_experts`` shared experts (ReLU MLPs ``cfg.shared_dims``, [128, 64]) read
``e = flatten(embs[0])``; task ``k`` has its own gate ``g^k(e) = softmax(W_gk e)`` (Eq. 5)
and tower (``cfg.tower_dims``, [32]) ``h^k(sum_i g^k_i(e) f_i(e))`` (Eq. 4). The experts
are shared, so ``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Sequence

import jax

from htl_jax.models import experts as moe
from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class MMoE(HybridModel):
  """One-level MMoE with a softmax gate and a tower per task."""

  shared = ('experts',)
  splits_hidden_dims = True

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    e = layers.flatten_fields(embs[0])
    expert_out = moe.ExpertBank(self.cfg.shared_dims, self.cfg.num_experts,
                                name='experts')(e)               # [B, n, D]
    mixed = [moe.mix(moe.SoftmaxGate(self.cfg.num_experts, name=f'gate_{t}')(e), expert_out)
             for t in range(self.spec.num_tasks)]
    return self.separate_towers(mixed, self.cfg.tower_dims)

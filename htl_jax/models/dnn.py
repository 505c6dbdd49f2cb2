"""DNN baseline: one independent single-task network per task.

Tang et al., "Touch the Core: Exploring Task Dependence Among Hybrid Targets for
Recommendation", RecSys 2024 (https://arxiv.org/abs/2403.17442), Section 5.1.3: "DNN" trains
an independent model for every task. Nothing is shared: task ``t`` has its own embedding
table and its own ``[128, 64, 32]`` MLP (docs/design.md). ``independent_tasks`` tells the
trainer to keep ``K`` embedding tables (one block of rows per task in the table) and to look
up every field once per task, so ``embs[t]`` is ``[B, K*F, d]`` and task ``t`` reads its own
fields ``t*F .. (t+1)*F``. No gradient process applies (the config check refuses one).
"""

from __future__ import annotations

from typing import Sequence

import jax

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class DNN(HybridModel):
  """Task ``t``: ``Tower_t(flatten(E_t[x]))``; sigmoid for the binary tasks."""

  isolated_towers = True
  independent_tasks = True

  def _own_fields(self, embs: Sequence[jax.Array], t: int) -> jax.Array:
    """Task ``t``'s lookups in its own table: ``[B, K*F, d] -> [B, F*d]``."""
    num_fields = self.spec.num_fields
    return layers.flatten_fields(embs[t][:, t * num_fields:(t + 1) * num_fields])

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    own = [self._own_fields(embs, t) for t in range(self.spec.num_tasks)]
    return self.separate_towers(own, self.cfg.hidden_dims)

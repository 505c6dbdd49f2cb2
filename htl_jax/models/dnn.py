"""DNN baseline: one independent single-task network per task.

Tang et al., "Touch the Core: Exploring Task Dependence Among Hybrid Targets for
Recommendation", RecSys 2024 (https://arxiv.org/abs/2403.17442), Section 5.1.3: "DNN" trains
an independent model for every task. Nothing is shared: task ``t`` has its own embedding
table and its own ``[128, 64, 32]`` MLP (DESIGN section 5). ``independent_tasks`` tells the
trainer to keep ``K`` embedding tables (one block of rows per task in the table) and to look
up every field once per task, so ``embs[t]`` is ``[B, K*F, d]`` and task ``t`` reads its own
fields ``t*F .. (t+1)*F``. No gradient process applies (the config check refuses one).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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

  @nn.compact
  def __call__(self, embs: Sequence[jax.Array], *, train: bool = False,
               tau: jax.Array | float = 1.0,
               example_index: Optional[jax.Array] = None) -> ModelOutput:
    del train, tau, example_index  # Deterministic; no per-example noise.
    num_binary = self.spec.num_binary
    probs = []
    for t in range(num_binary):
      logit, _ = layers.Tower(self.cfg.hidden_dims, 1, name=f'tower_{t}')(
          self._own_fields(embs, t))
      probs.append(jax.nn.sigmoid(logit[:, 0]))
    core, _ = self.core_tower(self._own_fields(embs, num_binary), self.cfg.hidden_dims)
    return ModelOutput(jnp.stack(probs, axis=-1), core)

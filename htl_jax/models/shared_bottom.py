"""Shared-Bottom baseline (Caruana, "Multitask Learning", Machine Learning 28, 1997).

https://doi.org/10.1023/A:1007379232211. A shared ReLU MLP bottom (``cfg.shared_dims``, [128, 64])
reads the concatenated field embeddings ``e = flatten(embs[0])``; every task has its own tower
(``cfg.tower_dims``, [32]) on top of the bottom's output, so every path has the paper's three hidden
layers. The bottom is shared, so ``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Sequence

import jax

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class SharedBottom(HybridModel):
  """``h = MLP_bottom(e)``; task ``t``: ``Tower_t(h)``."""

  shared = ('bottom',)
  splits_hidden_dims = True

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    bottom = layers.MLP(self.cfg.shared_dims, name='bottom')(layers.flatten_fields(embs[0]))
    return self.separate_towers([bottom[-1]] * self.spec.num_tasks, self.cfg.tower_dims)

"""Shared-Bottom baseline (Caruana, "Multitask Learning", Machine Learning 28, 1997).

https://doi.org/10.1023/A:1007379232211. A shared ReLU MLP bottom (``cfg.shared_dims``, [128, 64]) reads
the concatenated field embeddings ``e = flatten(embs[0])``; every task has its own tower
(``cfg.tower_dims``, [32]) on top of the bottom's output, so every path has the paper's three
hidden layers. The bottom is shared, so ``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class SharedBottom(HybridModel):
  """``h = MLP_bottom(e)``; task ``t``: ``Tower_t(h)``."""

  shared = ('bottom',)
  splits_hidden_dims = True

  @nn.compact
  def __call__(self, embs: Sequence[jax.Array], *, train: bool = False,
               tau: jax.Array | float = 1.0,
               example_index: Optional[jax.Array] = None) -> ModelOutput:
    del train, tau, example_index  # Deterministic; no per-example noise.
    e = layers.flatten_fields(embs[0])
    bottom = layers.MLP(self.cfg.shared_dims, name='bottom')(e)[-1]
    num_binary = self.spec.num_binary
    probs = []
    for t in range(num_binary):
      logit, _ = layers.Tower(self.cfg.tower_dims, 1, name=f'tower_{t}')(bottom)
      probs.append(jax.nn.sigmoid(logit[:, 0]))
    core, _ = self.core_tower(bottom, self.cfg.tower_dims)
    return ModelOutput(jnp.stack(probs, axis=-1), core)

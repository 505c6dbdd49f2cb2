"""DNN baseline: one independent network per task (the single-task baseline of HTLNet).

Tang et al., "Touch the Core: Exploring Task Dependence Among Hybrid Targets for
Recommendation", RecSys 2024 (https://arxiv.org/abs/2403.17442), Section 4.1.3: "DNN" trains
a separate tower for every task. Only the embedding table is shared, and it is shared by
construction in the trainer; every tower reads only its own copy ``embs[t]``, so
``isolated_towers`` is True and the trainer takes the one-backward-pass path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.data.schema import HybridSpec
from htl_jax.models import layers
from htl_jax.models.interface import ModelConfig, ModelOutput


class DNN(nn.Module):
  """Task ``t``: ``Tower(flatten(embs[t]))``; sigmoid for the binary tasks."""

  spec: HybridSpec
  cfg: ModelConfig

  @property
  def isolated_towers(self) -> bool:
    return True

  @nn.compact
  def __call__(self, embs: Sequence[jax.Array], *, train: bool = False,
               tau: jax.Array | float = 1.0,
               example_index: Optional[jax.Array] = None) -> ModelOutput:
    del train, tau, example_index  # Deterministic; no per-example noise.
    num_binary = self.spec.num_binary
    probs = []
    for t in range(num_binary):
      logit, _ = layers.Tower(self.cfg.tower_dims, 1, name=f'tower_{t}')(
          layers.flatten_fields(embs[t]))
      probs.append(jax.nn.sigmoid(logit[:, 0]))
    core, _ = layers.Tower(self.cfg.tower_dims, self.cfg.core_out_dim,
                           name=f'tower_{num_binary}')(
                               layers.flatten_fields(embs[num_binary]))
    return ModelOutput(jnp.stack(probs, axis=-1), core)

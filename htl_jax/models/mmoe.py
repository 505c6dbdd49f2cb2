"""MMoE baseline: Multi-gate Mixture-of-Experts.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (https://doi.org/10.1145/3219819.3220007). ``cfg.num_experts``
shared experts (ReLU MLPs ``cfg.shared_dims``, [128, 64]) read ``e = flatten(embs[0])``; task ``k`` has
its own gate ``g^k(e) = softmax(W_gk e)`` (Eq. 5) and tower (``cfg.tower_dims``, [32]) ``h^k(sum_i g^k_i(e) f_i(e))``
(Eq. 4). The experts are shared, so ``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.models import experts as moe
from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class MMoE(HybridModel):
  """One-level MMoE with a softmax gate and a tower per task."""

  shared = ('experts',)
  splits_hidden_dims = True

  @nn.compact
  def __call__(self, embs: Sequence[jax.Array], *, train: bool = False,
               tau: jax.Array | float = 1.0,
               example_index: Optional[jax.Array] = None) -> ModelOutput:
    del train, tau, example_index  # Deterministic; no per-example noise.
    e = layers.flatten_fields(embs[0])
    expert_out = moe.ExpertBank(self.cfg.shared_dims, self.cfg.num_experts,
                                name='experts')(e)               # [B, n, D]
    num_binary = self.spec.num_binary
    outputs = []
    for t in range(num_binary + 1):
      gate = moe.SoftmaxGate(self.cfg.num_experts, name=f'gate_{t}')(e)
      mixed = moe.mix(gate, expert_out)
      if t == num_binary:
        out, _ = self.core_tower(mixed, self.cfg.tower_dims)
      else:
        out, _ = layers.Tower(self.cfg.tower_dims, 1, name=f'tower_{t}')(mixed)
      outputs.append(out)
    probs = jax.nn.sigmoid(jnp.concatenate(outputs[:-1], axis=-1))
    return ModelOutput(probs, outputs[-1])

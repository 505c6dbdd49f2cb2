"""AdaTT baseline: Adaptive Task-to-Task Fusion Network (AdaTT-sp).

Li et al., "AdaTT: Adaptive Task-to-Task Fusion Network for Multitask Learning in
Recommendations", KDD 2023 (https://doi.org/10.1145/3580305.3599769); reference code
https://github.com/facebookresearch/AdaTT.

AdaTT-sp has task-specific fusion units only: at each fusion level every task owns a group
of ``experts_per_task`` experts; the fusion unit of task ``t`` combines

- an adaptive gate over ALL experts of the level, ``g_t(x)^T E(x)`` with
  ``g_t(x) = softmax(W_t x)`` reading task ``t``'s input to the level, and
- the residual self-expert connection ``v_t^T E_t(x)``: a learned linear combination of task
  ``t``'s own experts (``v_t`` fixed to 1 when a task has a single expert).

Choices and simplifications (documented here, not in the paper):

- one fusion level per entry of ``cfg.shared_dims`` ([128, 64]); at level ``l`` every expert
  is a one-layer ReLU MLP of width ``cfg.shared_dims[l]`` (as in :mod:`htl_jax.models.ple`);
- ``experts_per_task`` defaults to 2 (so ``v_t`` is learned); gates are single linear layers;
- ``num_shared_experts > 0`` turns on the general AdaTT with a shared module (its experts
  join every gate's pool; at non-final levels a shared fusion unit feeds the next level's
  shared experts). The registered ``adatt`` model is AdaTT-sp, ``num_shared_experts = 0``.

All tasks read ``e = flatten(embs[0])`` and fuse each other's experts, so
``isolated_towers`` is False.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from htl_jax.models import experts as moe
from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


def _uniform_init(scale: float):
  """``U(-scale, scale)`` initializer (the reference code's init of ``v_t``)."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)

  return init


class AdaTT(HybridModel):
  """AdaTT with task-specific (and optionally shared) fusion units and a tower per task."""

  # Every task's gate mixes every expert, so all experts are shared.
  shared = ('level_*_experts_*',)
  splits_hidden_dims = True
  experts_per_task: int = 2
  num_shared_experts: int = 0

  def _self_residual(self, own_experts: jax.Array, name: str) -> jax.Array:
    """Residual ``v^T E_own``: ``[B, m, D] -> [B, D]``; unit weights when ``m == 1``."""
    num = own_experts.shape[1]
    if num == 1:
      return own_experts[:, 0]
    weights = self.param(name, _uniform_init(math.sqrt(1.0 / num)), (num,))
    return jnp.einsum('m,bmd->bd', weights, own_experts)

  def _fusion_level(self, level: int, width: int, inputs: list[jax.Array],
                    last: bool) -> list[jax.Array]:
    """One fusion level. ``inputs``: per task, then the shared module's input if any."""
    dims = (width,)
    num_tasks = self.spec.num_tasks
    sizes = [self.experts_per_task] * num_tasks
    if self.num_shared_experts:
      sizes.append(self.num_shared_experts)
    # Every group of the level at once: groups reading the same input (all of them at the
    # first level) share one matmul.
    banks = [moe.ExpertWeights(dims, size, inputs[u].shape[-1],
                               name=f'level_{level}_experts_{u}')()
             for u, size in enumerate(sizes)]
    groups = moe.apply_banks(banks, inputs[:len(sizes)])
    every_expert = jnp.concatenate(groups, axis=1)
    num_units = num_tasks if last else len(sizes)
    fused = []
    for u in range(num_units):
      gate = moe.SoftmaxGate(every_expert.shape[1], name=f'level_{level}_gate_{u}')(inputs[u])
      residual = self._self_residual(groups[u], f'level_{level}_self_weights_{u}')
      fused.append(moe.mix(gate, every_expert) + residual)
    return fused

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    e = layers.flatten_fields(embs[0])
    num_modules = self.spec.num_tasks + (1 if self.num_shared_experts else 0)
    inputs = [e] * num_modules
    num_levels = len(self.cfg.shared_dims)
    for level, width in enumerate(self.cfg.shared_dims):
      inputs = self._fusion_level(level, width, inputs, last=level == num_levels - 1)
    return self.separate_towers(inputs[:self.spec.num_tasks], self.cfg.tower_dims)

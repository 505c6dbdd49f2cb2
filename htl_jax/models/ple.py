"""PLE baseline: Progressive Layered Extraction.

Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
for Personalized Recommendations", RecSys 2020 (https://doi.org/10.1145/3383313.3412236).

Choices (the paper leaves them to the application):

- one extraction level per entry of ``cfg.shared_dims`` ([128, 64]); at level ``l`` every expert is
  a one-layer ReLU MLP of width ``cfg.shared_dims[l]``, so an expert path is as deep as an MMoE
  expert (``(128, 64)`` gives two levels; a single entry gives one level, i.e. CGC);
- ``experts_per_task`` (default 1) task-specific experts per task and ``cfg.num_experts``
  shared experts per level;
- Customized Gate Control (Eq. 2-4): task ``k``'s gate, a softmax over its own and the shared
  experts, reads task ``k``'s input to the level (``e = flatten(embs[0])`` at level 1, its
  previous-level output after, Eq. 5); at every level but the last a shared gate over all
  experts feeds the shared experts of the next level (Eq. 6).

The shared experts make ``isolated_towers`` False.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from htl_jax.models import experts as moe
from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class PLE(HybridModel):
  """Multi-level PLE with CGC gating and a tower per task."""

  shared = ('level_*_shared',)
  splits_hidden_dims = True
  experts_per_task: int = 1

  def _extraction_level(self, level: int, width: int, task_in: list[jax.Array],
                        shared_in: jax.Array,
                        last: bool) -> tuple[list[jax.Array], Optional[jax.Array]]:
    """One extraction network (Eq. 5-6); returns the next level's task and shared inputs."""
    dims = (width,)
    num_shared = self.cfg.num_experts
    # Every bank of the level at once: banks reading the same input (all of them at the
    # first level) share one matmul.
    banks = [moe.ExpertWeights(dims, self.experts_per_task, x.shape[-1],
                               name=f'level_{level}_task_{t}')()
             for t, x in enumerate(task_in)]
    banks.append(moe.ExpertWeights(dims, num_shared, shared_in.shape[-1],
                                   name=f'level_{level}_shared')())
    *task_experts, shared_experts = moe.apply_banks(banks, [*task_in, shared_in])
    task_out = []
    for t, x in enumerate(task_in):
      selected = jnp.concatenate([task_experts[t], shared_experts], axis=1)
      gate = moe.SoftmaxGate(selected.shape[1], name=f'level_{level}_gate_{t}')(x)
      task_out.append(moe.mix(gate, selected))
    if last:
      return task_out, None
    every_expert = jnp.concatenate(task_experts + [shared_experts], axis=1)
    gate = moe.SoftmaxGate(every_expert.shape[1], name=f'level_{level}_gate_shared')(shared_in)
    return task_out, moe.mix(gate, every_expert)

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    e = layers.flatten_fields(embs[0])
    task_in, shared_in = [e] * self.spec.num_tasks, e
    num_levels = len(self.cfg.shared_dims)
    for level, width in enumerate(self.cfg.shared_dims):
      task_in, shared_in = self._extraction_level(level, width, task_in, shared_in,
                                                  last=level == num_levels - 1)
    return self.separate_towers(task_in, self.cfg.tower_dims)

"""HTLNet: Hybrid Targets Learning Network (Tang et al., RecSys 2024, arXiv 2403.17442).

docs/design.md fixes every open point; in short, for binary tasks ``1..T`` and the
core task ``T+1``:

- task 1's tower reads ``e`` (the concatenated field embeddings);
- task ``t > 1`` reads ``concat(rep_f^{t-1}, le_f^{t-1}, e)`` (Eq. 6), where ``le_f^{t-1}``
  and ``rep_f^{t-1}`` are the IFU fusions (Eq. 13-14) of the label embeddings ``le^1..le^{t-1}``
  (LEU, Eq. 11-12) and of the first-hidden-layer representations ``rep^1..rep^{t-1}``;
- ``stop_gradient`` (Eq. 15) on ``yhat^u`` before the LEU and on ``rep^u`` before the IFU;
- the core head is linear (MSE) or ZILN.

With Eq. 15 on, every task's loss reaches the shared embedding only through its own tower's
read of ``e``, so ``isolated_towers`` is True and the trainer takes the one-backward-pass
path for per-task gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class HTLNet(HybridModel):
  """HTLNet with LEU, IFU and stop-gradient; ablation switches in :class:`ModelConfig`."""

  default_grad_process = 'htl'

  @property
  def isolated_towers(self) -> bool:
    return self.cfg.stop_gradient

  def _detach(self, x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(x) if self.cfg.stop_gradient else x

  def _task_input(self, t: int, e: jax.Array, reps: list[jax.Array],
                  label_embs: list[jax.Array]) -> jax.Array | list[jax.Array]:
    """Tower input of task ``t`` (0-based): Eq. 6 for ``t > 0``, as the list of its parts.

    The tower's first layer reads the parts without concatenating them (same parameters
    and values as a Dense layer on ``concat(rep_f, le_f, e)``).
    """
    if t == 0:
      return e
    parts = []
    if self.cfg.use_representation:
      fuse = layers.make_fusion(self.cfg.fusion, self.cfg.fusion_dim, f'ifu_rep_{t}')
      parts.append(fuse(reps[:t]))
    if self.cfg.use_label_embedding:
      fuse = layers.make_fusion(self.cfg.fusion, self.cfg.fusion_dim, f'ifu_label_{t}')
      parts.append(fuse(label_embs[:t]))
    return parts + [e]

  def forward(self, embs: Sequence[jax.Array], *, train: bool, tau: jax.Array | float,
              example_index: Optional[jax.Array]) -> ModelOutput:
    num_binary = self.spec.num_binary
    noise = None
    if train and self.cfg.gumbel_noise and self.cfg.use_label_embedding:
      noise = layers.gumbel_noise(self.make_rng('gumbel'), (num_binary, 2), example_index)
    reps, label_embs, probs = [], [], []
    for t in range(num_binary):
      x = self._task_input(t, layers.flatten_fields(embs[t]), reps, label_embs)
      out, rep = layers.Tower(self.cfg.hidden_dims, 1, name=f'tower_{t}')(x)
      prob = jax.nn.sigmoid(out[:, 0])
      probs.append(prob)
      reps.append(self._detach(rep))
      if self.cfg.use_label_embedding:
        leu = layers.LabelEmbedding(self.cfg.label_embed_dim, name=f'leu_{t}')
        label_embs.append(leu(self._detach(prob), tau,
                              None if noise is None else noise[:, t]))
    x = self._task_input(num_binary, layers.flatten_fields(embs[num_binary]), reps,
                         label_embs)
    core, _ = self.core_tower(x, self.cfg.hidden_dims)
    return ModelOutput(jnp.stack(probs, axis=-1), core)

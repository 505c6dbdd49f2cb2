"""Single-task ZILN: the core task alone, with the zero-inflated lognormal head.

Wang, Liu, Miao, "A Deep Probabilistic Model for Customer Lifetime Value Prediction", 2019
(https://arxiv.org/abs/1912.07753): one ``[128, 64, 32]`` ReLU MLP over the concatenated field
embeddings ``e`` with a 3-unit ZILN output ``[l, mu, s]`` (use ``head='ziln'``). It is the
single-task column of the paper's Table 7: only the core loss is trained
(``trains_binary_tasks`` is False), and every binary task's probability is the model's own
``P(y > 0) = sigmoid(l)``, so the 1-month-repurchase AUC comes from the core model as in the
paper (on Kaggle-Revenue, ``y > 0`` is exactly a repurchase within 30 days).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class ZILN(HybridModel):
  """``[l, mu, s] = Tower(e)``; binary probabilities ``sigmoid(l)`` for every step."""

  trains_binary_tasks = False
  required_head = 'ziln'

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    core, _ = self.core_tower(layers.flatten_fields(embs[0]), self.cfg.hidden_dims)
    positive = jax.nn.sigmoid(core[:, :1])
    return ModelOutput(jnp.repeat(positive, self.spec.num_binary, axis=-1), core)

"""AITM baseline: Adaptive Information Transfer Multi-task framework.

Xi et al., "Modeling the Sequential Dependence among Audience Multi-step Conversions with
Multi-task Learning in Targeted Display Advertising", KDD 2021
(https://doi.org/10.1145/3447548.3467071); reference code https://github.com/xidongbo/AITM.

Every task ``t`` has a tower (ReLU MLP ``cfg.hidden_dims``) over ``e = flatten(embs[0])``
whose last hidden layer is ``q_t`` (dimension ``k = cfg.hidden_dims[-1]``). For ``t > 1``
(Eq. 1-4):

- the Info module transfers ``p_{t-1} = ReLU(Dense_k(z_{t-1}))`` from the previous task;
- the AIT module fuses ``z_t = sum_{u in {p_{t-1}, q_t}} w_u h1(u)`` with
  ``w_u = softmax_u(<h2(u), h3(u)> / sqrt(k))``; ``h1, h2, h3`` (the paper's W1..W3) are one
  set of Dense layers shared by all tasks;
- ``z_1 = q_1``; the prediction is ``sigmoid(Dense_1(z_t))``.

The core task, last in the chain, receives the transfer from the last binary task and its
own linear head of ``cfg.core_out_dim`` units. The behavioural expectation calibrator
(Eq. 11) is :func:`htl_jax.losses.aitm_calibrator`, applied by the trainer. The transfer is
not stopped, so ``isolated_towers`` is False.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.models import layers
from htl_jax.models.interface import HybridModel, ModelOutput


class AITM(HybridModel):
  """Towers, Info transfer ``t-1 -> t`` and one shared AIT attention."""

  auxiliary_loss = 'aitm_calibrator'

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    e = layers.flatten_fields(embs[0])
    k = self.cfg.hidden_dims[-1]
    ait = layers.AttentionFusion(k, name='ait')  # W1, W2, W3 shared by all tasks.
    num_binary = self.spec.num_binary
    outputs, z = [], None
    for t in range(num_binary + 1):
      q = layers.MLP(self.cfg.hidden_dims, name=f'tower_{t}')(e)[-1]
      if z is None:
        z = q
      else:
        transfer = nn.relu(nn.Dense(k, kernel_init=layers.XAVIER, name=f'info_{t}')(z))
        z = ait([transfer, q])
      is_core = t == num_binary
      outputs.append(nn.Dense(self.cfg.core_out_dim if is_core else 1,
                              kernel_init=layers.XAVIER,
                              bias_init=(self.cfg.core_bias_init() if is_core
                                         else nn.initializers.zeros),
                              name=f'out_{t}')(z))
    probs = jax.nn.sigmoid(jnp.concatenate(outputs[:-1], axis=-1))
    return ModelOutput(probs, outputs[-1])

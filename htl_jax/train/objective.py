"""The training objective as a vector of per-task losses, ``[K]`` with the core last.

``L = L_core + sum_t L_t`` (DESIGN section 1). Model-specific extra terms are attributed to
the binary task they constrain, so every term reaches the per-task gradients:

- AITM's calibrator (``aitm_alpha``) and TAFE's dependence task learning loss
  (``tafe_dtl_weight``) are added to the LAST binary task;
- the pairwise ranking loss (``lambda_pair``, any model) of step ``t >= 2`` to task ``t``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from htl_jax import losses
from htl_jax.models import heads, model_class
from htl_jax.models.interface import ModelOutput

LOGIT_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static loss settings (hashable, bound into the jitted step)."""

  model: str
  head: str
  core_transform: heads.CoreTransform
  aitm_alpha: float = 0.0
  tafe_dtl_weight: float = 0.0
  lambda_pair: float = 0.0
  binary_losses: bool = True    # False: a single-task core model (MODELS' class fact)

  @classmethod
  def from_config(cls, config, core_transform: heads.CoreTransform) -> 'Objective':
    model = config['model']
    return cls(model=model, head=config['head'], core_transform=core_transform,
               aitm_alpha=float(config['aitm_alpha']) if model == 'aitm' else 0.0,
               tafe_dtl_weight=(float(config['tafe_dtl_weight'])
                                if model == 'tafe' else 0.0),
               lambda_pair=float(config['lambda_pair']),
               binary_losses=model_class(model).trains_binary_tasks)

  def loss_vector(self, out: ModelOutput, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-task losses ``[K]`` of one batch (weighted means over real examples)."""
    y, weight = batch['y'], batch['weight']
    num_binary = y.shape[1]
    binary = jnp.stack([losses.bce(out.probs[:, t], y[:, t], weight=weight)
                        for t in range(num_binary)])
    extra = jnp.zeros((num_binary,), binary.dtype)
    if self.aitm_alpha:
      extra = extra.at[-1].add(losses.aitm_calibrator(out.probs, self.aitm_alpha))
    if self.tafe_dtl_weight:
      extra = extra.at[-1].add(self.tafe_dtl_weight * losses.tafe_dtl_loss(out.probs, y))
    if self.lambda_pair:
      probs = jnp.clip(out.probs, LOGIT_EPS, 1 - LOGIT_EPS)
      scores = jnp.log(probs) - jnp.log1p(-probs)
      extra = extra + self.lambda_pair * losses.pairwise_ranking_total(scores, y)
    core = heads.core_loss(self.head, out.core, batch['core'], self.core_transform, weight)
    if not self.binary_losses:
      return jnp.concatenate([jnp.zeros_like(binary), core[None]])
    return jnp.concatenate([binary + extra, core[None]])

  def predict_core(self, out: ModelOutput) -> jax.Array:
    """Core predictions on the original scale, ``[B]``."""
    return heads.core_prediction(self.head, out.core, self.core_transform)

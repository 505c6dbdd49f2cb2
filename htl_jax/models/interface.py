"""What every model takes and returns, so the trainer treats all of them alike.

A model is a ``flax.linen.Module`` built by ``MODELS[name](spec, model_config)`` and called as
``model.apply(variables, embs, train=..., tau=..., example_index=..., rngs={'gumbel': key})``:

- ``embs``: a tuple of K arrays ``[B, F, d]``, the looked-up shared embedding rows, one per
  task (K = number of tasks, core last). On the general gradient path all K are the same
  array; on the fast path (models whose ``isolated_towers`` is True) they are K copies and
  tower ``t`` must read only ``embs[t]`` so that one backward pass yields every task's
  gradient of the shared embedding (DESIGN section 4). Models whose tasks share more than the
  embedding read ``embs[0]``.
- ``tau``: the Gumbel-softmax temperature from the train state (used by HTLNet only).
- ``example_index``: ``[B]`` int32 row positions, keys per-example noise (HTLNet only).

It returns :class:`ModelOutput`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax


class ModelOutput(NamedTuple):
  """Predictions of one batch.

  Attributes:
    probs: ``[B, T]`` probabilities of the binary tasks in chain order.
    core: ``[B, C]`` raw core head output: ``C = 1`` (MSE head, transformed scale) or
      ``C = 3`` (ZILN logits ``[l, mu, s]``).
  """

  probs: jax.Array
  core: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of every model (a hashable subset of the experiment config)."""

  tower_dims: tuple[int, ...] = (128, 64, 32)
  head: str = 'mse'
  label_embed_dim: int = 10
  fusion_dim: int = 32
  use_label_embedding: bool = True
  use_representation: bool = True
  fusion: str = 'attention'
  stop_gradient: bool = True
  gumbel_noise: bool = True
  num_experts: int = 4
  expert_dims: tuple[int, ...] = (128, 64)

  @classmethod
  def from_config(cls, config) -> 'ModelConfig':
    """Pick the model fields out of an experiment ``ConfigDict``."""
    kwargs = {}
    for field in dataclasses.fields(cls):
      value = config[field.name]
      kwargs[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**kwargs)

  @property
  def core_out_dim(self) -> int:
    if self.head == 'mse':
      return 1
    if self.head == 'ziln':
      return 3
    raise ValueError(f"head must be 'mse' or 'ziln', got {self.head!r}")

"""What every model takes and returns, so the trainer treats all of them alike.

A model is a ``flax.linen.Module`` built by ``MODELS[name](spec, model_config)`` and called as
``model.apply(variables, embs, train=..., tau=..., example_index=..., rngs={'gumbel': key})``:

- ``embs``: a tuple of K arrays ``[B, F, d]``, the looked-up shared embedding rows, one per
  task (K = number of tasks, core last). On the general gradient path all K are the same
  array; on the fast path (models whose ``isolated_towers`` is True) they are K copies and
  tower ``t`` must read only ``embs[t]`` so that one backward pass yields every task's
  gradient of the shared embedding (docs/design.md). Models whose tasks share more than the
  embedding read ``embs[0]``.
- ``tau``: the Gumbel-softmax temperature from the train state (used by HTLNet only).
- ``example_index``: ``[B]`` int32 row positions, keys per-example noise (HTLNet only).

It returns :class:`ModelOutput`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from htl_jax.spec import HybridSpec
from htl_jax.models.layers import Tower


class ModelOutput(NamedTuple):
  """Predictions of one batch.

  Attributes:
    probs: ``[B, T]`` probabilities of the binary tasks in chain order.
    core: ``[B, C]`` raw core head output: ``C = 1`` (MSE head, transformed scale) or
      ``C = 3`` (ZILN logits ``[l, mu, s]``).
    task_probs: the columns of ``probs`` as T arrays ``[B]``, set by models whose binary
      task ``t`` is its own tower's sigmoid (:meth:`HybridModel.separate_towers`). The
      loss reads them instead of slicing ``probs``, so task ``t``'s backward pass never
      reaches the other towers (their cotangents stay symbolic zeros; see
      :func:`htl_jax.optim.per_task.row_grads_general`). None: read ``probs``.
  """

  probs: jax.Array
  core: jax.Array
  task_probs: tuple[jax.Array, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of every model (a hashable subset of the experiment config).

  ``hidden_dims`` are the three hidden layers every model has (paper Appendix B.1,
  docs/design.md): HTLNet's and DNN's towers use all of them; a model with a shared part uses
  :attr:`shared_dims` (all but the last) for its shared bottom / experts and
  :attr:`tower_dims` (the last) for its towers. ``core_bias`` is the initial bias of the
  MSE core head: the training mean of the (transformed) core target. Every field's default
  is in ``configs/base.py``; build one with :meth:`from_config`.
  """

  hidden_dims: tuple[int, ...]
  head: str
  label_embed_dim: int
  fusion_dim: int
  use_label_embedding: bool
  use_representation: bool
  fusion: str
  stop_gradient: bool
  gumbel_noise: bool
  num_experts: int
  core_bias: float = 0.0

  @classmethod
  def from_config(cls, config, core_bias: float = 0.0) -> 'ModelConfig':
    """Pick the model fields out of an experiment ``ConfigDict``."""
    kwargs = {'core_bias': float(core_bias)}
    for field in dataclasses.fields(cls):
      if field.name in kwargs:
        continue
      value = config[field.name]
      kwargs[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**kwargs)

  @property
  def shared_dims(self) -> tuple[int, ...]:
    """Hidden layers of a shared bottom / expert path (all but the last)."""
    if len(self.hidden_dims) < 2:
      raise ValueError(f'hidden_dims={self.hidden_dims} needs at least 2 layers for a model '
                       'with a shared part (shared layers, then the tower layer)')
    return self.hidden_dims[:-1]

  @property
  def tower_dims(self) -> tuple[int, ...]:
    """Hidden layers of a tower on top of a shared part (the last one)."""
    return self.hidden_dims[-1:]

  @property
  def core_out_dim(self) -> int:
    if self.head == 'mse':
      return 1
    if self.head == 'ziln':
      return 3
    raise ValueError(f"head must be 'mse' or 'ziln', got {self.head!r}")

  def core_bias_init(self) -> Callable[..., jax.Array]:
    """Initializer of the core head's output bias: ``core_bias`` for MSE, zeros for ZILN."""
    if self.head == 'mse':
      return nn.initializers.constant(self.core_bias)
    return nn.initializers.zeros


class HybridModel(nn.Module):
  """Base of every model: the fields and the class facts the trainer reads.

  Class facts (override in a subclass):
    shared: ``fnmatch`` patterns of the top-level parameter names that join the shared
      embedding in ``theta_s`` (docs/design.md): the gradient process acts on them, and
      every task's loss reaches them.
    isolated_towers: tower ``t`` reads only ``embs[t]``, so one backward pass of the
      summed loss gives every task's gradient of the embedding (the fast path).
    default_grad_process: what ``grad_process='auto'`` means for this model.
    independent_tasks: every task has its own embedding table (nothing is shared, so no
      gradient process applies): the trainer looks up ``num_tasks`` copies of the fields,
      ``embs[t]`` is ``[B, K*F, d]`` and task ``t`` reads fields ``t*F .. (t+1)*F``.
    trains_binary_tasks: False for a single-task model of the core (its binary-task
      probabilities are derived, their losses are not trained).
    splits_hidden_dims: the model has a shared part on :attr:`ModelConfig.shared_dims`
      under towers on :attr:`ModelConfig.tower_dims` (so needs two hidden layers or more).
    required_head: the only core head the model can have ('' = any).
    auxiliary_loss: the model's own extra loss on its binary chain, '' for none:
      ``'aitm_calibrator'`` (AITM, weight ``aitm_alpha``) or ``'tafe_dtl'`` (TAFE, weight
      ``tafe_dtl_weight``); see :class:`htl_jax.losses.TrainingObjective`.
  """

  spec: HybridSpec
  cfg: ModelConfig

  shared: ClassVar[tuple[str, ...]] = ()
  isolated_towers: ClassVar[bool] = False
  default_grad_process: ClassVar[str] = 'none'
  independent_tasks: ClassVar[bool] = False
  trains_binary_tasks: ClassVar[bool] = True
  splits_hidden_dims: ClassVar[bool] = False
  required_head: ClassVar[str] = ''
  auxiliary_loss: ClassVar[str] = ''

  @nn.compact
  def __call__(self, embs: Sequence[jax.Array], *, train: bool = False,
               tau: jax.Array | float = 1.0,
               example_index: Optional[jax.Array] = None) -> ModelOutput:
    """The module docstring's contract; each model implements :meth:`forward`."""
    return self.forward(embs, train=train, tau=tau, example_index=example_index)

  def forward(self, embs: Sequence[jax.Array], **context) -> ModelOutput:
    """The model; ``context`` holds ``train``, ``tau`` and ``example_index`` (HTLNet's)."""
    raise NotImplementedError(type(self).__name__)

  def towers(self, inputs: Sequence[jax.Array], dims: Sequence[int]
             ) -> tuple[jax.Array, jax.Array]:
    """One tower per task on ``inputs[t]``: binary logits ``[B, T]`` and the core ``[B, C]``."""
    logits, core = self._tower_logits(inputs, dims)
    return jnp.concatenate(logits, axis=-1), core

  def separate_towers(self, inputs: Sequence[jax.Array], dims: Sequence[int]
                      ) -> ModelOutput:
    """:meth:`towers` where binary task ``t``'s probability is ``sigmoid`` of its tower alone.

    The output carries each task's probability as its own array too
    (:attr:`ModelOutput.task_probs`), so a per-task loss does not depend on the other towers.
    """
    logits, core = self._tower_logits(inputs, dims)
    task_probs = tuple(jax.nn.sigmoid(z[:, 0]) for z in logits)
    return ModelOutput(jnp.stack(task_probs, axis=-1), core, task_probs)

  def _tower_logits(self, inputs: Sequence[jax.Array], dims: Sequence[int]
                    ) -> tuple[list[jax.Array], jax.Array]:
    """Binary logits, T arrays ``[B, 1]``, and the core ``[B, C]`` of one tower per task."""
    num_binary = self.spec.num_binary
    logits = [Tower(dims, 1, name=f'tower_{t}')(inputs[t])[0] for t in range(num_binary)]
    core, _ = self.core_tower(inputs[num_binary], dims)
    return logits, core

  def core_tower(self, x: jax.Array | Sequence[jax.Array], dims: Sequence[int]
                 ) -> tuple[jax.Array, jax.Array]:
    """The core task's tower (named ``tower_<T>``), its bias at the training mean."""
    return Tower(dims, self.cfg.core_out_dim, out_bias_init=self.cfg.core_bias_init(),
                 name=f'tower_{self.spec.num_binary}')(x)

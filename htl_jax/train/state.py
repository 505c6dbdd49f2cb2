"""The train state pytree and how it is built from a config.

``TrainState`` holds everything that changes during training: ``step``, ``params``
(``{'embedding': {'table': E}, 'model': towers...}``), ``opt_state``
(``{'balance': gradient-process state over theta_s, 'optimizer': Adam state}``; with
``embedding_optimizer='lazy_adam'`` the Adam state is ``{'model': dense Adam state, 'table':
row-wise Adam state}`` and ``opt_state['id_scratch']`` is the ``[vocab]`` int32 scratch of
:func:`htl_jax.optim.per_task.first_occurrence_in`), the Gumbel-softmax
temperature ``tau`` (Appendix A: ``tau_0`` decayed by ``tau_decay`` every ``tau_decay_steps``
steps, floored at ``tau_min``) and the base PRNG key ``rng``. Static things (the model, the
optimizer, the gradient process) live in :class:`TrainSetup`, bound into the steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from htl_jax import optim
from htl_jax.losses import CoreTransform, Objective
from htl_jax.models import ModelConfig, get_model, model_class
from htl_jax.optim import lazy_adam, per_task
from htl_jax.spec import HybridSpec

GRAD_PROCESSES = ('auto', 'htl', 'pcgrad', 'metabalance', 'none')
EMBEDDING_OPTIMIZERS = ('adam', 'lazy_adam')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  tau: jax.Array
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TauSchedule:
  """Staircase decay of the LEU temperature, applied after every step."""

  tau0: float
  decay: float
  decay_steps: int
  tau_min: float

  def next(self, tau: jax.Array, new_step: jax.Array) -> jax.Array:
    decayed = jnp.maximum(tau * self.decay, self.tau_min)
    return jnp.where(new_step % self.decay_steps == 0, decayed, tau)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
  """Everything static that the pure step functions need.

  ``shared`` are the ``fnmatch`` patterns of the model parameters that join the embedding in
  ``theta_s`` (the model's class fact); ``table_copies`` is the number of embedding tables
  (``num_tasks`` for a model with independent tasks, else 1), stacked as blocks of rows of
  one table, and ``offsets`` has one entry per looked-up field of every copy. ``row_adam``
  is the table's row-wise Adam (``embedding_optimizer='lazy_adam'``; ``tx`` then updates
  ``params['model']`` only), None when ``tx`` (dense Adam) updates every parameter.
  """

  spec: HybridSpec
  model: nn.Module
  objective: Objective
  tx: optax.GradientTransformation
  balance: Optional[optax.GradientTransformation]
  grad_process: str         # resolved: 'htl' | 'pcgrad' | 'metabalance' | 'none'
  grad_path: str            # 'isolated' | 'general'
  tau: TauSchedule
  l2: float
  offsets: tuple[int, ...]
  shared: tuple[str, ...]
  table_copies: int
  row_adam: Optional[lazy_adam.RowAdam] = None

  @property
  def table_rows(self) -> int:
    return self.table_copies * self.spec.total_vocab


def resolve_grad_process(config) -> str:
  """``config.grad_process``, with ``'auto'`` replaced by the model's default.

  The default is ``'htl'`` for HTLNet and ``'none'`` for every baseline (DESIGN section 5):
  baselines train with plain Adam on the summed loss unless a gradient process is asked for.
  """
  name = config['grad_process']
  if name == 'auto':
    return model_class(config['model']).default_grad_process
  return name


def make_balance(config, num_tasks: int) -> Optional[optax.GradientTransformation]:
  """The gradient process on ``theta_s`` (``config.grad_process``, resolved)."""
  name = resolve_grad_process(config)
  if name == 'htl':
    return optim.hybrid_grad_balance(
        alpha=config['alpha'], gamma=config['gamma'], clip=config['clip'], core_index=-1,
        per_leaf=config['per_leaf'], conflict=config['grad_conflict'],
        magnitude=config['grad_magnitude'], num_tasks=num_tasks)
  if name == 'pcgrad':
    return optim.pcgrad(seed=config['seed'], num_tasks=num_tasks)
  if name == 'metabalance':
    return optim.metabalance(num_tasks, beta=config['metabalance_beta'],
                             relax=config['metabalance_relax'], target_index=-1)
  if name == 'none':
    return None
  raise ValueError(f'grad_process must be one of {GRAD_PROCESSES}, got {name!r}')


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam with ONE learning rate for every parameter (the paper tunes one lr, Table 6)."""
  return optax.adam(config['learning_rate'])


def make_row_adam(config) -> Optional[lazy_adam.RowAdam]:
  """The table's row-wise Adam for ``embedding_optimizer='lazy_adam'``, else None.

  It has the same learning rate and moments' decays as the dense Adam of the model.
  """
  name = config['embedding_optimizer']
  if name == 'adam':
    return None
  if name == 'lazy_adam':
    return lazy_adam.RowAdam(config['learning_rate'])
  raise ValueError(f'embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {name!r}')


# Config fields that do NOT shape the compiled steps (data, schedule, loop and output). Every
# other top-level field does: runs that agree on all of those (and on the spec and core
# transform) share one TrainSetup, so the runs of a reproduction suite or a tuning study in
# one process compile their steps once. A new field is step-shaping unless listed here, so
# forgetting it costs a compile, never a wrong program.
_NOT_STEP_FIELDS = frozenset({
    'dataset', 'data_dir', 'cache_dir', 'data', 'batch_size', 'eval_batch_size',
    'num_epochs', 'max_steps', 'eval_every', 'checkpoint_every', 'patience', 'best_metric',
    'log_every', 'feed'})


def make_setup(config, spec: HybridSpec, core_transform: CoreTransform) -> TrainSetup:
  """The static half of training; cached so repeated runs reuse compiled steps."""
  fields = tuple((k, _hashable(config[k])) for k in sorted(config.keys())
                 if k not in _NOT_STEP_FIELDS)
  model_cfg = ModelConfig.from_config(config, core_bias=core_transform.target_mean)
  return _cached_setup(fields, model_cfg, spec, core_transform)


def _hashable(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=16)
def _cached_setup(fields: tuple, model_cfg: ModelConfig, spec: HybridSpec,
                  core_transform: CoreTransform) -> TrainSetup:
  config = dict(fields)
  model = get_model(config['model'], spec, model_cfg)
  copies = spec.num_tasks if model.independent_tasks else 1
  offsets = tuple(o + c * spec.total_vocab for c in range(copies) for o in spec.field_offsets)
  return TrainSetup(
      spec=spec, model=model,
      objective=Objective.from_config(config, core_transform, model.trains_binary_tasks),
      tx=make_optimizer(config), balance=make_balance(config, spec.num_tasks),
      grad_process=resolve_grad_process(config),
      grad_path='isolated' if model.isolated_towers else 'general',
      tau=TauSchedule(config['tau0'], config['tau_decay'], config['tau_decay_steps'],
                      config['tau_min']),
      l2=float(config['l2']), offsets=offsets, shared=tuple(model.shared),
      table_copies=copies, row_adam=make_row_adam(config))


# Tables with more entries are drawn in blocks of rows (see _init_table).
_ONE_DRAW_MAX = 1 << 24
_BLOCK_ROWS = 1 << 20


def _init_table(key: jax.Array, rows: int, dim: int) -> jax.Array:
  """``0.01 * N(0, 1)`` entries of a ``[rows, dim]`` table.

  Up to ``_ONE_DRAW_MAX`` entries: one draw. Larger tables (1e7 rows and up, where the
  one draw's scratch is 3x the table: 12 GB more at 1e8 rows of d = 10) are written block
  by block into one buffer, each block drawn from ``fold_in(key, block)`` (the last block
  is placed to end at the last row), so the scratch is one block.
  """
  if rows * dim <= _ONE_DRAW_MAX:
    return 0.01 * jax.random.normal(key, (rows, dim))
  block = min(_BLOCK_ROWS, rows)

  def write_block(i, table):
    values = 0.01 * jax.random.normal(jax.random.fold_in(key, i), (block, dim))
    start = jnp.minimum(i * block, rows - block)
    return jax.lax.dynamic_update_slice(table, values, (start, 0))

  return jax.lax.fori_loop(0, -(-rows // block), write_block, jnp.zeros((rows, dim)))


def init_state(setup: TrainSetup, config) -> TrainState:
  """Fresh parameters (Xavier towers, N(0, 0.01^2) embedding) and optimizer states."""
  spec = setup.spec
  rng = jax.random.PRNGKey(config.seed)
  init_key, embed_key, gumbel_key, rng = jax.random.split(rng, 4)
  # Small normal init of the shared table, as is usual for CTR embeddings.
  table = _init_table(embed_key, setup.table_rows, config.embed_dim)
  dummy = jnp.zeros((2, len(setup.offsets), config.embed_dim))
  variables = setup.model.init({'params': init_key, 'gumbel': gumbel_key},
                               (dummy,) * spec.num_tasks, train=True, tau=config.tau0,
                               example_index=jnp.arange(2))
  params = {'embedding': {'table': table}, 'model': variables['params']}
  theta_s = {'embedding': table,
             'shared': per_task.split_shared(params['model'], setup.shared)[0]}
  balance_state = (setup.balance.init(theta_s)
                   if setup.balance is not None else optax.EmptyState())
  if setup.row_adam is None:
    opt_state = {'balance': balance_state, 'optimizer': setup.tx.init(params)}
  else:
    opt_state = {'balance': balance_state,
                 'optimizer': lazy_adam.init_state(setup.tx, setup.row_adam, params),
                 'id_scratch': per_task.new_id_scratch(setup.table_rows)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    tau=jnp.asarray(config.tau0, jnp.float32), rng=rng)

"""The run's optimizer: ONE optax chain, built once per setup, its values in its state.

:func:`make_optimizer` builds, with :func:`optax.inject_hyperparams`, the chain

1. **the gradient process on ``theta_s``** (``optax.partition``: the embedding table and the
   model's shared layers get Algorithm 1 (:func:`htl_jax.optim.hybrid_grad_balance`), PCGrad
   or MetaBalance on their stacked per-task gradients, ``[K, ...]``; every other parameter's
   summed gradient passes through). Without a process ``theta_s`` is the table alone and its
   one summed "task" loses its axis;
2. **back to the table, plus L2** (:func:`table_to_gradient`): the combined slots become the
   table's gradient (dense ``[M, d]``, or :class:`~htl_jax.optim.row_adam.RowSums` for
   row-wise Adam) and the L2 term of the looked-up rows is added (not a task, so after the
   process). It reads the batch through the chain's extra argument ``table_batch``
   (:class:`TableBatch`);
3. **Adam** with ONE learning rate for every parameter (the paper tunes one lr, Table 6):
   ``optax.adam``, or with ``embedding_optimizer='lazy_adam'`` row-wise Adam on the table
   (:func:`htl_jax.optim.row_adam.row_adam`) and ``optax.adam`` on the model, partitioned.

Its tunable values (:data:`HYPERPARAMS`: lr, L2, alpha, gamma, C, MetaBalance's relax, and
PCGrad's seed) are ``inject_hyperparams`` state: runs of equal shapes share one compiled step
whatever their values. :func:`init_opt_state` puts a run's values there.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from htl_jax import embedding, optim
from htl_jax.errors import ConfigError
from htl_jax.optim import per_task
from htl_jax.optim.row_adam import row_adam

GRAD_PROCESSES = ('auto', 'htl', 'pcgrad', 'metabalance', 'none')
EMBEDDING_OPTIMIZERS = ('adam', 'lazy_adam')
# The config fields injected into the chain's state (``seed``: PCGrad's first key).
HYPERPARAMS = ('learning_rate', 'l2', 'alpha', 'gamma', 'clip', 'metabalance_relax', 'seed')
THETA_S, REST = 'theta_s', 'rest'


class TableBatch(NamedTuple):
  """What step 2 needs of the batch (the chain's extra argument ``table_batch``).

  Attributes:
    ids: ``[B, F']`` the global batch's table rows.
    rows: ``[B, F', d]`` their embeddings.
    slots: where the combined table gradient's slots go: ``RowSums`` or
      :class:`~htl_jax.embedding.RowOccurrences` with ``grads=None`` (the slots' ids and
      first occurrences), or None when it is the dense ``[M, d]`` array already.
  """

  ids: jax.Array
  rows: jax.Array
  slots: Any = None


def table_to_gradient(l2: jax.Array, use_l2: bool, sparse: bool
                      ) -> optax.GradientTransformationExtraArgs:
  """Step 2: the table's combined slots as its gradient, plus the L2 term
  (:func:`htl_jax.embedding.table_gradient`); every other leaf passes through."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, table_batch: TableBatch, **extra_args):
    del extra_args
    combined = updates['embedding']['table']
    if table_batch.slots is not None:
      combined = table_batch.slots._replace(grads=combined)
    table = embedding.table_gradient(combined, table_batch.ids, table_batch.rows,
                                     params['embedding']['table'], l2 if use_l2 else None,
                                     sparse)
    return {**updates, 'embedding': {'table': table}}, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def first_task() -> optax.GradientTransformation:
  """No gradient process: the one summed "task" of ``theta_s`` loses its axis."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda g: g[0], updates))


class ChainShape(NamedTuple):
  """What shapes the chain's program (static under ``inject_hyperparams``; a setup's).

  Attributes:
    process: the resolved gradient process ('htl' | 'pcgrad' | 'metabalance' | 'none').
    options: the step-shaping config fields (``per_leaf``, ``grad_conflict``,
      ``grad_magnitude``, ``metabalance_beta``, ...), as a dict.
    num_tasks: K.
    shared: the model's ``theta_s`` patterns (its ``shared`` class fact).
    use_l2: whether the L2 term is in the program (``l2 > 0``).
    sparse: row-wise Adam on the table (``embedding_optimizer='lazy_adam'``).
  """

  process: str
  options: Any
  num_tasks: int
  shared: tuple[str, ...]
  use_l2: bool
  sparse: bool


def gradient_process(shape: ChainShape, values: Any) -> optax.GradientTransformation:
  """The process of step 1 on ``theta_s``'s stacked per-task gradients, with ``values``'
  alpha, gamma, clip (the paper's C), metabalance_relax and seed (:data:`HYPERPARAMS`)."""
  options, num_tasks = shape.options, shape.num_tasks
  if shape.process == 'htl':
    return optim.hybrid_grad_balance(
        alpha=values['alpha'], gamma=values['gamma'], weight_bound=values['clip'],
        core_index=-1, per_leaf=options['per_leaf'], conflict=options['grad_conflict'],
        magnitude=options['grad_magnitude'], num_tasks=num_tasks)
  if shape.process == 'pcgrad':
    return optim.pcgrad(seed=values['seed'], num_tasks=num_tasks)
  if shape.process == 'metabalance':
    return optim.metabalance(num_tasks, beta=options['metabalance_beta'],
                             relax=values['metabalance_relax'], core_index=-1)
  if shape.process == 'none':
    return first_task()
  raise ConfigError(f'config.grad_process={shape.process!r} is not one of '
                    f'{list(GRAD_PROCESSES)}')


def theta_s_labels(shared: tuple[str, ...], with_process: bool):
  """``params -> labels``: the table (and, with a process, the model's ``shared`` layers,
  ``fnmatch`` patterns of their top-level names) are ``theta_s``; the rest is the rest."""
  def labels(params):
    in_theta_s, _ = per_task.split_shared(params['model'], shared if with_process else ())
    model = {name: jax.tree.map(lambda _, n=name: THETA_S if n in in_theta_s else REST,
                                tree)
             for name, tree in params['model'].items()}
    return {'embedding': {'table': THETA_S}, 'model': model}
  return labels


def gradient_steps(shape: ChainShape, values: Any) -> optax.GradientTransformationExtraArgs:
  """Steps 1-2 of the module docstring: the gradient Adam gets (a chain of its own, so a
  test can hold it against a reference)."""
  return optax.chain(
      optax.partition({THETA_S: gradient_process(shape, values), REST: optax.identity()},
                      theta_s_labels(shape.shared, shape.process != 'none')),
      table_to_gradient(values['l2'], shape.use_l2, shape.sparse))


def _chain(learning_rate, l2, alpha, gamma, clip, metabalance_relax, seed, *,
           shape: ChainShape) -> optax.GradientTransformationExtraArgs:
  """Steps 1-3 of the module docstring for one set of values (``inject_hyperparams``
  injects each :data:`HYPERPARAMS` value by its argument name, hence one argument each)."""
  values = dict(l2=l2, alpha=alpha, gamma=gamma, clip=clip,
                metabalance_relax=metabalance_relax, seed=seed)
  if shape.sparse:
    adam = optax.partition({'rows': row_adam(learning_rate), 'dense': optax.adam(learning_rate)},
                           {'embedding': 'rows', 'model': 'dense'})
  else:
    adam = optax.adam(learning_rate)
  return optax.chain(gradient_steps(shape, values), adam)


def chain_shape(options: Any, num_tasks: int, shared: tuple[str, ...],
                use_l2: bool) -> ChainShape:
  """The :class:`ChainShape` of a setup's step-shaping config fields (``options``, with
  ``grad_process`` resolved)."""
  if options['embedding_optimizer'] not in EMBEDDING_OPTIMIZERS:
    raise ConfigError(f'config.embedding_optimizer={options["embedding_optimizer"]!r} is '
                      f'not one of {list(EMBEDDING_OPTIMIZERS)}')
  return ChainShape(options['grad_process'], options, num_tasks, shared, use_l2,
                    options['embedding_optimizer'] == 'lazy_adam')


def make_optimizer(shape: ChainShape, values: Optional[dict[str, Any]] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """The run's chain (module docstring) with :data:`HYPERPARAMS`' ``values`` injected
  (placeholders when None: a step reads them from the state)."""
  values = values or {name: 0.0 for name in HYPERPARAMS}
  return optax.inject_hyperparams(_chain, static_args=('shape',),
                                  hyperparam_dtype=jnp.float32)(shape=shape, **values)


def config_values(config) -> dict[str, jax.Array]:
  """:data:`HYPERPARAMS` of a config as the chain's state holds them."""
  values = {name: jnp.asarray(config[name], jnp.float32) for name in HYPERPARAMS}
  values['seed'] = jnp.asarray(config['seed'], jnp.uint32)
  return values


def process_state(opt_state: Any) -> Any:
  """The gradient process's own state inside the chain's (its diagnostics)."""
  partition = opt_state.inner_state[0][0]
  return partition.inner_states[THETA_S].inner_state

"""Row-wise (lazy) Adam for the embedding table: only the rows of the batch are touched.

``config.embedding_optimizer='lazy_adam'`` (DESIGN section 11). Dense Adam reads and writes
the whole table and both moments every step, O(vocab); this optimizer reads and writes only
the rows looked up in the batch, as TF's LazyAdam and PyTorch's SparseAdam do:

- a row in the batch gets its summed gradient ``g`` (every occurrence of its id, after the
  gradient process, plus its L2 term) and exactly Adam's update::

      m <- b1 m + (1 - b1) g,     v <- b2 v + (1 - b2) g^2,     c <- c + 1
      row <- row - lr * (m / (1 - b1^c)) / (sqrt(v / (1 - b2^c)) + eps)

- a row not in the batch keeps its value, its moments and its count (dense Adam would decay
  its moments and keep moving it with the old momentum).

**Bias correction: a per-row step count** ``c`` (the number of batches the row has been in),
not the global step that TF's LazyAdam and PyTorch's SparseAdam use. With it, every row
runs exactly Adam on its own sequence of gradients: a row in every batch moves exactly as
under dense Adam, and a row seen for the first time at step 10,000 takes a first step of
``lr`` (``m / sqrt(v) = g / |g|`` after correction). With the global count the same row's
moments would be corrected by ``1 - b^10000 = 1``, so its first step would be
``lr (1 - b1) / sqrt(1 - b2) = 3.16 lr``, and rare ids (most of a 1e8-id vocabulary) would
take steps of up to 3x the learning rate, more the rarer they are. The cost is one int32
per row (4 bytes beside the 8 d bytes of the two moments).

The non-embedding parameters keep dense ``optax.adam`` with the same learning rate
(:func:`apply_gradients`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class RowGradients(NamedTuple):
  """The gradient of the table, as summed gradients of the rows of one batch.

  Attributes:
    ids: ``[N]`` int32 table rows, one slot per looked-up row (ids may repeat).
    grads: ``[N, d]``: at the slot where ``unique`` is True, the summed gradient of its id;
      zeros elsewhere.
    unique: ``[N]`` bool, True at exactly one slot of every distinct id.
  """

  ids: jax.Array
  grads: jax.Array
  unique: jax.Array


class RowAdamState(NamedTuple):
  """Adam's moments and per-row step counts for every row of the table.

  Attributes:
    mu: ``[M, d]`` first moments.
    nu: ``[M, d]`` second moments.
    count: ``[M]`` int32, the number of updates each row has had (its bias correction).
  """

  mu: jax.Array
  nu: jax.Array
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class RowAdam:
  """Adam on the rows of a batch only; defaults are ``optax.adam``'s."""

  learning_rate: float
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def init(self, table: jax.Array) -> RowAdamState:
    """Zero moments and counts for a ``[M, d]`` table."""
    return RowAdamState(mu=jnp.zeros_like(table), nu=jnp.zeros_like(table),
                        count=jnp.zeros(table.shape[:1], jnp.int32))

  def update(self, table: jax.Array, state: RowAdamState, grads: RowGradients
             ) -> tuple[jax.Array, RowAdamState]:
    """Adam's step on the rows in ``grads``; every other row is neither read nor written.

    Args:
      table: ``[M, d]`` embedding table.
      state: its :class:`RowAdamState`.
      grads: the batch's :class:`RowGradients`.

    Returns:
      ``(table, state)`` updated. The work is O(N d) for N looked-up rows; the writes are
      scatters into the (donated) table and moments, so nothing of size M is copied.
    """
    ids = grads.ids
    g = grads.grads
    # Every slot computes an update, but only the unique slot of each id (the one holding
    # its summed gradient) writes: the others point past the table and are dropped.
    write = jnp.where(grads.unique, ids, table.shape[0])
    mu = self.b1 * state.mu[ids] + (1.0 - self.b1) * g
    nu = self.b2 * state.nu[ids] + (1.0 - self.b2) * jnp.square(g)
    count = optax.safe_int32_increment(state.count[ids])
    steps = count.astype(g.dtype)[:, None]
    mu_hat = mu / (1.0 - self.b1 ** steps)
    nu_hat = nu / (1.0 - self.b2 ** steps)
    rows = table[ids] - self.learning_rate * mu_hat / (jnp.sqrt(nu_hat) + self.eps)

    def put(buffer: jax.Array, values: jax.Array) -> jax.Array:
      return buffer.at[write].set(values, mode='drop')

    return put(table, rows), RowAdamState(mu=put(state.mu, mu), nu=put(state.nu, nu),
                                          count=put(state.count, count))


def init_state(tx: optax.GradientTransformation, row_adam: RowAdam, params: Any
               ) -> dict[str, Any]:
  """Optimizer state of ``{'embedding': {'table': E}, 'model': ...}`` with lazy rows."""
  return {'model': tx.init(params['model']),
          'table': row_adam.init(params['embedding']['table'])}


def apply_gradients(tx: optax.GradientTransformation, row_adam: RowAdam, params: Any,
                    opt_state: dict[str, Any], grads: Any) -> tuple[Any, dict[str, Any]]:
  """Dense ``tx`` on the model parameters, :class:`RowAdam` on the table's rows.

  Args:
    tx: the dense optimizer of ``params['model']``.
    row_adam: the table's optimizer.
    params: ``{'embedding': {'table': E}, 'model': ...}``.
    opt_state: from :func:`init_state`.
    grads: like ``params``, but ``grads['embedding']['table']`` is a :class:`RowGradients`.

  Returns:
    ``(params, opt_state)`` after one step.
  """
  updates, model_state = tx.update(grads['model'], opt_state['model'], params['model'])
  model = optax.apply_updates(params['model'], updates)
  table, table_state = row_adam.update(params['embedding']['table'], opt_state['table'],
                                       grads['embedding']['table'])
  return ({'embedding': {'table': table}, 'model': model},
          {'model': model_state, 'table': table_state})


def squared_norm(grads: Any) -> jax.Array:
  """``||g||^2`` over every leaf; a :class:`RowGradients` counts its unique slots once."""
  def leaf_sq(g):
    if isinstance(g, RowGradients):
      return jnp.sum(jnp.where(g.unique[:, None], jnp.square(g.grads), 0.0))
    return jnp.sum(jnp.square(g))

  return sum(leaf_sq(g) for g in jax.tree.leaves(
      grads, is_leaf=lambda x: isinstance(x, RowGradients)))

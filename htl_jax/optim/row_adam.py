"""Row-wise (lazy) Adam as an Optax transform: only the rows of a batch are read and written.

For an embedding table with many more rows than a batch looks up (1e6-1e8 ids), dense Adam
costs O(vocabulary) a step. :func:`row_adam` reads and writes only the rows in the batch, as
TF's LazyAdam and PyTorch's SparseAdam do: its updates are :class:`RowSums` (the table's
gradient as one slot per looked-up row, each id's sum at its first slot) and it returns
:class:`RowUpdates`, which :func:`apply_row_updates` adds into the (donated) table in place.

**Bias correction uses a per-row step count** ``c`` (the number of batches the row has been
in), not the global step of TF's LazyAdam and PyTorch's SparseAdam. A row in the batch gets
its summed gradient ``g`` and exactly Adam's update::

    m <- b1 m + (1 - b1) g,     v <- b2 v + (1 - b2) g^2,     c <- c + 1
    row <- row - lr * (m / (1 - b1^c)) / (sqrt(v / (1 - b2^c)) + eps)

and a row not in the batch keeps its value, moments and count. So every row runs exactly
Adam on its own gradients: a row seen for the first time at step 10,000 takes a first step of
``lr``, where a global count (``1 - b^10000 = 1``) would give ``lr (1 - b1) / sqrt(1 - b2) =
3.16 lr``, and rare ids (most of a 1e8-id vocabulary) would take steps of up to 3x the
learning rate. The cost is one int32 per row. Depends on jax and optax only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class RowSums(NamedTuple):
  """A table's gradient as slots of the rows one batch looked up, summed by id.

  Attributes:
    ids: ``[N]`` int32 table rows, one slot per looked-up row (ids repeat).
    grads: ``[..., N, d]`` (a leading task axis while per-task): at an id's first slot the
      sum of its rows' gradients, zeros at its other slots, so dot products and norms over
      the slots equal those of the dense table gradients.
    first: ``[N]`` each slot's id's first slot.
  """

  ids: jax.Array
  grads: jax.Array
  first: jax.Array


class RowUpdates(NamedTuple):
  """What :func:`row_adam` returns for a table: additive updates of some of its rows.

  Attributes:
    rows: ``[N]`` table rows to update; slots that must not write point past the table.
    deltas: ``[N, d]`` the value added to each of those rows.
  """

  rows: jax.Array
  deltas: jax.Array


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


def is_first(first: jax.Array) -> jax.Array:
  """``[N]`` bool: True at exactly one slot of every distinct id (its first occurrence)."""
  return first == jnp.arange(first.shape[0], dtype=first.dtype)


def _is_row_leaf(x: Any) -> bool:
  return isinstance(x, (RowSums, RowUpdates, RowAdamState, optax.MaskedNode))


def row_adam(learning_rate: float | jax.Array, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam on the rows of a batch only (module docstring); defaults are ``optax.adam``'s.

  An optax transform over a tree of tables (``optax.partition`` hands it the embedding's
  part of the parameters): ``init`` holds a :class:`RowAdamState` per table; ``update`` takes
  a :class:`RowSums` per table and returns :class:`RowUpdates`. Every other row is neither
  read nor written: O(N d) work for N looked-up rows.

  Args:
    learning_rate: Adam's step size (may be a traced scalar: injectable).
    b1, b2, eps: Adam's decays and epsilon.
  """
  def init_fn(params):
    def init_one(table):
      if isinstance(table, optax.MaskedNode):
        return table
      return RowAdamState(mu=jnp.zeros_like(table), nu=jnp.zeros_like(table),
                          count=jnp.zeros(table.shape[:1], jnp.int32))
    return jax.tree.map(init_one, params, is_leaf=_is_row_leaf)

  def update_one(grads: RowSums, state: RowAdamState) -> tuple[RowUpdates, RowAdamState]:
    ids, g = grads.ids, grads.grads
    # Every slot computes an update, but only the first slot of each id (the one holding
    # its summed gradient) writes: the others point past the table and are dropped.
    write = jnp.where(is_first(grads.first), ids, state.count.shape[0])
    mu = b1 * state.mu[ids] + (1.0 - b1) * g
    nu = b2 * state.nu[ids] + (1.0 - b2) * jnp.square(g)
    count = optax.safe_int32_increment(state.count[ids])
    steps = count.astype(g.dtype)[:, None]
    mu_hat = mu / (1.0 - b1 ** steps)
    nu_hat = nu / (1.0 - b2 ** steps)

    def put(buffer: jax.Array, values: jax.Array) -> jax.Array:
      return buffer.at[write].set(values, mode='drop')

    return (RowUpdates(write, -(learning_rate * mu_hat / (jnp.sqrt(nu_hat) + eps))),
            RowAdamState(mu=put(state.mu, mu), nu=put(state.nu, nu),
                         count=put(state.count, count)))

  def update_fn(updates, state, params=None):
    del params
    grads, treedef = jax.tree.flatten(updates, is_leaf=_is_row_leaf)
    states = jax.tree.leaves(state, is_leaf=_is_row_leaf)
    pairs = [(g, s) if isinstance(g, optax.MaskedNode) else update_one(g, s)
             for g, s in zip(grads, states)]
    return (treedef.unflatten([u for u, _ in pairs]),
            treedef.unflatten([s for _, s in pairs]))

  return optax.GradientTransformation(init_fn, update_fn)


def apply_row_updates(params: Any, updates: Any) -> Any:
  """``optax.apply_updates`` where a table's update may be :class:`RowUpdates`.

  Row updates are scatter-added into the (donated) table in place; every other leaf is
  ``param + update`` as in optax.
  """
  def apply(p, u):
    if isinstance(u, RowUpdates):
      return p.at[u.rows].add(u.deltas, mode='drop')
    return optax.apply_updates(p, u)

  return jax.tree.map(apply, params, updates, is_leaf=lambda x: isinstance(x, RowUpdates))

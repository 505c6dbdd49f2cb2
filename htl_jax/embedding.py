"""The shared embedding table ``E in R^{M x d}``: layout, lookup, sums by id, its gradient.

One home for the table (the README's Layout; torchrec keeps ``modules/embedding_*`` and its
row-wise optimizers apart the same way: ours is :mod:`htl_jax.optim.row_adam`). In order of
use in a train step:

- **Layout** (:class:`TableLayout`): every field's ids sit at an offset in ONE table; a model
  with independent tasks (DNN) has one copy of the fields per task, stacked as blocks of
  rows. :func:`init_table` draws each field's block Xavier-uniform (Appendix B.1), or
  ``0.01 N(0, 1)`` entries with ``embedding_init='normal'``.
- **Lookup** (:func:`lookup`): field ids ``[B, F]`` -> table rows ``[B, F']`` and their
  embeddings ``[B, F', d]``. Training and serving both use it; serving first reads an id
  outside its vocabulary as OOV (:func:`known_ids`).
- **Sums by id** (:func:`sum_rows_by_id`): per-task gradients of the looked-up rows summed
  per distinct id, as :class:`~htl_jax.optim.row_adam.RowSums`. Their dot products and norms
  equal those of the dense ``[K, M, d]`` table gradients (so Algorithm 1 on them is
  Algorithm 1 on the table), at a cost that grows with the batch, never with the vocabulary.
  Each id's first position in the batch comes from a scatter-min into a persistent int32
  scratch (:func:`first_occurrence_in`), never a sort.
- **Back to the table** (:func:`table_gradient`): the combined gradient plus the L2 term,
  as the dense table gradient (dense Adam) or as ``RowSums`` (row-wise Adam, which reads
  and writes only the batch's rows).

A table's gradient takes one of three forms (:data:`TableGradient`): the dense ``[M, d]``
array, slots summed by id (``RowSums``), or one slot per occurrence
(:class:`RowOccurrences`, for a dense table whose sums nobody reads per id).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from htl_jax.optim.row_adam import RowSums, RowUpdates, is_first

# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class TableLayout:
  """Where each field's ids live in the one table.

  Attributes:
    vocab_sizes: per field, its number of ids (id 0 = OOV).
    copies: blocks of the fields stacked in the table: ``num_tasks`` for a model whose
      tasks have their own embeddings (DNN), else 1.
  """

  vocab_sizes: tuple[int, ...]
  copies: int = 1

  @property
  def vocab(self) -> int:
    """Rows of one copy of the fields."""
    return int(sum(self.vocab_sizes))

  @property
  def rows(self) -> int:
    """``M``, the rows of the table."""
    return self.copies * self.vocab

  @property
  def offsets(self) -> tuple[int, ...]:
    """The first row of every looked-up field, copy by copy (``copies * F`` entries)."""
    starts, total = [], 0
    for size in self.vocab_sizes:
      starts.append(total)
      total += int(size)
    return tuple(s + c * total for c in range(self.copies) for s in starts)


# Tables with more entries are drawn in blocks of rows (see init_table).
_ONE_DRAW_MAX = 1 << 24
_BLOCK_ROWS = 1 << 20
EMBEDDING_INITS = ('xavier', 'normal')


def xavier_limits(layout: TableLayout, dim: int) -> jax.Array:
  """Per field block of the table, Xavier's (Glorot's) uniform bound ``sqrt(6 / (V + d))``.

  Each field's ``V x d`` block is initialised as its own table would be (``fan_in + fan_out =
  V + d``), so putting every field in one table changes nothing. ``[copies * F]`` values, in
  the order of :attr:`TableLayout.offsets`.
  """
  sizes = jnp.asarray(layout.vocab_sizes * layout.copies, jnp.float32)
  return jnp.sqrt(6.0 / (sizes + dim))


def init_table(key: jax.Array, layout: TableLayout, dim: int, kind: str = 'xavier'
               ) -> jax.Array:
  """The ``[M, d]`` table's initial values.

  ``kind='xavier'`` (Appendix B.1: "Xavier initialization are all adopted"): every field's
  block uniform in ``[-b, b]`` with :func:`xavier_limits`'s bound; ``kind='normal'``: ``0.01
  N(0, 1)`` entries (the usual CTR embedding init, and this project's before 0.3).

  Up to ``2^24`` entries: one draw. Larger tables (1e7 rows and up, where the one draw's
  scratch is 3x the table: 12 GB more at 1e8 rows of d = 10) are written block by block
  into one buffer, each block drawn from ``fold_in(key, block)`` (the last block is placed
  to end at the last row), so the scratch is one block.
  """
  if kind not in EMBEDDING_INITS:
    raise ValueError(f'embedding init {kind!r} is not one of {EMBEDDING_INITS}')
  rows = layout.rows
  starts = jnp.asarray(layout.offsets, jnp.int32)
  limits = xavier_limits(layout, dim)

  def draw(block_key: jax.Array, first_row: jax.Array | int, count: int) -> jax.Array:
    if kind == 'normal':
      return 0.01 * jax.random.normal(block_key, (count, dim))
    row = first_row + jnp.arange(count, dtype=jnp.int32)
    bound = limits[jnp.searchsorted(starts, row, side='right') - 1]
    return bound[:, None] * jax.random.uniform(block_key, (count, dim), minval=-1.0,
                                               maxval=1.0)

  if rows * dim <= _ONE_DRAW_MAX:
    return draw(key, 0, rows)
  block = min(_BLOCK_ROWS, rows)

  def write_block(i, table):
    start = jnp.minimum(i * block, rows - block)
    values = draw(jax.random.fold_in(key, i), start, block)
    return jax.lax.dynamic_update_slice(table, values, (start, 0))

  return jax.lax.fori_loop(0, -(-rows // block), write_block, jnp.zeros((rows, dim)))


def known_ids(x: jax.Array, layout: TableLayout) -> jax.Array:
  """Field ids ``[B, F]`` with every id outside its field's vocabulary (negative, or >= its
  size: a value the run never saw, encoded by someone else) mapped to the OOV id 0, as the
  run's own preprocessing maps unseen values. Serving (prediction, the exported model)
  looks ids up through here, so both answer the same for the same ids."""
  sizes = jnp.asarray(layout.vocab_sizes, x.dtype)[None, :]
  return jnp.where((x >= 0) & (x < sizes), x, 0)


def lookup(table: jax.Array, layout: TableLayout, x: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """Field ids ``[B, F]`` -> table rows ``[B, F']`` and embeddings ``[B, F', d]``.

  ``F' = copies * F``: with several copies every field is looked up once per copy.
  """
  if layout.copies > 1:
    x = jnp.tile(x, (1, layout.copies))
  ids = x + jnp.asarray(layout.offsets, jnp.int32)[None, :]
  return ids, table[ids]


# ----------------------------------------------------------------------------- ids


# An id scratch slot that no position has written (larger than any position).
_NO_POSITION = jnp.iinfo(jnp.int32).max


def new_id_scratch(num_ids: int) -> jax.Array:
  """The ``[num_ids]`` int32 scratch of :func:`first_occurrence_in`, every slot unwritten."""
  return jnp.full((num_ids,), _NO_POSITION, jnp.int32)


def first_occurrence_in(flat_ids: jax.Array, scratch: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """For each position, the first position holding the same id, ``[N]``: O(N) work.

  The scratch (from :func:`new_id_scratch`, kept in the train state) is unwritten
  everywhere on entry; the positions are scatter-min'ed into the slots of ``flat_ids``,
  gathered, and those slots reset, so it is unwritten everywhere again on return. Pass the
  scratch in a donated buffer and use only the returned one: XLA then updates it in place.
  No sort (on XLA:CPU a sort of a batch's ids is a large part of a step).

  Returns:
    ``(first [N], scratch)``.
  """
  positions = jnp.arange(flat_ids.shape[0], dtype=jnp.int32)
  written = scratch.at[flat_ids].min(positions, mode='promise_in_bounds')
  first = written[flat_ids]
  # The reset values are computed from ``first`` (max(first, _NO_POSITION) is
  # _NO_POSITION): a reset that does not depend on the gather makes XLA copy the whole
  # scratch twice, to keep the gather's input alive past the in-place scatters.
  unwritten = jnp.maximum(first, _NO_POSITION)
  return first, written.at[flat_ids].set(unwritten, mode='promise_in_bounds')


def first_occurrence(flat_ids: jax.Array, num_ids: int) -> jax.Array:
  """:func:`first_occurrence_in` with a fresh scratch (an int32 fill of ``num_ids``)."""
  return first_occurrence_in(flat_ids, new_id_scratch(num_ids))[0]


# ----------------------------------------------------------------------------- gradients


class RowOccurrences(NamedTuple):
  """A table's gradient as slots of the rows one batch looked up, NOT summed by id: each
  slot holds one occurrence's gradient. What a dense table's summed gradient needs (the
  scatter adds the occurrences up); nothing reads per-id sums from it.

  Attributes:
    ids: ``[N]`` int32 table rows, one slot per looked-up row (ids repeat).
    grads: ``[..., N, d]``.
  """

  ids: jax.Array
  grads: jax.Array


# A table's gradient: the dense ``[M, d]`` array, slots summed by id (RowSums), or one slot
# per occurrence (RowOccurrences).
TableGradient = Union[jax.Array, RowSums, RowOccurrences]


def occurrences(first: jax.Array) -> jax.Array:
  """``[N]`` float32: at an id's first position, how often the id occurs; 0 elsewhere."""
  return jnp.zeros(first.shape, jnp.float32).at[first].add(1.0, mode='promise_in_bounds')


def sum_rows_by_id(ids: jax.Array, row_grads: Sequence[jax.Array], num_ids: int,
                   dense: bool | None = None, first: jax.Array | None = None
                   ) -> jax.Array | RowSums:
  """Sum row gradients that hit the same table id, per task.

  Args:
    ids: ``[B, F]`` (any shape with N elements) table rows of the looked-up embeddings,
      all in ``[0, num_ids)`` (not checked: the loaders map every value into its vocabulary).
    row_grads: K per-task gradients of those rows, each ``[*ids.shape, d]`` (or one stacked
      ``[K, *ids.shape, d]`` array).
    num_ids: rows of the table.
    dense: True: sum into a ``[K, num_ids, d]`` table gradient; False: N slots. None
      (default) picks the smaller, so the cost never grows with the vocabulary beyond the
      batch.
    first: the slots' first occurrences when already known (the slots are then sparse and
      nothing of size ``num_ids`` is touched).

  Returns:
    The dense ``[K, num_ids, d]`` table gradients, or :class:`RowSums` with ``grads``
    ``[K, N, d]``.
  """
  flat = ids.reshape(-1)
  n = flat.shape[0]
  sets = list(row_grads)
  dim = sets[0].shape[-1]
  is_dense = first is None and (dense if dense is not None else num_ids <= n)
  if is_dense:
    num_slots, slots = num_ids, flat
  else:
    num_slots = n
    first = first if first is not None else first_occurrence(flat, num_ids)
    slots = first
  # Task k's slots are rows [k * num_slots, (k + 1) * num_slots) of ONE buffer that every
  # scatter updates in place: no per-task buffers to stack afterwards.
  summed = jnp.zeros((len(sets) * num_slots, dim), sets[0].dtype)
  for k, grads in enumerate(sets):
    summed = summed.at[slots + k * num_slots].add(grads.reshape(n, dim),
                                                  mode='promise_in_bounds')
  summed = summed.reshape(len(sets), num_slots, dim)
  return summed if is_dense else RowSums(flat, summed, first)


def split_slots(grads: TableGradient) -> tuple[jax.Array, Any]:
  """A table gradient as its array (the dense table's, or its slots') and where the slots
  go (``grads`` with ``grads=None``; None for the dense form)."""
  if isinstance(grads, (RowSums, RowOccurrences)):
    return grads.grads, grads._replace(grads=None)
  return grads, None


def scatter_to_table(table: jax.Array, grads: TableGradient) -> jax.Array:
  """The dense ``[M, d]`` gradient of ``table`` from a task-free table gradient."""
  if isinstance(grads, (RowSums, RowOccurrences)):
    return jnp.zeros_like(table).at[grads.ids].add(grads.grads)
  return grads


def table_gradient(combined: TableGradient, ids: jax.Array, rows: jax.Array,
                   table: jax.Array, l2: float | jax.Array | None, sparse: bool
                   ) -> jax.Array | RowSums:
  """The table's gradient from the combined (task-free) one, plus the L2 term's.

  The L2 term is ``l2 * mean_b sum_f ||e_bf||^2`` over the looked-up rows
  (docs/design.md: not a task, so added after the gradient process): each occurrence adds
  ``(2 l2 / B) e``, so an id's sum is its count in the batch times that.

  Args:
    combined: ``[M, d]`` (dense) or ``[N, d]`` slots after the gradient process.
    ids, rows: the global batch's ``[B, F]`` table rows and ``[B, F, d]`` embeddings.
    table: the ``[M, d]`` table.
    l2: the L2 weight lambda (a number or a scalar array); None leaves the term out.
    sparse: True for row-wise Adam (``combined`` is then :class:`RowSums`).

  Returns:
    ``sparse``: :class:`RowSums` (never O(vocab)); else the dense ``[M, d]`` gradient.
  """
  flat = ids.reshape(-1)
  coef = 2.0 * l2 / ids.shape[0] if l2 is not None else None
  flat_rows = rows.reshape(flat.shape[0], -1)
  if sparse:
    if coef is None:
      return combined
    return combined._replace(grads=combined.grads
                             + coef * occurrences(combined.first)[:, None] * flat_rows)
  if not isinstance(combined, (RowSums, RowOccurrences)):
    if coef is None:
      return combined
    counts = jnp.zeros(table.shape[:1], table.dtype).at[flat].add(
        1.0, mode='promise_in_bounds')
    return combined + coef * counts[:, None] * table
  if coef is not None:     # per slot: the scatter adds every occurrence's term
    combined = combined._replace(grads=combined.grads + coef * flat_rows)
  return scatter_to_table(table, combined)


def squared_norm(tree: Any) -> jax.Array:
  """``||g||^2`` over every leaf: a gradient, or an update; :class:`RowSums` count each id
  once, :class:`~htl_jax.optim.row_adam.RowUpdates` count their deltas."""
  def leaf_sq(g):
    if isinstance(g, RowSums):
      return jnp.sum(jnp.where(is_first(g.first)[:, None], jnp.square(g.grads), 0.0))
    if isinstance(g, RowOccurrences):
      return jnp.sum(jnp.square(g.grads))
    if isinstance(g, RowUpdates):
      return jnp.sum(jnp.square(g.deltas))
    return jnp.sum(jnp.square(g))

  return sum(leaf_sq(g) for g in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, (RowSums, RowOccurrences, RowUpdates))))

"""Per-task gradients of the shared parameters ``theta_s``, sparse by id (DESIGN section 4).

``theta_s`` is the one embedding table ``E in R^{M x d}`` (fields at offsets into it), plus,
in models with a shared part, the model parameters whose top-level names match the model's
``shared`` patterns (:func:`split_shared`; e.g. Shared-Bottom's ``bottom``). Per-task
gradients of the embedding are taken with respect to the rows looked up in the batch
(``[B, F, d]``), never the dense table, and then summed by embedding id, so their cost grows
with the batch and not with the vocabulary; the shared dense layers are differentiated
directly:

- :func:`row_grads_general`: one forward pass, then K backward passes (``jax.vmap`` over the
  one-hot cotangents of a ``jax.vjp``, or each task's term transposed on its own). Valid for
  every model, and the only path that also gives per-task gradients of shared dense layers.
- :func:`row_grads_isolated`: each task tower reads its own copy of the rows, so ONE backward
  pass of the summed loss gives every task's gradient. Valid when the model's
  ``isolated_towers`` is True (HTLNet with Eq. 15's stop-gradient, DNN).
- :func:`sum_rows_by_id`: K row gradients ``[N, d]`` -> per task, one slot per distinct id
  holding the sum of its rows (other slots zero), ``[K, slots, d]``. Dot products and norms
  of these equal those of the dense ``[K, M, d]`` table gradients, so Algorithm 1 on them
  equals Algorithm 1 on the dense gradients; :func:`scatter_to_table` maps the combined
  result back.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# ``(model_params, embs) -> the K task losses`` (a tuple of scalars, or a ``[K]`` array),
# ``embs`` a tuple of K arrays ``[B, F, d]``.
LossTermsFn = Callable[[Any, tuple[jax.Array, ...]], Sequence[jax.Array] | jax.Array]


class IdGradients(NamedTuple):
  """Gradients of the distinct ids of a batch.

  Attributes:
    ids: ``[N]`` int32 table rows; an id's summed gradient sits at its first occurrence,
      its other occurrences hold zeros. None: ``grads`` is the dense table gradient.
    grads: ``[..., N, d]`` gradient of each slot (a leading task axis when per-task).
  """

  ids: jax.Array | None
  grads: jax.Array


def table_ids(x: jax.Array, offsets: jax.Array) -> jax.Array:
  """Field ids ``[B, F]`` -> rows of the one shared table ``[B, F]``."""
  return x + offsets[None, :]


def split_shared(model_params: dict[str, Any], patterns: Sequence[str]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits the top-level model parameters into (in ``theta_s``, the rest) by name pattern."""
  def is_shared(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)

  shared = {k: v for k, v in model_params.items() if is_shared(k)}
  rest = {k: v for k, v in model_params.items() if not is_shared(k)}
  return shared, rest


class PerTaskGrads(NamedTuple):
  """Per-task gradients of ``theta_s`` and the summed gradient of everything else.

  Attributes:
    losses: ``[K]`` task losses.
    rows: K arrays ``[B, F, d]``, task k's gradient of the looked-up embedding rows.
    shared: the shared model parameters' gradients, every leaf with a leading task axis K.
    rest: gradient of the summed loss for the other model parameters.
  """

  losses: jax.Array
  rows: tuple[jax.Array, ...]
  shared: Any
  rest: Any


def row_grads_general(loss_terms: LossTermsFn, model_params: Any, rows: jax.Array,
                      num_tasks: int, shared: Sequence[str] = ()) -> PerTaskGrads:
  """Per-task gradients of the rows and shared layers from one forward pass.

  - ``theta_s`` is the embedding alone: one ``jax.vjp`` of the stacked losses, ``vmap`` over
    the K one-hot cotangents, and one pass of the summed loss for the other parameters.
  - ``theta_s`` also holds dense shared layers: one ``jax.linearize``, then each task's
    term transposed on its own (``jax.linear_transpose``), one after the other. The other
    terms' cotangents stay symbolic zeros, so task k's backward pass skips what feeds only
    them (the other towers and gates, where the model keeps its tasks' outputs apart:
    ``ModelOutput.task_probs``). Not by ``vmap``: XLA:CPU then lays the ReLU gradient
    ``[K, B, N]`` out transposed for the weight matmuls, a copy that cost more than the
    matmuls (the README's Benchmarks). The non-shared parameters' gradient is the sum of
    the per-task ones (the transpose is linear).

  Args:
    loss_terms: ``(model_params, embs) -> K losses`` where ``embs`` is a tuple of K arrays
      ``[B, F, d]`` (task k reads ``embs[k]``).
    model_params: the model's parameters (towers, experts, ...).
    rows: ``[B, F, d]`` looked-up embedding rows.
    num_tasks: K.
    shared: patterns of the top-level model parameters in ``theta_s``.

  Returns:
    :class:`PerTaskGrads`; the non-shared parameters get the gradient of ``sum(losses)``.
  """
  shared_params, rest_params = split_shared(model_params, shared)
  primals = (rows, shared_params, rest_params)

  def f(rows, shared_params, rest_params):
    return loss_terms({**shared_params, **rest_params}, (rows,) * num_tasks)

  if not shared_params:
    losses, vjp_fn = jax.vjp(lambda *p: jnp.stack(f(*p)), *primals)
    eye = jnp.eye(num_tasks, dtype=losses.dtype)
    row_grads, shared_grads = jax.vmap(lambda ct: vjp_fn(ct)[:2])(eye)
    _, _, rest_grads = vjp_fn(jnp.ones_like(losses))
    return PerTaskGrads(losses, tuple(row_grads), shared_grads, rest_grads)
  terms, f_jvp = jax.linearize(f, *primals)
  losses = jnp.stack(terms)
  one = jnp.ones((), losses.dtype)
  row_grads, shared_grads, rest_grads = zip(*(
      jax.linear_transpose(lambda *t, k=k: f_jvp(*t)[k], *primals)(one)
      for k in range(num_tasks)))
  return PerTaskGrads(losses, row_grads,
                      jax.tree.map(lambda *g: jnp.stack(g), *shared_grads),
                      jax.tree.map(lambda *g: sum(g), *rest_grads))


def row_grads_isolated(loss_terms: LossTermsFn, model_params: Any, rows: jax.Array,
                       num_tasks: int) -> PerTaskGrads:
  """Per-task row gradients in one backward pass (each tower reads its own copy).

  Same contract as :func:`row_grads_general` for a model whose ``theta_s`` is the embedding
  alone; only valid for models with isolated towers.
  """
  def f(copies, model_params):
    losses = jnp.stack(loss_terms(model_params, copies))
    return jnp.sum(losses), losses

  # K separate arguments (not slices of one stacked array): each copy's gradient is its own
  # buffer, with no zero-padded [K, B, F, d] cotangent per task to add up, and none is
  # copied into a stacked array (sum_rows_by_id reads them one by one).
  copies = (rows,) * num_tasks
  grad_fn = jax.grad(f, argnums=(0, 1), has_aux=True)
  (copy_grads, model_grads), losses = grad_fn(copies, model_params)
  return PerTaskGrads(losses, tuple(copy_grads), {}, model_grads)


def row_grads_summed(loss_terms: LossTermsFn, model_params: Any, rows: jax.Array,
                     num_tasks: int) -> tuple[jax.Array, jax.Array, Any]:
  """Only the gradient of the summed loss (no gradient process).

  Returns:
    ``(losses [K], row gradients [B, F, d], model gradients)``.
  """
  def f(rows, model_params):
    losses = jnp.stack(loss_terms(model_params, (rows,) * num_tasks))
    return jnp.sum(losses), losses

  (row_grads, model_grads), losses = jax.grad(
      f, argnums=(0, 1), has_aux=True)(rows, model_params)
  return losses, row_grads, model_grads


def first_occurrence(flat_ids: jax.Array, num_ids: int) -> jax.Array:
  """For each position, the first position in ``flat_ids`` holding the same id, ``[N]``.

  A scatter-min into an int32 scratch of ``num_ids`` slots then a gather: O(N) work plus an
  int32 fill of ``num_ids`` (a tenth of a d=10 float table, far less than dense Adam's pass
  over the table). No sort: XLA:CPU sorts 92k ids in ~27 ms, which this avoids. Without
  the fill, see :func:`first_occurrence_in`.
  """
  return first_occurrence_in(flat_ids, new_id_scratch(num_ids))[0]


# An id scratch slot that no position has written (larger than any position).
_NO_POSITION = jnp.iinfo(jnp.int32).max


def new_id_scratch(num_ids: int) -> jax.Array:
  """The ``[num_ids]`` int32 scratch of :func:`first_occurrence_in`, every slot unwritten."""
  return jnp.full((num_ids,), _NO_POSITION, jnp.int32)


def first_occurrence_in(flat_ids: jax.Array, scratch: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """:func:`first_occurrence` in a persistent scratch: O(N) work, no O(num_ids) fill.

  The scratch (from :func:`new_id_scratch`, kept in the train state) is unwritten
  everywhere on entry; the positions are scatter-min'ed into the slots of ``flat_ids``,
  gathered, and those slots reset, so it is unwritten everywhere again on return. Pass the
  scratch in a donated buffer and use only the returned one: XLA then updates it in place.

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


def occurrences(first: jax.Array) -> jax.Array:
  """``[N]`` float32: at an id's first position, how often the id occurs; 0 elsewhere."""
  return jnp.zeros(first.shape, jnp.float32).at[first].add(1.0, mode='promise_in_bounds')


def sum_rows_by_id(ids: jax.Array, row_grads: jax.Array | Sequence[jax.Array], num_ids: int,
                   dense: bool | None = None, first: jax.Array | None = None
                   ) -> IdGradients:
  """Sum row gradients that hit the same table id, per task.

  Args:
    ids: ``[B, F]`` (or any shape with N elements) table ids of the looked-up rows, all in
      ``[0, num_ids)`` (not checked: the loaders map every value into its vocabulary).
    row_grads: K per-task gradients of those rows: a sequence of K arrays
      ``[*ids.shape, d]`` (or one stacked ``[K, *ids.shape, d]`` array).
    num_ids: rows of the table.
    dense: True: sum into a ``[K, num_ids, d]`` table gradient; False: N slots, one per
      looked-up row. None (default) picks the smaller, so the cost is bounded by
      ``min(num_ids, N)`` and never grows with the vocabulary beyond the batch.
    first: the slots' :func:`first_occurrence` positions when already known (then the
      slots are sparse and nothing of size ``num_ids`` is touched).

  Returns:
    :class:`IdGradients` with ``grads`` of shape ``[K, slots, d]``. Dense: ``ids`` is None
    and ``grads`` is the table gradient.
    Sparse: the slot of an id's first occurrence holds the sum of all its rows' gradients,
    every other slot holds zeros, and ``ids`` are the flat ids.
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
    slots = first if first is not None else first_occurrence(flat, num_ids)
  # Task k's slots are rows [k * num_slots, (k + 1) * num_slots) of ONE buffer that every
  # scatter updates in place: no per-task buffers to stack afterwards.
  summed = jnp.zeros((len(sets) * num_slots, dim), sets[0].dtype)
  for k, grads in enumerate(sets):
    summed = summed.at[slots + k * num_slots].add(grads.reshape(n, dim),
                                                  mode='promise_in_bounds')
  return IdGradients(None if is_dense else flat, summed.reshape(len(sets), num_slots, dim))


def scatter_to_table(table: jax.Array, id_grads: IdGradients) -> jax.Array:
  """Dense gradient of ``table`` from the (combined, task-free) gradients of its ids."""
  if id_grads.ids is None:
    return id_grads.grads
  return jnp.zeros_like(table).at[id_grads.ids].add(id_grads.grads)

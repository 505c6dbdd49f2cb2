"""Per-task gradients of the shared parameters ``theta_s`` (docs/design.md): autodiff only.

``theta_s`` is the shared embedding (its looked-up rows ``[B, F, d]``, never the dense
table) plus, in models with a shared part, the model parameters whose top-level names match
the model's ``shared`` patterns (:func:`split_shared`; e.g. Shared-Bottom's ``bottom``).
Everything else gets the gradient of the summed loss. Three ways to take them:

- :func:`row_grads_general`: one forward pass, then K backward passes (``jax.vmap`` over the
  one-hot cotangents of a ``jax.vjp``, or each task's term transposed on its own). Valid for
  every model, and the only path that also gives per-task gradients of shared dense layers.
- :func:`row_grads_isolated`: each task tower reads its own copy of the rows, so ONE backward
  pass of the summed loss gives every task's gradient. Valid when the model's
  ``isolated_towers`` is True (HTLNet with Eq. 15's stop-gradient, DNN).
- :func:`row_grads_summed`: the summed loss's gradient only (no gradient process).

Summing the row gradients by embedding id and mapping them back to the table is the table's
business (:mod:`htl_jax.embedding`).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# ``(model_params, embs) -> the K task losses`` (a tuple of scalars, or a ``[K]`` array),
# ``embs`` a tuple of K arrays ``[B, F, d]``.
LossTermsFn = Callable[[Any, tuple[jax.Array, ...]], Sequence[jax.Array] | jax.Array]


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
    matmuls (docs/benchmarks.md). The non-shared parameters' gradient is the sum of
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

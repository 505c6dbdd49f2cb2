"""Pure train / eval steps, one global batch each, run under ``pmap``.

``train_step(setup, state, batch, with_diagnostics) -> (state, metrics)``:

1. look up the embedding rows of the batch, ``[B, F, d]`` (for a model with independent
   tasks, every field once per task's table: ``[B, K*F, d]``);
2. per-task losses ``[K]`` and per-task gradients of ``theta_s``: the rows (K arrays
   ``[B, F, d]``) and the model's shared layers (leading task axis K); one backward pass when
   the towers are isolated, else ``vmap`` over the cotangents of one ``vjp``
   (``htl_jax.optim.per_task``); every other parameter gets the gradient of the summed loss.
   Without a gradient process only the summed gradient is taken;
3. across devices: dense gradients are averaged, row gradients gathered, so the gradient
   process sees the gradients of the GLOBAL batch;
4. rows summed by id; the gradient process (Algorithm 1, PCGrad or MetaBalance) combines the
   per-task gradients of ``theta_s`` jointly; then the L2 term on the looked-up rows is added
   (it is not a task);
5. Adam (one learning rate), then the temperature decay (Appendix A). With
   ``embedding_optimizer='adam'`` dense Adam updates every parameter; with ``'lazy_adam'``
   the model's parameters get dense Adam and the table only its batch's rows
   (:mod:`htl_jax.optim.lazy_adam`): the table gradient stays one slot per looked-up row
   (never a dense ``[vocab, d]`` array), the ids' first occurrences come from a persistent
   scratch in the state (:func:`per_task.first_occurrence_in`), so no part of the step
   costs O(vocab).

The metrics carry the data of the paper's Fig. 5: per task, the norm of its gradient on
``theta_s`` before and after the gradient process and its cosine with the core gradient.
They come from the gradients the step computes anyway; without a gradient process the
per-task gradients are taken only where ``with_diagnostics`` is true (a ``lax.cond`` in the
same program), and never change the update.

The step RNG is ``fold_in(rng, step)``; Gumbel noise is keyed by each example's position in
its split, so 1 and N devices draw the same noise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from htl_jax.optim import lazy_adam, per_task, task_norms_and_cosines
from htl_jax.train import parallel
from htl_jax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


def _loss_vector_fn(setup: TrainSetup, state: TrainState, batch: Batch, train: bool):
  key = jax.random.fold_in(state.rng, state.step)

  def loss_vector(model_params, embs):
    out = setup.model.apply({'params': model_params}, embs, train=train, tau=state.tau,
                            example_index=batch['index'], rngs={'gumbel': key})
    return setup.objective.loss_vector(out, batch), None

  return loss_vector


def lookup(setup: TrainSetup, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Table rows ``[B, F']`` and looked-up embeddings ``[B, F', d]`` (F' = copies * F)."""
  x = batch['x']
  if setup.table_copies > 1:
    x = jnp.tile(x, (1, setup.table_copies))
  ids = per_task.table_ids(x, jnp.asarray(setup.offsets, jnp.int32))
  return ids, params['embedding']['table'][ids]


def _per_task(setup: TrainSetup, state: TrainState, batch: Batch, rows: jax.Array
              ) -> per_task.PerTaskGrads:
  loss_vector = _loss_vector_fn(setup, state, batch, True)
  if setup.grad_path == 'isolated':
    return per_task.row_grads_isolated(loss_vector, state.params['model'], rows,
                                       setup.spec.num_tasks)
  return per_task.row_grads_general(loss_vector, state.params['model'], rows,
                                    setup.spec.num_tasks, setup.shared)


def _global_rows(row_grads, rows: jax.Array):
  """Gather the sparse pieces of every device; local means -> global mean.

  ``row_grads`` is one ``[B, F, d]`` array or a tuple of K of them (per task).
  """
  n = parallel.num_replicas()
  row_grads = jax.tree.map(lambda g: parallel.gather(g, 0) / n, row_grads)
  return row_grads, parallel.gather(rows, 0)


def _with_l2(setup: TrainSetup, row_grads: jax.Array, rows: jax.Array) -> jax.Array:
  """Adds the gradient of the L2 term ``l2 * mean_b sum_f ||e_bf||^2`` to each row's."""
  if not setup.l2:
    return row_grads
  return row_grads + (2.0 * setup.l2 / rows.shape[0]) * rows


def _table_with_l2(setup: TrainSetup, table_grad: jax.Array, ids: jax.Array,
                   table: jax.Array) -> jax.Array:
  """Adds the L2 term's gradient to a dense table gradient.

  Summed over a row's occurrences, the L2 gradient is the row's count in the batch times
  ``(2 l2 / B) E[id]``: a scalar scatter of counts instead of a scatter of ``[B, F, d]``.
  """
  if not setup.l2:
    return table_grad
  counts = jnp.zeros(table.shape[:1], table.dtype).at[ids.reshape(-1)].add(
      1.0, mode='promise_in_bounds')
  return table_grad + (2.0 * setup.l2 / ids.shape[0]) * counts[:, None] * table


def _row_gradients(setup: TrainSetup, slot_grads: jax.Array, ids: jax.Array,
                   first: jax.Array, rows: jax.Array | None = None
                   ) -> lazy_adam.RowGradients:
  """The table's sparse gradient for ``lazy_adam``: slots by first occurrence.

  Args:
    slot_grads: ``[N, d]``, an id's summed gradient at its first occurrence, zeros elsewhere.
    ids, first: ``[B, F]`` global table ids and ``[N]`` their first occurrences.
    rows: ``[B, F, d]`` looked-up rows: their L2 term is added (count x ``(2 l2 / B) E[id]``
      at the first occurrence); None when ``slot_grads`` already has it.
  """
  flat = ids.reshape(-1)
  if rows is not None and setup.l2:
    counts = per_task.occurrences(first)
    slot_grads = slot_grads + ((2.0 * setup.l2 / ids.shape[0]) * counts[:, None]
                               * rows.reshape(slot_grads.shape))
  unique = first == jnp.arange(flat.shape[0], dtype=first.dtype)
  return lazy_adam.RowGradients(flat, slot_grads, unique)


def _theta_s_grads(setup: TrainSetup, state: TrainState, batch: Batch, rows: jax.Array,
                   ids: jax.Array, first: jax.Array | None):
  """Per-task gradients of ``theta_s`` over the global batch.

  Args:
    rows: the local looked-up rows; ``ids``: the GLOBAL table ids; ``first``: their first
      occurrences (``lazy_adam``) or None (chosen by :func:`per_task.sum_rows_by_id`).

  Returns:
    ``(grads, stacked, slot_ids, rows)``: the local :class:`per_task.PerTaskGrads`; the
    per-task gradients of ``theta_s``, ``{'embedding': [K, slots, d], 'shared': [K,
    ...]}`` (rows summed by id, see :func:`per_task.sum_rows_by_id`); the slots' ids (None
    when the slots are the dense table); and the global rows.
  """
  grads = _per_task(setup, state, batch, rows)
  row_grads, rows = _global_rows(grads.rows, rows)
  id_grads = per_task.sum_rows_by_id(ids, row_grads, setup.table_rows, first=first)
  stacked = {'embedding': id_grads.grads, 'shared': parallel.mean(grads.shared)}
  return grads, stacked, id_grads.ids, rows


def _diagnostics(stacked: Any, processed_norms: jax.Array) -> dict[str, jax.Array]:
  """Fig. 5's data: per-task norms on ``theta_s`` before / after, cosine with the core."""
  norms, cosines = task_norms_and_cosines(stacked, core_index=-1)
  return {'task_grad_norm': norms, 'task_grad_norm_processed': processed_norms,
          'task_grad_cos_core': cosines}


def _summed_update(setup: TrainSetup, state: TrainState, batch: Batch, rows, ids, first,
                   with_diagnostics: jax.Array | bool):
  """No gradient process: the gradient of the summed loss (plus diagnostics on request).

  A traced ``with_diagnostics`` selects the diagnostics with a ``lax.cond`` (both branches
  compiled); a Python bool traces only the branch asked for.
  """
  table = state.params['embedding']['table']
  losses, row_grads, model_grads = per_task.row_grads_summed(
      _loss_vector_fn(setup, state, batch, True), state.params['model'], rows,
      setup.spec.num_tasks)
  row_grads, g_rows = _global_rows(row_grads, rows)
  row_grads = _with_l2(setup, row_grads, g_rows)
  if first is None:
    table_grad = jnp.zeros_like(table).at[ids].add(row_grads)
  else:
    summed = per_task.sum_rows_by_id(ids, (row_grads,), setup.table_rows, first=first)
    table_grad = _row_gradients(setup, summed.grads[0], ids, first)
  grads = {'embedding': {'table': table_grad}, 'model': parallel.mean(model_grads)}

  def diagnose():
    stacked = _theta_s_grads(setup, state, batch, rows, ids, first)[1]
    norms = task_norms_and_cosines(stacked, core_index=-1)[0]
    return _diagnostics(stacked, norms)

  def skip():
    zeros = jnp.zeros((setup.spec.num_tasks,), jnp.float32)
    return {'task_grad_norm': zeros, 'task_grad_norm_processed': zeros,
            'task_grad_cos_core': zeros}

  if isinstance(with_diagnostics, bool):    # static: trace only the branch that runs
    diag = diagnose() if with_diagnostics else skip()
  else:
    diag = jax.lax.cond(with_diagnostics, diagnose, skip)
  return grads, parallel.mean(losses), state.opt_state['balance'], diag


def _balanced_update(setup: TrainSetup, state: TrainState, batch: Batch, rows, ids, first):
  """The gradient process on ``theta_s``; everything else gets the summed gradient."""
  table = state.params['embedding']['table']
  grads, stacked, slot_ids, g_rows = _theta_s_grads(setup, state, batch, rows, ids, first)
  combined, balance_state = setup.balance.update(stacked, state.opt_state['balance'])
  if first is not None:
    table_grad = _row_gradients(setup, combined['embedding'], ids, first, g_rows)
  elif slot_ids is None:                    # already the dense table gradient
    table_grad = _table_with_l2(setup, combined['embedding'], ids, table)
  else:
    # Slot j belongs to id ids.flat[j] (zeros where j is not an id's first occurrence),
    # so the slots scatter with the same index array as the rows.
    row_grads = _with_l2(setup, combined['embedding'].reshape(g_rows.shape), g_rows)
    table_grad = jnp.zeros_like(table).at[ids].add(row_grads)
  model_grads = {**parallel.mean(grads.rest), **combined['shared']}
  diag = _diagnostics(stacked, balance_state.processed_norms)
  return ({'embedding': {'table': table_grad}, 'model': model_grads},
          parallel.mean(grads.losses), balance_state, diag)


class StepGradients(NamedTuple):
  """What :func:`gradients` returns.

  Attributes:
    grads: shaped like ``state.params`` (``theta_s`` combined by the gradient process, L2
      included); with ``lazy_adam`` the table's is a :class:`lazy_adam.RowGradients`.
    losses: ``[K]`` per-task losses (mean over devices).
    balance_state: the gradient process's new state.
    diagnostics: the Fig. 5 diagnostics.
    id_scratch: ``lazy_adam``'s id scratch to keep in the state (None with dense Adam).
  """

  grads: Any
  losses: jax.Array
  balance_state: Any
  diagnostics: dict[str, jax.Array]
  id_scratch: jax.Array | None


def gradients(setup: TrainSetup, state: TrainState, batch: Batch,
              with_diagnostics: jax.Array | bool = False) -> StepGradients:
  """Steps 1-4 of the module docstring: the gradient of every parameter for this batch."""
  ids, rows = lookup(setup, state.params, batch)
  ids = parallel.gather(ids, 0)
  first, scratch = None, None
  if setup.row_adam is not None:
    first, scratch = per_task.first_occurrence_in(ids.reshape(-1),
                                                  state.opt_state['id_scratch'])
  if setup.balance is None:
    out = _summed_update(setup, state, batch, rows, ids, first, with_diagnostics)
  else:
    out = _balanced_update(setup, state, batch, rows, ids, first)
  return StepGradients(*out, id_scratch=scratch)


def train_step(setup: TrainSetup, state: TrainState, batch: Batch,
               with_diagnostics: jax.Array | bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on one global batch (the local shard under ``pmap``)."""
  grads, losses, balance_state, diag, scratch = gradients(setup, state, batch,
                                                          with_diagnostics)
  opt_state = {'balance': balance_state}
  if setup.row_adam is None:
    updates, opt_state['optimizer'] = setup.tx.update(grads, state.opt_state['optimizer'],
                                                      state.params)
    params = optax.apply_updates(state.params, updates)
  else:
    params, opt_state['optimizer'] = lazy_adam.apply_gradients(
        setup.tx, setup.row_adam, state.params, state.opt_state['optimizer'], grads)
    opt_state['id_scratch'] = scratch
  loss = jnp.sum(losses)
  grad_norm = jnp.sqrt(lazy_adam.squared_norm(grads))
  new_step = state.step + 1
  new_state = state.replace(
      step=new_step, params=params, tau=setup.tau.next(state.tau, new_step),
      opt_state=opt_state)
  metrics = {'loss': loss, 'task_losses': losses, 'grad_norm': grad_norm,
             'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm), 'tau': state.tau,
             **diag}
  return new_state, metrics


def eval_step(setup: TrainSetup, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  """Predictions of one batch: binary probabilities and the core on the original scale."""
  _, rows = lookup(setup, state.params, batch)
  out = setup.model.apply({'params': state.params['model']}, (rows,) * setup.spec.num_tasks,
                          train=False, tau=state.tau, example_index=batch['index'])
  return {'probs': out.probs, 'core': setup.objective.predict_core(out),
          'weight': batch['weight']}

"""Pure train / eval / diagnostic steps, one global batch each, run under ``pmap``.

``train_step(setup, state, batch) -> (state, metrics)``:

1. look up the shared embedding rows of the batch, ``[B, F, d]``;
2. per-task losses ``[K]`` and per-task gradients of those rows, K arrays ``[B, F, d]``: one
   backward pass when the towers are isolated, else ``vmap`` over the cotangents of one
   ``vjp`` (``htl_jax.optim.per_task``); towers get the gradient of the summed loss;
3. across devices: tower gradients are averaged, row gradients gathered, so the gradient
   process sees the gradients of the GLOBAL batch;
4. rows summed by id and combined by the gradient process (Algorithm 1, PCGrad or
   MetaBalance), then the L2 term on the looked-up rows is added;
5. Adam, then the temperature decay (Appendix A).

The step RNG is ``fold_in(rng, step)``; Gumbel noise is keyed by each example's position in
its split, so 1 and N devices draw the same noise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from htl_jax.optim import per_task, task_norms_and_cosines
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


def _lookup(setup: TrainSetup, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  ids = per_task.table_ids(batch['x'], jnp.asarray(setup.offsets, jnp.int32))
  return ids, params['embedding']['table'][ids]


def _per_task_row_grads(setup: TrainSetup, state: TrainState, batch: Batch, rows):
  fn = (per_task.row_grads_isolated if setup.grad_path == 'isolated'
        else per_task.row_grads_general)
  return fn(_loss_vector_fn(setup, state, batch, True), state.params['model'], rows,
            setup.spec.num_tasks)


def _global_rows(ids: jax.Array, row_grads, rows: jax.Array):
  """Gather the sparse pieces of every device; local means -> global mean.

  ``row_grads`` is one ``[B, F, d]`` array or a tuple of K of them (per task).
  """
  n = parallel.num_replicas()
  row_grads = jax.tree.map(lambda g: parallel.gather(g, 0) / n, row_grads)
  return parallel.gather(ids, 0), row_grads, parallel.gather(rows, 0)


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


def _shared_table_grad(setup: TrainSetup, state: TrainState, batch: Batch, ids, rows):
  """Gradient of the shared table after the gradient process, plus the per-task losses.

  The L2 term is added after the process (it is not a task).
  """
  table = state.params['embedding']['table']
  balance_state = state.opt_state['balance']
  if setup.balance is None:
    losses, row_grads, model_grads, _ = per_task.row_grads_summed(
        _loss_vector_fn(setup, state, batch, True), state.params['model'], rows,
        setup.spec.num_tasks)
    ids, row_grads, rows = _global_rows(ids, row_grads, rows)
    table_grad = jnp.zeros_like(table).at[ids].add(_with_l2(setup, row_grads, rows))
    return table_grad, model_grads, parallel.mean(losses), balance_state

  losses, row_grads, model_grads, _ = _per_task_row_grads(setup, state, batch, rows)
  ids, row_grads, rows = _global_rows(ids, row_grads, rows)
  id_grads = per_task.sum_rows_by_id(ids, row_grads, table.shape[0])
  combined, balance_state = setup.balance.update({'embedding': id_grads.grads},
                                                 balance_state)
  combined = combined['embedding']
  if id_grads.ids is None:                  # already the dense table gradient
    table_grad = _table_with_l2(setup, combined, ids, table)
  else:
    # Slot j belongs to id ids.flat[j] (zeros where j is not an id's first occurrence),
    # so the slots scatter with the same index array as the rows.
    row_grads = _with_l2(setup, combined.reshape(rows.shape), rows)
    table_grad = jnp.zeros_like(table).at[ids].add(row_grads)
  return table_grad, model_grads, parallel.mean(losses), balance_state


def train_step(setup: TrainSetup, state: TrainState, batch: Batch
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on one global batch (the local shard under ``pmap``)."""
  ids, rows = _lookup(setup, state.params, batch)
  table_grad, model_grads, losses, balance_state = _shared_table_grad(
      setup, state, batch, ids, rows)
  grads = {'embedding': {'table': table_grad}, 'model': parallel.mean(model_grads)}
  updates, opt_state = setup.tx.update(grads, state.opt_state['optimizer'], state.params)
  params = optax.apply_updates(state.params, updates)
  loss = jnp.sum(losses)
  grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  new_step = state.step + 1
  new_state = state.replace(
      step=new_step, params=params, tau=setup.tau.next(state.tau, new_step),
      opt_state={'balance': balance_state, 'optimizer': opt_state})
  metrics = {'loss': loss, 'task_losses': losses, 'grad_norm': grad_norm,
             'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm), 'tau': state.tau}
  return new_state, metrics


def eval_step(setup: TrainSetup, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  """Predictions of one batch: binary probabilities and the core on the original scale."""
  _, rows = _lookup(setup, state.params, batch)
  out = setup.model.apply({'params': state.params['model']}, (rows,) * setup.spec.num_tasks,
                          train=False, tau=state.tau, example_index=batch['index'])
  return {'probs': out.probs, 'core': setup.objective.predict_core(out),
          'weight': batch['weight']}


def diagnostic_step(setup: TrainSetup, state: TrainState, batch: Batch
                    ) -> dict[str, jax.Array]:
  """Raw per-task gradient norms of the shared table and cosines with the core (Fig. 5)."""
  ids, rows = _lookup(setup, state.params, batch)
  _, row_grads, _, _ = _per_task_row_grads(setup, state, batch, rows)
  ids, row_grads, _ = _global_rows(ids, row_grads, rows)
  id_grads = per_task.sum_rows_by_id(ids, row_grads, setup.spec.total_vocab)
  norms, cosines = task_norms_and_cosines({'embedding': id_grads.grads}, core_index=-1)
  return {'grad_norm': norms, 'grad_cos_core': cosines}

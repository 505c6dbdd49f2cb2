"""The per-task gradients of one global batch, in the order of docs/design.md.

:func:`compute` is steps 1-4 of the train step (:mod:`htl_jax.train.step`), each a short
function below; steps 5-7 are the run's optax chain (:mod:`htl_jax.train.optimizer`):

1. **Lookup** (:func:`htl_jax.embedding.lookup`): the embedding rows of the batch,
   ``[B, F, d]``; a model with independent tasks (DNN) looks every field up once per task's
   table, ``[B, K*F, d]``.
2. **Per-task gradients** of ``theta_s`` (:func:`_task_gradients`): the rows (K arrays
   ``[B, F, d]``) and the model's shared layers (leading task axis K), by
   :mod:`htl_jax.optim.per_task`: one backward pass when the towers are isolated, else
   one forward pass and K backward passes. Every other parameter gets the gradient of
   the summed loss. Without a gradient process only the summed gradient is taken
   (:func:`_summed_gradients`, one "task").
3. **Across devices** (:func:`_gather_rows`, ``parallel.mean``): row gradients and rows are
   gathered, dense gradients averaged, so what follows sees the GLOBAL batch (1 and N
   devices give the same update).
4. **Sum by id** (:func:`_sum_by_id`): per task, the row gradients of each distinct id
   summed into one slot, ``[K, slots, d]`` (:func:`htl_jax.embedding.sum_rows_by_id`), with
   ``lazy_adam``'s first occurrences from a persistent scratch in the state
   (:func:`htl_jax.embedding.first_occurrence_in`); O(batch), never O(vocabulary).

The diagnostics are the data of the paper's Fig. 5 (:class:`htl_jax.optim.TaskDiagnostics`):
per task, the norm of its gradient on ``theta_s`` before and after the process and its
cosine with the core gradient. With a process the process records them; without one, steps
2-4 run per task here only where ``with_diagnostics`` is true, and never change the update
(the training loop compiles that variant separately and runs it at evaluation steps only).

The step RNG is ``fold_in(rng, step)``; Gumbel noise is keyed by each example's position in
its split, so 1 and N devices draw the same noise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from htl_jax import embedding
from htl_jax.optim import TaskDiagnostics, per_task
from htl_jax.optim import stacked as stacked_lib
from htl_jax.train import parallel
from htl_jax.train.optimizer import TableBatch
from htl_jax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


class StepGradients(NamedTuple):
  """What :func:`compute` returns: the run's chain's input and what it reads of the batch.

  Attributes:
    stacked: shaped like ``state.params``: the table's per-task gradients (``[K, M, d]``
      dense, or ``[K, N, d]`` slots), the shared model layers' ``[K, ...]``, every other
      leaf the summed gradient (without a gradient process, the table's one summed "task"
      has K = 1).
    table_batch: the batch's ids, rows and slots (:class:`htl_jax.train.optimizer.TableBatch`).
    losses: ``[K]`` per-task losses (mean over devices).
    diagnostics: without a gradient process, Fig. 5's data taken here (else None: the
      process's state has them after the update).
    id_scratch: ``lazy_adam``'s id scratch to keep in the state (None with dense Adam).
  """

  stacked: Any
  table_batch: TableBatch
  losses: jax.Array
  diagnostics: TaskDiagnostics | None
  id_scratch: jax.Array | None


def compute(setup: TrainSetup, state: TrainState, batch: Batch,
            with_diagnostics: jax.Array | bool = False) -> StepGradients:
  """Steps 1-4 of the module docstring: the per-task gradients the chain combines.

  Args:
    with_diagnostics: without a gradient process, whether to take the per-task gradients
      for Fig. 5. A traced value selects them with a ``lax.cond`` (both branches compiled);
      a Python bool traces only the branch asked for.
  """
  # 1. Lookup (ids of the global batch: the sums by id and lazy Adam's slots span it).
  ids, rows = lookup(setup, state.params, batch)
  ids = parallel.gather(ids, 0)
  first, scratch = _first_occurrences(setup, state, ids)
  # 2. Per-task gradients of theta_s (one summed "task" without a process).
  if setup.grad_process == 'none':
    grads = _summed_gradients(setup, state, batch, rows)
  else:
    grads = _task_gradients(setup, state, batch, rows)
  # 3. Across devices.
  row_grads, global_rows = _gather_rows(grads.rows, rows)
  losses, rest, shared = parallel.mean((grads.losses, grads.rest, grads.shared))
  # 4. Sum by id.
  by_id = setup.grad_process != 'none' or first is not None
  table_grads, where = embedding.split_slots(
      _sum_by_id(setup, ids, row_grads, first, by_id))
  stacked = {'embedding': {'table': table_grads}, 'model': {**rest, **shared}}
  diagnostics = None
  if setup.grad_process == 'none':
    diagnostics = _diagnostics_on_request(setup, state, batch, rows, ids, first,
                                          with_diagnostics)
  return StepGradients(stacked, TableBatch(ids, global_rows, where), losses, diagnostics,
                       scratch)


def lookup(setup: TrainSetup, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Step 1: table rows ``[B, F']`` and looked-up embeddings ``[B, F', d]`` (F' = copies F)."""
  return embedding.lookup(params['embedding']['table'], setup.layout, batch['x'])


def loss_terms_fn(setup: TrainSetup, state: TrainState, batch: Batch
                  ) -> per_task.LossTermsFn:
  """``(model_params, embs) -> K`` task losses of the batch, training mode: the terms of
  the total loss ``L = L_core + sum_t L_t`` (BCE, Eq. 8; MSE, Eq. 10; or ZILN)."""
  key = jax.random.fold_in(state.rng, state.step)

  def loss_terms(model_params, embs):
    out = setup.model.apply({'params': model_params}, embs, train=True, tau=state.tau,
                            example_index=batch['index'], rngs={'gumbel': key})
    return setup.objective.loss_terms(out, batch)

  return loss_terms


def _first_occurrences(setup: TrainSetup, state: TrainState, ids: jax.Array
                       ) -> tuple[jax.Array | None, jax.Array | None]:
  """``lazy_adam`` only: each id's first position in the batch, and the reset id scratch."""
  if not setup.sparse_table:
    return None, None
  return embedding.first_occurrence_in(ids.reshape(-1), state.id_scratch)


def _task_gradients(setup: TrainSetup, state: TrainState, batch: Batch, rows: jax.Array
                    ) -> per_task.PerTaskGrads:
  """Step 2: per-task gradients of ``theta_s``, the summed gradient of the rest."""
  loss_terms = loss_terms_fn(setup, state, batch)
  num_tasks = setup.spec.num_tasks
  if setup.grad_path == 'isolated':
    return per_task.row_grads_isolated(loss_terms, state.params['model'], rows, num_tasks)
  return per_task.row_grads_general(loss_terms, state.params['model'], rows, num_tasks,
                                    setup.shared)


def _summed_gradients(setup: TrainSetup, state: TrainState, batch: Batch, rows: jax.Array
                      ) -> per_task.PerTaskGrads:
  """Step 2 without a gradient process: the summed loss's gradient, as one "task"."""
  losses, row_grads, model_grads = per_task.row_grads_summed(
      loss_terms_fn(setup, state, batch), state.params['model'], rows,
      setup.spec.num_tasks)
  return per_task.PerTaskGrads(losses, (row_grads,), {}, model_grads)


def _gather_rows(row_grads: tuple[jax.Array, ...], rows: jax.Array
                 ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Step 3 for the sparse part: every device's rows and their per-task gradients
  (local means -> global mean). The dense gradients are averaged by ``parallel.mean``."""
  n = parallel.device_count()
  return tuple(parallel.gather(g, 0) / n for g in row_grads), parallel.gather(rows, 0)


def _sum_by_id(setup: TrainSetup, ids: jax.Array, row_grads: tuple[jax.Array, ...],
               first: jax.Array | None, by_id: bool) -> embedding.TableGradient:
  """Step 4: the per-task gradients of the batch's distinct ids: ``[K, M, d]`` dense (a table
  smaller than the batch's lookups), or ``[K, N, d]`` slots summed by id (``RowSums``).

  ``by_id=False`` (the summed gradient into a dense table: nothing reads per-id sums) keeps
  one slot per looked-up row (``RowOccurrences``); the table's scatter adds them up.
  """
  if not by_id:
    flat = ids.reshape(-1)
    return embedding.RowOccurrences(
        flat, jnp.stack(row_grads).reshape(len(row_grads), flat.shape[0], -1))
  return embedding.sum_rows_by_id(ids, row_grads, setup.layout.rows, first=first)


def _raw_diagnostics(stacked: Any) -> TaskDiagnostics:
  """Fig. 5's data without a gradient process: the raw per-task norms on ``theta_s`` (the
  processed ones are the same) and the cosines with the core."""
  return stacked_lib.diagnostics_of(stacked, -1, processed_sq=None)


def _diagnostics_on_request(setup: TrainSetup, state: TrainState, batch: Batch,
                            rows: jax.Array, ids: jax.Array, first: jax.Array | None,
                            with_diagnostics: jax.Array | bool) -> TaskDiagnostics:
  """Without a gradient process: steps 2-4 per task for Fig. 5, where asked (else zeros).

  Args:
    rows: this device's looked-up rows; ``ids``: the global batch's table ids.
  """
  def diagnose():
    grads = _task_gradients(setup, state, batch, rows)
    row_grads, _ = _gather_rows(grads.rows, rows)
    slots, _ = embedding.split_slots(_sum_by_id(setup, ids, row_grads, first, by_id=True))
    stacked = {'embedding': slots, 'shared': parallel.mean(grads.shared)}
    return _raw_diagnostics(stacked)

  def skip():
    return stacked_lib.no_diagnostics(setup.spec.num_tasks)

  if isinstance(with_diagnostics, bool):    # static: trace only the branch that runs
    return diagnose() if with_diagnostics else skip()
  return jax.lax.cond(with_diagnostics, diagnose, skip)

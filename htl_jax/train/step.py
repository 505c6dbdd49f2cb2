"""Pure train / eval steps, one global batch each, run under ``pmap``.

``train_step(setup, state, batch, with_diagnostics) -> (state, metrics)``:

1.-6. the gradient of every parameter (:func:`gradient_path.compute`): lookup, per-task
   gradients of ``theta_s``, across devices, sum by id, the gradient process (Algorithm 1,
   PCGrad or MetaBalance), back to the table plus L2;
7. Adam with one learning rate: dense ``optax.adam`` on every parameter, or, with
   ``embedding_optimizer='lazy_adam'``, on the model's parameters and only the batch's rows
   of the table (:mod:`htl_jax.optim.lazy_adam`), so no part of the step costs O(vocab);
8. the temperature decay (Appendix A), kept in the train state.

The metrics carry the losses, the gradient norm and the data of the paper's Fig. 5 (see
:mod:`htl_jax.train.gradient_path`).

``train_step_on_rows`` is the same step on a split kept on the device
(``config.feed='device'``): the host puts each epoch's row numbers on the devices once, and
every step gathers its own batch there, so nothing travels per step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from htl_jax.optim import lazy_adam
from htl_jax.train import gradient_path
from htl_jax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


def train_step(setup: TrainSetup, state: TrainState, batch: Batch,
               with_diagnostics: jax.Array | bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on one global batch (the local shard under ``pmap``)."""
  # 1.-6. The gradient of every parameter.
  grads, losses, balance_state, diag, scratch = gradient_path.compute(
      setup, state, batch, with_diagnostics)
  # 7. Adam.
  params, optimizer_state = _apply_adam(setup, state, grads)
  opt_state = {'balance': balance_state, 'optimizer': optimizer_state}
  if scratch is not None:
    opt_state['id_scratch'] = scratch
  loss = jnp.sum(losses)
  grad_norm = jnp.sqrt(lazy_adam.squared_norm(grads))
  # 8. The temperature decay.
  new_step = state.step + 1
  new_state = state.replace(
      step=new_step, params=params, tau=setup.tau.next(state.tau, new_step),
      opt_state=opt_state)
  metrics = {'loss': loss, 'task_losses': losses, 'grad_norm': grad_norm,
             'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm), 'tau': state.tau,
             **diag}
  return new_state, metrics


def _apply_adam(setup: TrainSetup, state: TrainState, grads: Any) -> tuple[Any, Any]:
  """Step 7: ``(params, optimizer state)`` after dense Adam or lazy Adam on the table."""
  if setup.row_adam is None:
    updates, opt_state = setup.tx.update(grads, state.opt_state['optimizer'], state.params)
    return optax.apply_updates(state.params, updates), opt_state
  return lazy_adam.apply_gradients(setup.tx, setup.row_adam, state.params,
                                   state.opt_state['optimizer'], grads)


def resident_split(split) -> dict[str, np.ndarray]:
  """The arrays of a training split that ``feed='device'`` keeps on every device."""
  return {'x': split.x, 'y': split.y, 'core': split.core}


def gather_batch(resident: dict[str, jax.Array], index: jax.Array) -> Batch:
  """The batch of rows ``index`` of a device-resident split (a training batch: weight 1)."""
  batch = {'x': resident['x'][index], 'y': resident['y'][index],
           'core': resident['core'][index], 'index': index,
           'weight': jnp.ones(index.shape, jnp.float32)}
  # Gathered once, not fused into (and redone by) each consumer: SB's step 0.4 -> 0.25 ms.
  return jax.lax.optimization_barrier(batch)


def train_step_on_rows(setup: TrainSetup, state: TrainState, epoch_rows: jax.Array,
                       resident: dict[str, jax.Array],
                       with_diagnostics: jax.Array | bool = False
                       ) -> tuple[TrainState, dict[str, jax.Array]]:
  """:func:`train_step` on a split already on the device.

  Args:
    epoch_rows: ``[steps per epoch, B]`` this device's rows of every batch of the epoch;
      the step takes row ``state.step % steps per epoch``, so the host sends nothing per
      step.
    resident: the split's arrays (:func:`resident_split`) on this device.
  """
  index = epoch_rows[state.step % epoch_rows.shape[0]]
  return train_step(setup, state, gather_batch(resident, index), with_diagnostics)


def eval_step(setup: TrainSetup, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  """Predictions of one batch: binary probabilities and the core on the original scale."""
  _, rows = gradient_path.lookup(setup, state.params, batch)
  out = setup.model.apply({'params': state.params['model']}, (rows,) * setup.spec.num_tasks,
                          train=False, tau=state.tau, example_index=batch['index'])
  return {'probs': out.probs, 'core': setup.objective.predict_core(out),
          'weight': batch['weight']}

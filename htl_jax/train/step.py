"""Pure train / eval steps, one global batch each, run under ``pmap``.

``train_step(setup, state, batch, with_diagnostics) -> (state, metrics)``:

1.-6. the gradient of every parameter (:func:`gradient_path.compute`): lookup, per-task
   gradients of ``theta_s``, across devices, sum by id, the gradient process (Algorithm 1,
   PCGrad or MetaBalance), back to the table plus L2;
7. Adam with one learning rate (:func:`htl_jax.train.state.make_optimizer`): dense
   ``optax.adam`` on every parameter, or, with ``embedding_optimizer='lazy_adam'``, on the
   model's parameters and only the batch's rows of the table
   (:func:`htl_jax.embedding.row_adam`), so no part of the step costs O(vocab);
8. the temperature decay (Appendix A), kept in the train state.

The metrics carry the losses, the gradient norm and the data of the paper's Fig. 5 (see
:mod:`htl_jax.train.gradient_path`).

``train_step_on_rows`` is the same step on a split kept on the device
(``config.feed='device'``): the host puts each epoch's row numbers on the devices once, and
every step gathers its own batch there, so nothing travels per step.

:func:`compiled_steps` compiles the data-parallel variants of one setup once
(:class:`Steps`).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from htl_jax import embedding
from htl_jax.train import gradient_path, parallel
from htl_jax.train.state import ServingState, TrainSetup, TrainState, decay_tau

Batch = dict[str, jax.Array]


def train_step(setup: TrainSetup, state: TrainState, batch: Batch,
               with_diagnostics: jax.Array | bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on one global batch (the local shard under ``pmap``)."""
  # 1.-6. The gradient of every parameter.
  grads, losses, balance_state, diag, scratch = gradient_path.compute(
      setup, state, batch, with_diagnostics)
  # 7. Adam.
  updates, optimizer_state = setup.optimizer(state.hparams).update(
      grads, state.opt_state['optimizer'], state.params)
  params = embedding.apply_updates(state.params, updates)
  loss = jnp.sum(losses)
  grad_norm = jnp.sqrt(embedding.squared_norm(grads))
  # 8. The temperature decay.
  new_step = state.step + 1
  new_state = state.replace(
      step=new_step, params=params, tau=decay_tau(state.tau, new_step, state.hparams),
      opt_state={'balance': balance_state, 'optimizer': optimizer_state},
      id_scratch=scratch)
  metrics = {'loss': loss, 'task_losses': losses, 'grad_norm': grad_norm,
             'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm), 'tau': state.tau,
             **diag}
  return new_state, metrics


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
    resident: the split's arrays (:func:`htl_jax.train.feed.resident_split`) on this
      device.
  """
  index = epoch_rows[state.step % epoch_rows.shape[0]]
  return train_step(setup, state, gather_batch(resident, index), with_diagnostics)


def eval_step(setup: TrainSetup, state: TrainState | ServingState, batch: Batch
              ) -> dict[str, jax.Array]:
  """Predictions of one batch: binary probabilities and the core on the original scale.

  Reads only ``state.params`` and ``state.tau``: a :class:`ServingState` will do.
  """
  _, rows = embedding.lookup(state.params['embedding']['table'], setup.layout, batch['x'])
  out = setup.model.apply({'params': state.params['model']}, (rows,) * setup.spec.num_tasks,
                          train=False, tau=state.tau, example_index=batch['index'])
  return {'probs': out.probs, 'core': setup.objective.predict_core(out),
          'weight': batch['weight']}


class Steps(NamedTuple):
  """The compiled, data-parallel steps of one setup (see :func:`compiled_steps`).

  ``train(state, batch)`` and ``train_on_rows(state, epoch_rows, resident)`` leave out
  Fig. 5's per-task diagnostics, which a run without a gradient process takes only at
  evaluations, through the ``diagnosed`` variants: a second program rather than a
  ``lax.cond`` in one, because XLA:CPU pays for an untaken branch (MMoE: 29 ms a step with
  the cond, 22 ms without). With a gradient process the diagnostics come free, and each
  ``diagnosed`` variant is the same program as its plain one.
  """

  train: Callable[..., Any]
  train_diagnosed: Callable[..., Any]
  train_on_rows: Callable[..., Any]
  train_on_rows_diagnosed: Callable[..., Any]
  evaluate: Callable[..., Any]


# The compiled steps this process keeps for later runs: runs of equal setups (every
# step-shaping config field equal; seeds and Hyperparams may differ) reuse them. Past this
# many setups the oldest is dropped and JAX's caches are cleared, so a process that runs
# hundreds of configurations (a tuning study) holds a bounded number of compiled programs;
# the ones still kept recompile from the persistent compilation cache when next called.
MAX_KEPT_SETUPS = 8
_KEPT: collections.OrderedDict[TrainSetup, Steps] = collections.OrderedDict()


def compiled_steps(setup: TrainSetup) -> Steps:
  """The data-parallel steps of ``setup``, each compiled once, at its first call."""
  steps = _KEPT.pop(setup, None)
  if steps is None:
    steps = _make_steps(setup)
    if len(_KEPT) >= MAX_KEPT_SETUPS:
      _KEPT.popitem(last=False)
      jax.clear_caches()
  _KEPT[setup] = steps
  return steps


def _make_steps(setup: TrainSetup) -> Steps:
  def pmapped(step_fn, with_diagnostics: bool):
    return parallel.pmap_step(functools.partial(step_fn, setup,
                                                with_diagnostics=with_diagnostics))

  train = pmapped(train_step, False)
  on_rows = pmapped(train_step_on_rows, False)
  free = setup.grad_process != 'none'     # diagnostics come with the gradient process
  return Steps(train=train,
               train_diagnosed=train if free else pmapped(train_step, True),
               train_on_rows=on_rows,
               train_on_rows_diagnosed=(on_rows if free else
                                        pmapped(train_step_on_rows, True)),
               evaluate=parallel.pmap_gathered(functools.partial(eval_step, setup)))

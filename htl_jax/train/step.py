"""Pure train / eval steps, one global batch each, run under ``pmap``.

``train_step(setup, state, batch, with_diagnostics) -> (state, metrics)``:

1.-4. the per-task gradients (:func:`gradient_path.compute`): lookup, per-task gradients of
   ``theta_s``, across devices, sums by id;
5.-7. the run's optax chain (:mod:`htl_jax.train.optimizer`): the gradient process
   (Algorithm 1, PCGrad or MetaBalance), the table's gradient plus L2, and Adam with one
   learning rate (dense, or row-wise on the batch's rows with ``lazy_adam``, so no part of
   the step costs O(vocab));
8. the temperature decay (Appendix A), kept in the train state.

The metrics carry the losses, the update's norm and the data of the paper's Fig. 5.

``train_step_on_rows`` is the same step on a split kept on the device
(``config.feed='device'``): the host puts each epoch's row numbers on the devices once, and
every step gathers its own batch there, so nothing travels per step. ``train_steps`` runs
several steps in one program (one dispatch), for either feed; the loop runs every step
through it.

The compiled programs are module-level pmapped functions with the setup static
(:data:`train_program`, :data:`eval_program`): jit's cache is the only cache of compiled
programs, so runs of equal setups (every step-shaping config field equal) share them.
:func:`bound_programs` keeps that cache's memory bounded over many setups.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp

from htl_jax import embedding
from htl_jax.optim.row_adam import apply_row_updates
from htl_jax.train import gradient_path, parallel
from htl_jax.train import optimizer as optimizer_lib
from htl_jax.train.state import ServingState, TrainSetup, TrainState

Batch = dict[str, jax.Array]


def train_step(setup: TrainSetup, state: TrainState, batch: Batch,
               with_diagnostics: jax.Array | bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on one global batch (the local shard under ``pmap``)."""
  # 1.-4. The per-task gradients.
  grads = gradient_path.compute(setup, state, batch, with_diagnostics)
  # 5.-7. The gradient process, the table's gradient plus L2, Adam: one optax chain.
  updates, opt_state = setup.optimizer.update(grads.stacked, state.opt_state, state.params,
                                              table_batch=grads.table_batch)
  params = apply_row_updates(state.params, updates)
  loss = jnp.sum(grads.losses)
  update_norm = jnp.sqrt(embedding.squared_norm(updates))
  # 8. The temperature decay.
  new_step = state.step + 1
  new_state = state.replace(step=new_step, params=params, opt_state=opt_state,
                            tau=state.tau_schedule.after(state.tau, new_step),
                            id_scratch=grads.id_scratch)
  diagnostics = (grads.diagnostics if setup.grad_process == 'none'
                 else optimizer_lib.process_state(opt_state).diagnostics)
  metrics = {'loss': loss, 'task_losses': grads.losses, 'update_norm': update_norm,
             'finite': jnp.isfinite(loss) & jnp.isfinite(update_norm), 'tau': state.tau,
             'diagnostics': diagnostics}
  return new_state, metrics


def gather_batch(resident: dict[str, jax.Array], index: jax.Array) -> Batch:
  """The batch of rows ``index`` of a device-resident split (a training batch: weight 1)."""
  batch = {'x': resident['x'][index], 'y': resident['y'][index],
           'core': resident['core'][index], 'index': index,
           'weight': jnp.ones(index.shape, jnp.float32)}
  # Gathered once, not fused into (and redone by) each consumer.
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

  Reads only ``state.params`` and ``state.tau``: a :class:`ServingState` will do. An id
  outside its field's vocabulary is the OOV id 0 (:func:`htl_jax.embedding.known_ids`).
  """
  ids = embedding.known_ids(batch['x'], setup.layout)
  _, rows = embedding.lookup(state.params['embedding']['table'], setup.layout, ids)
  out = setup.model.apply({'params': state.params['model']}, (rows,) * setup.spec.num_tasks,
                          train=False, tau=state.tau, example_index=batch['index'])
  return {'probs': out.probs, 'core': setup.objective.predict_core(out),
          'weight': batch['weight']}


def train_steps(setup: TrainSetup, state: TrainState, source: Any, num_steps: jax.Array, *,
                max_steps: int, feed: str, with_diagnostics: bool = False
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """``num_steps`` (at most ``max_steps``) train steps in one program: one dispatch.

  Every training step of a run goes through here, one or several at a time, so a run
  gives the same numbers whatever its steps per dispatch (tested bit for bit).

  Args:
    source: where the batches come from. ``feed='device'``: ``(epoch_rows, resident)``
      (:func:`train_step_on_rows`); ``feed='host'``: the batches themselves, stacked
      ``[max_steps, ...]`` (the first ``num_steps`` are used).
    num_steps: how many steps to take (a traced int32 scalar, so one program serves
      every count up to ``max_steps``).

  Returns:
    The state after the steps and every step's metrics, ``[max_steps, ...]`` (the first
    ``num_steps`` rows are this dispatch's).
  """
  def one(state: TrainState, i: jax.Array):
    if feed == 'device':
      return train_step_on_rows(setup, state, *source, with_diagnostics)
    batch = jax.lax.optimization_barrier(jax.tree.map(lambda b: b[i], source))
    return train_step(setup, state, batch, with_diagnostics)

  def body(i, carry):
    state, out = carry
    state, metrics = one(state, i)
    return state, jax.tree.map(lambda buf, v: buf.at[i].set(v), out, metrics)

  shapes = jax.eval_shape(one, state, jnp.zeros((), jnp.int32))[1]
  out = jax.tree.map(lambda v: jnp.zeros((max_steps,) + v.shape, v.dtype), shapes)
  return jax.lax.fori_loop(0, num_steps, body, (state, out))


def _train_program(setup: TrainSetup, max_steps: int, feed: str, diagnosed: bool,
                   state: TrainState, source: Any, num_steps: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
  return train_steps(setup, state, source, num_steps, max_steps=max_steps, feed=feed,
                     with_diagnostics=diagnosed)


# ``train_program(setup, max_steps, feed, diagnosed, state, source, num_steps)``: the
# data-parallel :func:`train_steps`, compiled once per setup and shapes (the first four are
# static, the state donated). ``diagnosed``: Fig. 5's per-task diagnostics in a run without
# a gradient process (a second program rather than a ``lax.cond`` in one: XLA:CPU pays for
# an untaken branch; with a process they come free and there is one program).
train_program = parallel.pmap_program(_train_program, static=(0, 1, 2, 3), donate=4)
# ``eval_program(setup, state, batch)``: :func:`eval_step`, outputs gathered over devices.
eval_program = parallel.pmap_program(eval_step, static=(0,), gathered=True)

# The setups whose programs jit's cache holds, most recent last. Past this many, the cache
# is cleared (the programs still needed load from the persistent compilation cache), so a
# process that runs hundreds of configurations (a tuning study over embedding sizes and
# batch sizes) holds a bounded number of programs: each holds a few hundred memory maps,
# and the kernel allows 65,530.
MAX_KEPT_SETUPS = 4
_SEEN: collections.OrderedDict[int, None] = collections.OrderedDict()


def bound_programs(setup: TrainSetup) -> None:
  """Notes that ``setup`` runs next; clears jit's caches once more setups than
  :data:`MAX_KEPT_SETUPS` have come through since the last clear."""
  _SEEN.pop(id(setup), None)
  _SEEN[id(setup)] = None
  if len(_SEEN) > MAX_KEPT_SETUPS:
    jax.clear_caches()
    _SEEN.clear()
    _SEEN[id(setup)] = None

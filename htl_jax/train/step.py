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
every step gathers its own batch there, so nothing travels per step. ``train_steps`` runs
several steps in one program (one dispatch), for either feed; the loop runs every step
through it.

:func:`compiled_steps` keeps the data-parallel programs of a setup (:class:`Steps`) for the
later runs of equal setups in the process, and bounds how many it keeps.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

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
             'diagnostics': diag}
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


class Steps:
  """The data-parallel programs of one setup, compiled once per input shape.

  :meth:`train` gives the pmapped :func:`train_steps` of a feed and a steps-per-dispatch;
  the ``diagnosed`` variant takes Fig. 5's per-task diagnostics, which a run without a
  gradient process takes only at evaluations: a second program rather than a ``lax.cond``
  in one, because XLA:CPU pays for an untaken branch (MMoE: 29 ms a step with the cond,
  22 ms without). With a gradient process the diagnostics come free and there is one
  program. :meth:`compiled` compiles a program for its arguments' shapes ahead of time
  (before a run's first timed step), or finds it compiled.
  """

  def __init__(self, setup: TrainSetup):
    self.setup = setup
    self.evaluate = parallel.pmap_gathered(functools.partial(eval_step, setup))
    self._train: dict[tuple, Callable[..., Any]] = {}
    self._compiled: dict[tuple, Any] = {}

  def train(self, feed: str, max_steps: int, diagnosed: bool = False) -> Callable[..., Any]:
    """``(state, source, num_steps) -> (state, metrics)``, data-parallel."""
    diagnosed = diagnosed and self.setup.grad_process == 'none'
    key = (feed, max_steps, diagnosed)
    if key not in self._train:
      self._train[key] = parallel.pmap_step(functools.partial(
          train_steps, self.setup, max_steps=max_steps, feed=feed,
          with_diagnostics=diagnosed))
    return self._train[key]

  def compiled(self, fn: Callable[..., Any], *args) -> Callable[..., Any]:
    """``fn`` compiled for ``args``' shapes (lowered and compiled now, or found).

    With several processes, ``fn`` itself: it compiles at its first call (a pmap's
    ahead-of-time lowering there takes the global shapes, not a process's).
    """
    if parallel.process_count() > 1:
      return fn
    key = (fn, tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args)),
           jax.tree.structure(args))
    if key not in self._compiled:
      self._compiled[key] = fn.lower(*args).compile()
      _bound_kept(keep=self)
    return self._compiled[key]

  @property
  def num_programs(self) -> int:
    return len(self._compiled)


# The compiled steps this process keeps for later runs: runs of equal setups (every
# step-shaping config field equal; seeds and Hyperparams may differ) reuse them. Past this
# many setups, or this many compiled programs (a setup has one per batch shape), the least
# recently used setups are dropped and JAX's caches cleared, so a process that runs hundreds
# of configurations (a tuning study) holds a bounded number of programs (each holds a few
# hundred memory maps; the kernel allows 65,530); the ones still kept recompile from the
# persistent compilation cache when next called.
MAX_KEPT_SETUPS = 4
MAX_KEPT_PROGRAMS = 16
_KEPT: collections.OrderedDict[TrainSetup, Steps] = collections.OrderedDict()


def compiled_steps(setup: TrainSetup) -> Steps:
  """The data-parallel steps of ``setup`` (kept for later runs of equal setups)."""
  steps = _KEPT.pop(setup, None) or Steps(setup)
  _KEPT[setup] = steps
  _bound_kept(keep=steps)
  return steps


def _bound_kept(keep: Steps) -> None:
  """Drops the least recently used setups (never ``keep``) past the bounds above."""
  dropped = False
  while len(_KEPT) > 1 and (
      len(_KEPT) > MAX_KEPT_SETUPS
      or sum(steps.num_programs for steps in _KEPT.values()) > MAX_KEPT_PROGRAMS):
    oldest = next(iter(_KEPT))
    if _KEPT[oldest] is keep:
      break
    del _KEPT[oldest]
    dropped = True
  if dropped:
    jax.clear_caches()

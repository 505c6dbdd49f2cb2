"""The train state pytree, and the static setup of the steps, built from a config.

``TrainState`` holds everything that changes during training: ``step``, ``params``
(``{'embedding': {'table': E}, 'model': towers...}``), ``opt_state`` (the state of the run's
ONE optax chain, :mod:`htl_jax.train.optimizer`: its injected values, the gradient process's
state, Adam's moments), the Gumbel-softmax temperature ``tau`` with its schedule
(:class:`TauSchedule`, Appendix A), the base PRNG key ``rng`` and, with
``embedding_optimizer='lazy_adam'``, the table's id scratch
(:func:`htl_jax.embedding.first_occurrence_in`). Static things (the model, the objective, the
chain, the table's layout) live in :class:`TrainSetup`, a static argument of the compiled
steps: runs whose configs agree on every step-shaping field share one setup, hence one
compiled program, whatever their seeds and values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from htl_jax import embedding
from htl_jax.losses import CoreTransform, TrainingObjective
from htl_jax.models import ModelConfig, get_model, model_class
from htl_jax.spec import HybridSpec
from htl_jax.train import optimizer as optimizer_lib


class TauSchedule(flax.struct.PyTreeNode):
  """The LEU temperature's staircase (Appendix A): times ``decay`` every ``steps`` steps,
  floored at ``floor``; values in the state, so runs that differ in them (Table 6's tau_d)
  share one program."""

  decay: jax.Array
  steps: jax.Array
  floor: jax.Array

  @classmethod
  def from_config(cls, config) -> 'TauSchedule':
    return cls(decay=jnp.asarray(config['tau_decay'], jnp.float32),
               steps=jnp.asarray(config['tau_decay_steps'], jnp.int32),
               floor=jnp.asarray(config['tau_min'], jnp.float32))

  def after(self, tau: jax.Array, new_step: jax.Array) -> jax.Array:
    """The temperature after step ``new_step``."""
    decayed = jnp.maximum(tau * self.decay, self.floor)
    return jnp.where(new_step % self.steps == 0, decayed, tau)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  tau: jax.Array
  tau_schedule: TauSchedule
  rng: jax.Array
  id_scratch: Optional[jax.Array] = None


class ServingState(flax.struct.PyTreeNode):
  """What inference reads of a train state: the parameters and the temperature."""

  params: Any
  tau: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
  """Everything static that the pure step functions need.

  ``shared`` are the ``fnmatch`` patterns of the model parameters that join the embedding in
  ``theta_s`` (the model's class fact); ``layout`` places every field's ids in the one
  table; ``optimizer`` is the run's chain (:func:`htl_jax.train.optimizer.make_optimizer`);
  ``sparse_table`` is True with the row-wise Adam (the table's gradient is then
  :class:`htl_jax.optim.row_adam.RowSums`, never a dense ``[M, d]`` array).
  """

  spec: HybridSpec
  model: nn.Module
  objective: TrainingObjective
  grad_path: str            # 'isolated' | 'general'
  layout: embedding.TableLayout
  options: Any              # the step-shaping config fields, as a dict
  chain_shape: optimizer_lib.ChainShape
  optimizer: optax.GradientTransformationExtraArgs

  @property
  def grad_process(self) -> str:
    """Resolved: 'htl' | 'pcgrad' | 'metabalance' | 'none'."""
    return self.chain_shape.process

  @property
  def shared(self) -> tuple[str, ...]:
    return self.chain_shape.shared

  @property
  def sparse_table(self) -> bool:
    return self.chain_shape.sparse

  def chain(self, values: Optional[dict[str, Any]] = None
            ) -> optax.GradientTransformationExtraArgs:
    """The run's chain with ``values`` injected (the setup's own holds placeholders)."""
    return optimizer_lib.make_optimizer(self.chain_shape, values)


def resolve_grad_process(config) -> str:
  """``config.grad_process``, with ``'auto'`` replaced by the model's default.

  The default is ``'htl'`` for HTLNet and ``'none'`` for every baseline (docs/design.md):
  baselines train with plain Adam on the summed loss unless a gradient process is asked for.
  """
  name = config['grad_process']
  if name == 'auto':
    return model_class(config['model']).default_grad_process
  return name


# Config fields that do NOT shape the compiled steps (data, schedule, loop, output, and the
# values the state carries). Every other top-level field does: runs that agree on all of
# those (and on the spec and core transform) share one TrainSetup, so the runs of a
# reproduction suite or a tuning study in one process compile their steps once. A new field
# is step-shaping unless listed here, so forgetting it costs a compile, never a wrong program.
_NOT_STEP_FIELDS = frozenset({
    'dataset', 'data_dir', 'cache_dir', 'data', 'split_seed', 'batch_size',
    'eval_batch_size', 'num_epochs', 'max_steps', 'eval_every', 'checkpoint_every',
    'patience', 'min_improvement', 'best_metric', 'log_every', 'feed', 'steps_per_dispatch',
    'grad_diagnostics', 'tau_grid_scale', 'gpu_determinism', 'selection',
    'selection_reference', 'checkpoint_seconds', 'tau0', 'tau_decay', 'tau_decay_steps',
    'tau_min', *optimizer_lib.HYPERPARAMS})


def make_setup(config, spec: HybridSpec, core_transform: CoreTransform) -> TrainSetup:
  """The static half of training; cached so repeated runs reuse compiled steps.

  Runs whose configs differ only in the injected values, the seed, the temperature schedule
  and the data's and loop's fields get the same setup (hence the same compiled programs);
  whether ``l2`` is zero shapes the program (the L2 term is left out), its value does not.
  """
  fields = tuple((k, _hashable(config[k])) for k in sorted(config.keys())
                 if k not in _NOT_STEP_FIELDS) + (('use_l2', bool(config['l2'])),)
  model_cfg = ModelConfig.from_config(config, core_bias=core_transform.target_mean)
  return _cached_setup(fields, model_cfg, spec, core_transform)


def _hashable(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=16)
def _cached_setup(fields: tuple, model_cfg: ModelConfig, spec: HybridSpec,
                  core_transform: CoreTransform) -> TrainSetup:
  options = dict(fields)
  options['grad_process'] = resolve_grad_process(options)
  model = get_model(options['model'], spec, model_cfg)
  copies = spec.num_tasks if model.independent_tasks else 1
  chain_shape = optimizer_lib.chain_shape(options, spec.num_tasks, tuple(model.shared),
                                          options['use_l2'])
  return TrainSetup(
      spec=spec, model=model,
      objective=TrainingObjective.from_config(options, core_transform, type(model)),
      grad_path='isolated' if model.isolated_towers else 'general',
      layout=embedding.TableLayout(spec.vocab_sizes, copies), options=options,
      chain_shape=chain_shape,
      optimizer=optimizer_lib.make_optimizer(chain_shape))


def init_params(setup: TrainSetup, embed_dim: int, tau0: float | jax.Array,
                keys: tuple[jax.Array, ...]) -> Any:
  """Fresh parameters: the embedding table (:func:`htl_jax.embedding.init_table`, Xavier by
  default), Xavier towers (``model.init``).

  Args:
    keys: the model's init key, the table's, and the Gumbel key of the init pass.
  """
  init_key, embed_key, gumbel_key = keys
  table = embedding.init_table(embed_key, setup.layout, embed_dim,
                               setup.options['embedding_init'])
  dummy = jnp.zeros((2, len(setup.layout.offsets), embed_dim))
  variables = setup.model.init({'params': init_key, 'gumbel': gumbel_key},
                               (dummy,) * setup.spec.num_tasks, train=True, tau=tau0,
                               example_index=jnp.arange(2))
  return {'embedding': {'table': table}, 'model': variables['params']}


def init_state(setup: TrainSetup, config) -> TrainState:
  """Fresh parameters and optimizer state; the run's PRNG key from ``config.seed``.

  One compiled program (not hundreds of eager operations), shared by every seed and value
  of the setup.
  """
  return _init_state(setup, int(config.embed_dim), optimizer_lib.config_values(config),
                     TauSchedule.from_config(config), jnp.asarray(config.tau0, jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(setup: TrainSetup, embed_dim: int, values: dict[str, jax.Array],
                schedule: TauSchedule, tau0: jax.Array) -> TrainState:
  *keys, rng = jax.random.split(jax.random.PRNGKey(values['seed']), 4)
  params = init_params(setup, embed_dim, tau0, tuple(keys))
  scratch = embedding.new_id_scratch(setup.layout.rows) if setup.sparse_table else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=setup.chain(values).init(params), tau=tau0,
                    tau_schedule=schedule, rng=rng, id_scratch=scratch)


def abstract_serving_state(setup: TrainSetup, config) -> ServingState:
  """The shapes and dtypes of a :class:`ServingState` (nothing is computed or allocated)."""
  return jax.eval_shape(lambda: ServingState(
      params=init_params(setup, int(config.embed_dim), config.tau0,
                         tuple(jax.random.split(jax.random.PRNGKey(0), 3))),
      tau=jnp.asarray(config.tau0, jnp.float32)))

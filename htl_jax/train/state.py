"""The train state pytree, and the static setup of the steps, built from a config.

``TrainState`` holds everything that changes during training: ``step``, ``params``
(``{'embedding': {'table': E}, 'model': towers...}``), ``opt_state`` (``{'balance': the
gradient process's state over theta_s, 'optimizer': the optimizer's}``), the Gumbel-softmax
temperature ``tau`` (Appendix A: ``tau_0`` decayed by ``tau_decay`` every
``tau_decay_steps`` steps, floored at ``tau_min``), the base PRNG key ``rng`` and, with
``embedding_optimizer='lazy_adam'``, the table's id scratch
(:func:`htl_jax.embedding.first_occurrence_in`). Static things (the model, the objective, the
optimizer, the gradient process, the table's layout) live in :class:`TrainSetup`, bound into
the compiled steps.

The optimizer is built here and only here (:func:`make_optimizer`): Adam with ONE learning
rate for every parameter (the paper tunes one lr, Table 6); with ``lazy_adam`` the table's
part is the row-wise Adam of :mod:`htl_jax.embedding`, joined to the dense Adam of the
model's parameters by ``optax.partition``.
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

from htl_jax import embedding, optim
from htl_jax.errors import ConfigError
from htl_jax.losses import CoreTransform, TrainingObjective
from htl_jax.models import ModelConfig, get_model, model_class
from htl_jax.optim import per_task
from htl_jax.spec import HybridSpec

GRAD_PROCESSES = ('auto', 'htl', 'pcgrad', 'metabalance', 'none')
EMBEDDING_OPTIMIZERS = ('adam', 'lazy_adam')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  tau: jax.Array
  rng: jax.Array
  hparams: Any             # Hyperparams (below)
  id_scratch: Optional[jax.Array] = None


class ServingState(flax.struct.PyTreeNode):
  """What inference reads of a train state: the parameters and the temperature."""

  params: Any
  tau: jax.Array


class Hyperparams(flax.struct.PyTreeNode):
  """The values a compiled step reads at run time, kept in the train state.

  They are arguments of the step, not constants in its program, so runs that differ only
  in them (seeds, Table 6's learning rates and L2 weights, Algorithm 1's alpha x gamma of
  Fig. 8, tau_d) share one compiled program. Each field is the config field of its name.
  """

  learning_rate: jax.Array     # the one Adam learning rate (Table 6's lr)
  l2: jax.Array                # lambda on the looked-up rows
  alpha: jax.Array             # Eq. 16's projection relax factor
  gamma: jax.Array             # Eq. 17's magnitude weight
  clip: jax.Array              # Eq. 17's clip C
  metabalance_relax: jax.Array  # MetaBalance's relax factor
  tau_decay: jax.Array         # the temperature's staircase factor ...
  tau_decay_steps: jax.Array   # ... every this many steps (Table 6's tau_d) ...
  tau_min: jax.Array           # ... down to this floor

  @classmethod
  def from_config(cls, config) -> 'Hyperparams':
    values = {f.name: jnp.asarray(config[f.name], jnp.float32)
              for f in dataclasses.fields(cls)}
    values['tau_decay_steps'] = jnp.asarray(config['tau_decay_steps'], jnp.int32)
    return cls(**values)


# The config fields that Hyperparams carries, and those read only by init_state: neither
# shapes the compiled steps.
HYPERPARAMS = tuple(f.name for f in dataclasses.fields(Hyperparams))
INIT_FIELDS = ('seed', 'tau0')


def decay_tau(tau: jax.Array, new_step: jax.Array, hparams: Hyperparams) -> jax.Array:
  """The LEU temperature's staircase decay (Appendix A), applied after every step."""
  decayed = jnp.maximum(tau * hparams.tau_decay, hparams.tau_min)
  return jnp.where(new_step % hparams.tau_decay_steps == 0, decayed, tau)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
  """Everything static that the pure step functions need.

  ``shared`` are the ``fnmatch`` patterns of the model parameters that join the embedding in
  ``theta_s`` (the model's class fact); ``layout`` places every field's ids in the one
  table; ``sparse_table`` is True with the row-wise Adam (the table's gradient is then
  :class:`htl_jax.embedding.RowGradients`, never a dense ``[M, d]`` array).
  """

  spec: HybridSpec
  model: nn.Module
  objective: TrainingObjective
  grad_process: str         # resolved: 'htl' | 'pcgrad' | 'metabalance' | 'none'
  grad_path: str            # 'isolated' | 'general'
  layout: embedding.TableLayout
  shared: tuple[str, ...]
  options: Any              # the step-shaping config fields, as a dict
  sparse_table: bool = False
  use_l2: bool = True       # l2 > 0: the step adds the L2 term (its weight is a Hyperparam)

  def optimizer(self, hparams: Hyperparams) -> optax.GradientTransformation:
    """:func:`make_optimizer` with ``hparams``' learning rate."""
    return make_optimizer(self.options['embedding_optimizer'], hparams.learning_rate)

  def balance(self, hparams: Hyperparams, seed: int = 0
              ) -> Optional[optax.GradientTransformation]:
    """The gradient process with ``hparams``' alpha, gamma and clip (None without one).

    ``seed`` is PCGrad's, read by its ``init`` only (its state then carries the key).
    """
    return make_balance(self.options, self.spec.num_tasks, hparams, seed)


def resolve_grad_process(config) -> str:
  """``config.grad_process``, with ``'auto'`` replaced by the model's default.

  The default is ``'htl'`` for HTLNet and ``'none'`` for every baseline (docs/design.md):
  baselines train with plain Adam on the summed loss unless a gradient process is asked for.
  """
  name = config['grad_process']
  if name == 'auto':
    return model_class(config['model']).default_grad_process
  return name


def make_balance(options, num_tasks: int, hparams: Hyperparams, seed: int = 0
                 ) -> Optional[optax.GradientTransformation]:
  """The gradient process on ``theta_s`` (``grad_process`` of ``options``, resolved)."""
  name = resolve_grad_process(options)
  if name == 'htl':
    return optim.hybrid_grad_balance(
        alpha=hparams.alpha, gamma=hparams.gamma, weight_bound=hparams.clip, core_index=-1,
        per_leaf=options['per_leaf'], conflict=options['grad_conflict'],
        magnitude=options['grad_magnitude'], num_tasks=num_tasks)
  if name == 'pcgrad':
    return optim.pcgrad(seed=seed, num_tasks=num_tasks)
  if name == 'metabalance':
    return optim.metabalance(num_tasks, beta=options['metabalance_beta'],
                             relax=hparams.metabalance_relax, core_index=-1)
  if name == 'none':
    return None
  raise ConfigError(f'config.grad_process={name!r} is not one of {list(GRAD_PROCESSES)}')


def make_optimizer(name: str, learning_rate: float | jax.Array
                   ) -> optax.GradientTransformation:
  """The optimizer of every parameter: Adam with one learning rate (Table 6's lr).

  ``name`` is ``config.embedding_optimizer``: ``'adam'``, ``optax.adam`` on everything;
  ``'lazy_adam'``, the table gets :func:`htl_jax.embedding.row_adam` (only the batch's
  rows) and the model's parameters ``optax.adam``, with the same learning rate, partitioned
  by ``optax.partition``.
  """
  if name == 'adam':
    return optax.adam(learning_rate)
  if name == 'lazy_adam':
    return optax.partition(
        {'rows': embedding.row_adam(learning_rate), 'dense': optax.adam(learning_rate)},
        {'embedding': 'rows', 'model': 'dense'})
  raise ConfigError(f'config.embedding_optimizer={name!r} is not one of '
                    f'{list(EMBEDDING_OPTIMIZERS)}')


def row_adam_state(state: TrainState) -> Optional[embedding.RowAdamState]:
  """The table's row-wise Adam state in ``state`` (None with dense Adam)."""
  optimizer = state.opt_state['optimizer']
  if not isinstance(optimizer, optax.PartitionState):
    return None
  return optimizer.inner_states['rows'].inner_state['embedding']['table']


# Config fields that do NOT shape the compiled steps (data, schedule, loop and output). Every
# other top-level field does: runs that agree on all of those (and on the spec and core
# transform) share one TrainSetup, so the runs of a reproduction suite or a tuning study in
# one process compile their steps once. A new field is step-shaping unless listed here, so
# forgetting it costs a compile, never a wrong program.
_NOT_STEP_FIELDS = frozenset({
    'dataset', 'data_dir', 'cache_dir', 'data', 'split_seed', 'batch_size',
    'eval_batch_size', 'num_epochs', 'max_steps', 'eval_every', 'checkpoint_every',
    'patience', 'best_metric', 'log_every', 'feed', 'steps_per_dispatch', 'grad_diagnostics',
    'tau_grid_scale', 'gpu_determinism', 'selection', 'selection_reference',
    'checkpoint_seconds', *HYPERPARAMS,
    *INIT_FIELDS})


def make_setup(config, spec: HybridSpec, core_transform: CoreTransform) -> TrainSetup:
  """The static half of training; cached so repeated runs reuse compiled steps.

  Runs whose configs differ only in :data:`HYPERPARAMS`, the seed and the data's and loop's
  fields get the same setup (hence the same compiled programs); whether ``l2`` is zero
  shapes the program (the L2 term is left out), its value does not.
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
  config = dict(fields)
  make_optimizer(config['embedding_optimizer'], 1.0)      # a bad name fails here
  model = get_model(config['model'], spec, model_cfg)
  copies = spec.num_tasks if model.independent_tasks else 1
  return TrainSetup(
      spec=spec, model=model,
      objective=TrainingObjective.from_config(config, core_transform, type(model)),
      grad_process=resolve_grad_process(config),
      grad_path='isolated' if model.isolated_towers else 'general',
      layout=embedding.TableLayout(spec.vocab_sizes, copies), shared=tuple(model.shared),
      options=config, sparse_table=config['embedding_optimizer'] == 'lazy_adam',
      use_l2=config['use_l2'])


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
  """Fresh parameters and optimizer states; the run's PRNG key from ``config.seed``.

  One compiled program (not hundreds of eager operations), shared by every seed and
  hyperparameter value of the setup.
  """
  return _init_state(setup, int(config.embed_dim), jnp.asarray(config.seed, jnp.uint32),
                     Hyperparams.from_config(config), jnp.asarray(config.tau0, jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(setup: TrainSetup, embed_dim: int, seed: jax.Array, hparams: Hyperparams,
                tau0: jax.Array) -> TrainState:
  *keys, rng = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = init_params(setup, embed_dim, tau0, tuple(keys))
  theta_s = {'embedding': params['embedding']['table'],
             'shared': per_task.split_shared(params['model'], setup.shared)[0]}
  balance = setup.balance(hparams, seed=seed)
  balance_state = balance.init(theta_s) if balance is not None else optax.EmptyState()
  scratch = embedding.new_id_scratch(setup.layout.rows) if setup.sparse_table else None
  opt_state = {'balance': balance_state,
               'optimizer': setup.optimizer(hparams).init(params)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    tau=tau0, rng=rng, hparams=hparams, id_scratch=scratch)


def abstract_serving_state(setup: TrainSetup, config) -> ServingState:
  """The shapes and dtypes of a :class:`ServingState` (nothing is computed or allocated)."""
  return jax.eval_shape(lambda: ServingState(
      params=init_params(setup, int(config.embed_dim), config.tau0,
                         tuple(jax.random.split(jax.random.PRNGKey(0), 3))),
      tau=jnp.asarray(config.tau0, jnp.float32)))

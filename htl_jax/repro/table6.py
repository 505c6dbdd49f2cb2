"""The paper's search space, Table 6 (Appendix B.1), and who searches what (docs/design.md).

:data:`TABLE6` is the table verbatim, one grid per config field. :func:`search_space` picks
the grids of the hyperparameters a config's model has: every model tunes D, bs, lr and
lambda; HTLNet also L_d and tau_d (the paper: "for our HTLNet ... we further tune"), and
alpha, gamma and C where Algorithm 1 runs (each only while its equation is switched on).
Beyond the table, every method's own knob (:data:`OWN_KNOBS`: MetaBalance's relax factor)
is searched where that method runs, so no method competes at a fixed setting.
"""

from __future__ import annotations

from typing import Sequence

from htl_jax.errors import ConfigError
from htl_jax.train.state import resolve_grad_process

# Table 6 of the paper (Appendix B.1), verbatim, one grid per config field, searched as
# categoricals; the paper's "..." filled in its own 1-5 pattern. The docs' table of the search
# space is tested against this one.
TABLE6: dict[str, tuple] = {
    'embed_dim': (5, 10, 15, 20),                                       # D
    'batch_size': (256, 512, 1024, 2048, 4096),                         # bs
    'learning_rate': (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2),        # lr
    'l2': (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2),                   # lambda
    'label_embed_dim': (5, 10, 15, 20),                                 # L_d
    'tau_decay_steps': (1000, 5000, 10000, 15000, 20000),               # tau_d
    'alpha': (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),                 # Eq. 16
    'gamma': (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 5e-1, 1.0),  # Eq. 17
    'clip': (1.0, 5.0, 1e2, 5e2, 1e3, 5e3, 1e4),                        # C of Eq. 17
}
# tau_d counts steps; a dataset much smaller than KuaiRand-Pure scales that one grid by its
# steps per epoch over KuaiRand-Pure's at the same batch size (docs/design.md):
# ``config.tau_grid_scale``, 0 = the training split's rows over these.
KUAIRAND_PURE_TRAIN_ROWS = 948_847
# Who has which hyperparameter: every model has these four.
COMMON = ('embed_dim', 'batch_size', 'learning_rate', 'l2')
# Models with a label embedding unit (LEU tables and their Gumbel-softmax temperature).
LABEL_EMBEDDING_MODELS = ('htlnet',)
LABEL_EMBEDDING = ('label_embed_dim', 'tau_decay_steps')
# Runs of Algorithm 1 (grad_process resolves to 'htl'): alpha is Eq. 16's, gamma and clip
# Eq. 17's, so each is searched only while its equation is switched on.
CONFLICT = ('alpha',)
MAGNITUDE = ('gamma', 'clip')
# Not Table 6: every method's own knob is tuned too (docs/tuning.md). MetaBalance's relax
# factor r is defined on [0, 1] (He et al., WWW 2022, Eq. 7); this grid brackets their
# default 0.7. Runs of MetaBalance (the MB baseline, HTLNet-MetaBalance) search it.
OWN_KNOBS: dict[str, tuple] = {
    'metabalance_relax': (0.1, 0.3, 0.5, 0.7, 0.9),
}
METABALANCE = ('metabalance_relax',)


def searched(config) -> tuple[str, ...]:
  """The names of the hyperparameters that ``config``'s model has (module docstring)."""
  names = list(COMMON)
  if config.model in LABEL_EMBEDDING_MODELS and config.use_label_embedding:
    names += LABEL_EMBEDDING
  process = resolve_grad_process(config)
  if process == 'htl':
    names += CONFLICT if config.grad_conflict else ()
    names += MAGNITUDE if config.grad_magnitude else ()
  if process == 'metabalance':
    names += METABALANCE
  return tuple(names)


def search_space(config, params: Sequence[str] = (), train_rows: int = 0
                 ) -> dict[str, tuple]:
  """The Table 6 grids (and own knobs) of the hyperparameters that ``config``'s model has.

  Args:
    config: the experiment config (model, grad_process, use_label_embedding, ...).
    params: a subset of those names to search (the others keep the config's values);
      empty = all of them.
    train_rows: the training split's rows, for ``config.tau_grid_scale = 0`` (auto).

  Returns:
    ``{config field: grid}`` in :data:`TABLE6`'s order, then :data:`OWN_KNOBS`'.

  Raises:
    ConfigError: a name in ``params`` that the model does not have.
  """
  names = searched(config)
  unknown = [name for name in params if name not in names]
  if unknown:
    raise ConfigError(f'cannot search {", ".join(unknown)}: model {config.model!r} with '
                      f'this config has only {", ".join(names)}')
  chosen = set(params or names)
  space = {name: grid for name, grid in {**TABLE6, **OWN_KNOBS}.items() if name in chosen}
  if 'tau_decay_steps' in space:
    scale = tau_grid_scale(config, train_rows)
    space['tau_decay_steps'] = tuple(max(1, round(v * scale)) for v in space['tau_decay_steps'])
  return space


def keep_examples_per_evaluation(config, base) -> None:
  """A tuned batch size keeps the schedule's numbers of examples (in place).

  With a batch size ``b`` other than ``base``'s ``B``, ``config`` evaluates (and
  checkpoints, logs, stops at ``max_steps``) every ``round(n * B / b)`` steps instead of
  ``n``: a tuning trial and the seeds of its best configuration are evaluated after the
  same numbers of training examples, as the base config is.
  """
  base_batch, batch = int(base.batch_size), int(config.batch_size)
  for key in ('eval_every', 'checkpoint_every', 'log_every'):
    config[key] = _scaled(int(base[key]), base_batch, batch)
  if base.max_steps:
    config.max_steps = _scaled(int(base.max_steps), base_batch, batch)


def _scaled(steps: int, base_batch: int, batch: int) -> int:
  """``steps`` of ``base_batch`` examples in steps of ``batch`` examples (at least 1)."""
  return max(1, round(steps * base_batch / batch))


def tau_grid_scale(config, train_rows: int = 0) -> float:
  """The factor of Table 6's tau_d grid: ``config.tau_grid_scale``, or with 0 (auto) the
  training split's rows over KuaiRand-Pure's (docs/design.md)."""
  scale = float(config.tau_grid_scale)
  if scale > 0:
    return scale
  if train_rows < 1:
    raise ConfigError('config.tau_grid_scale=0 (auto) needs the training split\'s rows')
  return train_rows / KUAIRAND_PURE_TRAIN_ROWS

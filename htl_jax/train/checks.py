"""Config checks before any data is read: every impossible setting is one clear error.

:func:`check_config` raises :class:`htl_jax.errors.ConfigError` naming the field, its value
and what would work. The entry points, the reproduction runner and the tuning study call it
before their first run, so a bad value never costs a data load or a compile.
"""

from __future__ import annotations

from htl_jax import embedding
from htl_jax.errors import ConfigError
from htl_jax.losses import CORE_TRANSFORMS
from htl_jax.models import MODELS, model_class
from htl_jax.selection import RULES, selection
from htl_jax.train import parallel
from htl_jax.train.state import EMBEDDING_OPTIMIZERS, GRAD_PROCESSES, resolve_grad_process

FEEDS = ('auto', 'device', 'host')


def check_config(config) -> None:
  """Reject impossible settings (module docstring)."""
  choices = {'model': tuple(MODELS), 'grad_process': GRAD_PROCESSES,
             'head': ('mse', 'ziln'), 'core_transform': CORE_TRANSFORMS,
             'fusion': ('attention', 'concat'), 'embedding_optimizer': EMBEDDING_OPTIMIZERS,
             'feed': FEEDS, 'grad_diagnostics': ('eval', 'every_step'),
             'embedding_init': embedding.EMBEDDING_INITS, 'selection': RULES}
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ConfigError(f'config.{key}={config[key]!r} is not one of {list(allowed)}')
  for key in ('batch_size', 'eval_batch_size', 'num_epochs', 'eval_every',
              'checkpoint_every', 'tau_decay_steps', 'log_every', 'patience', 'embed_dim',
              'steps_per_dispatch'):
    if int(config[key]) < 1:
      raise ConfigError(f'config.{key} must be >= 1, got {config[key]}')
  n = parallel.device_count()
  if config.batch_size % n or config.eval_batch_size % n:
    raise ConfigError(f'batch_size={config.batch_size} and eval_batch_size='
                      f'{config.eval_batch_size} must be divisible by the {n} devices '
                      f'(of all processes)')
  selection(config)        # the rule, its metric, delta_m's reference file
  _check_model_config(config)


def _check_model_config(config) -> None:
  """Settings that the chosen model cannot take (its class facts)."""
  model = model_class(config.model)
  grad_process = resolve_grad_process(config)
  if model.independent_tasks and grad_process != 'none':
    raise ConfigError(f'config.grad_process={config.grad_process!r} does not apply to '
                      f'model {config.model!r}: its tasks share no parameters (one '
                      'independent model per task); use grad_process=none or auto')
  if model.required_head and config.head != model.required_head:
    raise ConfigError(f'model {config.model!r} needs head={model.required_head!r}, got '
                      f'head={config.head!r}')
  if not config.hidden_dims or min(config.hidden_dims) < 1:
    raise ConfigError(f'config.hidden_dims must be positive layer sizes, got '
                      f'{tuple(config.hidden_dims)}')
  if model.splits_hidden_dims and len(config.hidden_dims) < 2:
    raise ConfigError(f'model {config.model!r} needs at least 2 hidden_dims (shared layers, '
                      f'then the tower layer), got {tuple(config.hidden_dims)}')
  if not 0.0 <= config.alpha <= 1.0:
    raise ConfigError(f'config.alpha (the projection relax factor of Eq. 16) must be in '
                      f'[0, 1], got {config.alpha}')

"""The config check: the whole config, before any file is read or written (DESIGN section 8).

:data:`FIELDS` states every field's range once: its type, its bounds or its choices.
:func:`check_config` checks them all (types, finiteness, ranges), then what the fields say
together (a model that cannot take a head or a gradient process, a batch the devices cannot
split, the selection rule's reference, the columns' roles of a tabular file), and raises
ONE :class:`htl_jax.errors.ConfigError` (exit code 2) naming the field, its value and what
it may be. The commands, the reproduction runner and the tuning study call it first, so a
bad value never costs a data load, a compile or a file. docs/configs.md shows
:func:`describe` of every field (a test keeps them in step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from htl_jax import data as data_lib
from htl_jax import embedding
from htl_jax.data import encoding
from htl_jax.errors import ConfigError, DataError
from htl_jax.losses import CORE_TRANSFORMS
from htl_jax.metrics import CORE_METRICS
from htl_jax.models import MODELS, model_class
from htl_jax.selection import RULES, selection
from htl_jax.train import parallel
from htl_jax.train.optimizer import EMBEDDING_OPTIMIZERS, GRAD_PROCESSES
from htl_jax.train.state import resolve_grad_process

FEEDS = ('auto', 'device', 'host')


@dataclasses.dataclass(frozen=True)
class Range:
  """What one config field may be.

  Attributes:
    kind: ``'int'``, ``'float'`` (finite), ``'bool'``, ``'text'``, ``'choice'`` or
      ``'sizes'`` (a non-empty tuple of ints >= 1).
    low, high: bounds (None: unbounded); ``low_open`` / ``high_open`` exclude them.
    choices: the values a ``'choice'`` field takes.
    note: what a special value means (``0 = all``).
  """

  kind: str
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  choices: tuple = ()
  note: str = ''

  def describe(self) -> str:
    """The range as docs/configs.md writes it."""
    if self.kind == 'choice':
      text = ' \\| '.join(f'`{c}`' if c else "`''`" for c in self.choices)
    elif self.kind == 'sizes':
      text = 'ints >= 1'
    elif self.kind in ('bool', 'text'):
      text = self.kind
    else:
      text = self.kind + self._bounds()
    return f'{text} ({self.note})' if self.note else text

  def _bounds(self) -> str:
    if self.low is not None and self.high is not None:
      return (f' in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}'
              f'{")" if self.high_open else "]"}')
    if self.low is not None:
      return f' {">" if self.low_open else ">="} {self.low:g}'
    return ''

  def problem(self, value: Any) -> str:
    """Why ``value`` is outside the range ('' when it is inside)."""
    if self.kind == 'choice':
      return '' if value in self.choices else 'is not one of the choices'
    if self.kind == 'sizes':
      ok = (isinstance(value, (tuple, list)) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
      return '' if ok else 'must be layer sizes >= 1'
    if self.kind == 'bool':
      return '' if isinstance(value, bool) else 'is not a bool'
    if self.kind == 'text':
      return '' if isinstance(value, str) else 'is not text'
    number = (int,) if self.kind == 'int' else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
      return f'is not an {self.kind}' if self.kind == 'int' else 'is not a number'
    if not math.isfinite(value):
      return 'is not finite'
    too_low = self.low is not None and (value <= self.low if self.low_open
                                        else value < self.low)
    too_high = self.high is not None and (value >= self.high if self.high_open
                                          else value > self.high)
    return 'is out of range' if too_low or too_high else ''


def _int(low: float = 1, note: str = '') -> Range:
  return Range('int', low, note=note)


def _float(low: float = 0.0, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False, note: str = '') -> Range:
  return Range('float', low, high, low_open, high_open, note=note)


def _choice(*choices, note: str = '') -> Range:
  return Range('choice', choices=tuple(choices), note=note)


TEXT, BOOL = Range('text'), Range('bool')

# Every field of htl_jax/configs/base.py and what it may be (one home: check_config and
# docs/configs.md read it).
FIELDS: dict[str, Range] = {
    'dataset': _choice(*sorted(data_lib.DATASETS)),
    'data_dir': TEXT, 'cache_dir': TEXT,
    'data.path': TEXT, 'data.categorical': TEXT, 'data.numeric': TEXT, 'data.tasks': TEXT,
    'data.core': TEXT, 'data.time_column': TEXT, 'data.user_column': TEXT,
    'data.passthrough': TEXT,
    'data.numeric_buckets': _int(),
    'data.numeric_encoding': _choice(*encoding.ENCODINGS),
    'data.max_rows': _int(0, note='0 = all rows'),
    'model': _choice(*MODELS),
    'embed_dim': _int(), 'embedding_init': _choice(*embedding.EMBEDDING_INITS),
    'hidden_dims': Range('sizes'), 'label_embed_dim': _int(), 'fusion_dim': _int(),
    'head': _choice('mse', 'ziln'), 'core_transform': _choice(*CORE_TRANSFORMS),
    'use_label_embedding': BOOL, 'use_representation': BOOL,
    'fusion': _choice('attention', 'concat'), 'stop_gradient': BOOL, 'gumbel_noise': BOOL,
    'num_experts': _int(), 'aitm_alpha': _float(), 'tafe_dtl_weight': _float(),
    'lambda_pair': _float(),
    'tau0': _float(low_open=True), 'tau_decay': _float(0.0, 1.0, low_open=True),
    'tau_decay_steps': _int(), 'tau_min': _float(low_open=True),
    'tau_grid_scale': _float(note='0 = auto'),
    'grad_process': _choice(*GRAD_PROCESSES), 'grad_conflict': BOOL, 'grad_magnitude': BOOL,
    'alpha': _float(0.0, 1.0), 'gamma': _float(0.0, 1.0), 'clip': _float(1.0),
    'per_leaf': BOOL, 'metabalance_beta': _float(0.0, 1.0, high_open=True),
    'metabalance_relax': _float(0.0, 1.0),
    'seed': _int(0), 'split_seed': _int(0), 'batch_size': _int(), 'eval_batch_size': _int(),
    'num_epochs': _int(), 'max_steps': _int(0, note='0 = num_epochs'),
    'learning_rate': _float(low_open=True),
    'embedding_optimizer': _choice(*EMBEDDING_OPTIMIZERS), 'l2': _float(),
    'eval_every': _int(), 'checkpoint_every': _int(), 'checkpoint_seconds': _float(),
    'selection': _choice(*RULES), 'selection_reference': TEXT,
    'patience': _int(), 'min_improvement': _float(),
    'best_metric': _choice('', *CORE_METRICS, note="'' = by head"),
    'log_every': _int(), 'feed': _choice(*FEEDS), 'steps_per_dispatch': _int(),
    'grad_diagnostics': _choice('eval', 'every_step'), 'gpu_determinism': BOOL,
}


def _value(config, name: str) -> Any:
  node = config
  for part in name.split('.'):
    node = node[part]
  return node


def check_fields(config) -> None:
  """Every field of :data:`FIELDS` in its range: one ConfigError naming the first that is
  not (the value, and what it may be)."""
  for name, allowed in FIELDS.items():
    try:
      value = _value(config, name)
    except (KeyError, AttributeError):
      raise ConfigError(f'config.{name} is missing; a config starts from '
                        'htl_jax/configs/base.py') from None
    problem = allowed.problem(value)
    if problem:
      shown = tuple(value) if isinstance(value, list) else value
      raise ConfigError(f'config.{name}={shown!r} {problem}: it may be '
                        f'{allowed.describe().replace(chr(92), "")}')


def check_config(config) -> None:
  """Reject impossible settings (module docstring)."""
  check_fields(config)
  n = parallel.device_count()
  if config.batch_size % n or config.eval_batch_size % n:
    raise ConfigError(f'batch_size={config.batch_size} and eval_batch_size='
                      f'{config.eval_batch_size} must be divisible by the {n} devices '
                      f'(of all processes)')
  if config.tau_min > config.tau0:
    raise ConfigError(f'config.tau_min={config.tau_min} is above config.tau0={config.tau0}')
  selection(config)        # the rule, its metric, delta_m's reference file
  _check_model_config(config)
  try:
    data_lib.check_columns(config)
  except DataError as error:
    raise ConfigError(str(error)) from None


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
  if model.splits_hidden_dims and len(config.hidden_dims) < 2:
    raise ConfigError(f'model {config.model!r} needs at least 2 hidden_dims (shared layers, '
                      f'then the tower layer), got {tuple(config.hidden_dims)}')

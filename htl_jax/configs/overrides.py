"""Config-string arguments shared by every dataset config (``get_config(arg)``).

``--config=kuairand:model=mmoe,smoke=True`` passes ``'model=mmoe,smoke=True'`` to
``get_config``, which calls :func:`apply_args`. Keys are config fields (dotted for nested
ones: ``data.max_rows=1000``); values are converted to the type of the field they replace
(bool, int, float, str, or a tuple such as ``hidden_dims=(16,8)``). A comma-separated piece
without ``=`` continues the previous value, so ``data.tasks=click,buy`` and
``hidden_dims=16,8`` work. ``smoke=True`` shrinks the run for tests (:data:`SMOKE`); other
keys given with it win over its values.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections

from htl_jax.errors import ConfigError

# What smoke=True sets: a few tiny steps that still exercise eval and checkpointing.
SMOKE = {
    'batch_size': 256,
    'eval_batch_size': 1024,
    'num_epochs': 1,
    'max_steps': 20,
    'eval_every': 10,
    'checkpoint_every': 10,
    'checkpoint_seconds': 0,     # every evaluation writes, however short the run
    'hidden_dims': (16, 8),
    'log_every': 5,
}
SMOKE_MAX_ROWS = 3000
# Datasets that read no files (max_rows means nothing to them).
_FILELESS_DATASETS = ('synthetic',)
_TRUE = ('true', '1', 'yes', 'on')
_FALSE = ('false', '0', 'no', 'off')


def parse_args(arg: Optional[str]) -> dict[str, str]:
  """``'a=1,b=x,y'`` -> ``{'a': '1', 'b': 'x,y'}`` (pieces without ``=`` continue a value)."""
  pairs: dict[str, str] = {}
  last = None
  for piece in (arg or '').split(','):
    if '=' in piece:
      key, value = piece.split('=', 1)
      last = key.strip()
      if not last:
        raise ConfigError(f'config argument {piece!r} has no key; expected key=value')
      pairs[last] = value.strip()
    elif last is not None:
      pairs[last] += ',' + piece.strip()
    elif piece.strip():
      raise ConfigError(f'config argument {piece!r} is not key=value')
  return pairs


def convert(value: str, current: Any, key: str) -> Any:
  """Converts the string ``value`` to the type of the field's ``current`` value."""
  try:
    if isinstance(current, bool):
      lowered = value.lower()
      if lowered not in _TRUE + _FALSE:
        raise ConfigError(f'expected one of {_TRUE + _FALSE}')
      return lowered in _TRUE
    if isinstance(current, int):
      return int(value)
    if isinstance(current, float):
      return float(value)
    if isinstance(current, tuple):
      items = [item.strip() for item in value.strip('()[] ').split(',') if item.strip()]
      element = current[0] if current else ''
      return tuple(convert(item, element, key) for item in items)
    return value
  except ValueError as error:
    raise ConfigError(f'config argument {key}={value!r}: cannot convert to '
                     f'{type(current).__name__} ({error})') from None


def _has_key(config: ml_collections.ConfigDict, key: str) -> bool:
  node: Any = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)


def _set(config: ml_collections.ConfigDict, key: str, value: str) -> None:
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = convert(value, node[leaf], key)


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks ``config`` in place to a seconds-long run (see :data:`SMOKE`)."""
  for key, value in SMOKE.items():
    config[key] = value
  if config.dataset not in _FILELESS_DATASETS:
    config.data.max_rows = SMOKE_MAX_ROWS


def apply_args(config: ml_collections.ConfigDict,
               arg: Optional[str]) -> ml_collections.ConfigDict:
  """Applies ``key=value,...`` overrides (and ``smoke``) to ``config`` in place.

  Args:
    config: a dataset config built from ``htl_jax.configs.base.get_base_config``.
    arg: the string after ``:`` in ``--config=FILE:ARG``; None or '' changes nothing.

  Returns:
    ``config``, for chaining.

  Raises:
    ValueError: an unknown key (all of them are listed) or a value of the wrong type.
  """
  pairs = parse_args(arg)
  smoke = convert(pairs.pop('smoke'), False, 'smoke') if 'smoke' in pairs else False
  unknown = [key for key in pairs if not _has_key(config, key)]
  if unknown:
    raise ConfigError(f'unknown config key(s) {", ".join(unknown)} in {arg!r}; keys are the '
                      'fields of htl_jax/configs/base.py (dotted for nested ones) and smoke; '
                      '`htl-train --config=NAME --print_config` lists them')
  if smoke:
    apply_smoke(config)
  for key, value in pairs.items():
    _set(config, key, value)
  return config

"""The experiment configs that ship with htl-jax, and how a command finds one.

A config is a Python file with ``get_config(arg=None) -> ml_collections.ConfigDict``
(big_vision's convention). Every field and its default is in :mod:`htl_jax.configs.base`
(docs/configs.md explains each); a dataset config sets its data block and schedule:

| name | data |
|---|---|
| ``kuairand`` | KuaiRand-Pure; by default the embedded sample |
| ``hillstrom`` | the Hillstrom e-mail data (visit -> conversion -> spend) |
| ``kaggle_revenue`` | Acquire Valued Shoppers ``transactions.csv`` (ZILN preprocessing) |
| ``product`` | the paper's Product layout (click -> purchase -> amount) in your file |
| ``tabular`` | any CSV / Parquet file whose columns you name |

A command's ``--config`` is a built-in name or a path to such a file, with optional
arguments after a colon (:mod:`htl_jax.configs.overrides`)::

  --config=kuairand:model=mmoe,smoke=True
  --config=path/to/my_config.py:smoke=True

:func:`resolve` turns the first form into the second.
"""

from __future__ import annotations

import os

from htl_jax.errors import ConfigError

BUILTIN = ('kuairand', 'hillstrom', 'kaggle_revenue', 'product', 'tabular')
_HERE = os.path.dirname(os.path.abspath(__file__))


def path_of(name: str) -> str:
  """The file of the built-in config ``name``."""
  if name not in BUILTIN:
    raise ConfigError(f'unknown config {name!r}; built-in configs: {", ".join(BUILTIN)} '
                      '(or give the path to a config file)')
  return os.path.join(_HERE, f'{name}.py')


def resolve(value: str) -> str:
  """``NAME[:ARGS]`` of a built-in config -> ``PATH[:ARGS]``; a path is returned unchanged.

  A path has a ``/`` or ends in ``.py`` (``./kuairand.py``, ``configs/kuairand.py``); any
  other value is a built-in name, so a file called ``kuairand`` in the current folder never
  runs in place of the built-in. A config file is Python and runs when it is loaded (also
  for ``--print_config``): run only config files you trust.
  """
  head, sep, args = value.partition(':')
  if '/' in head or os.sep in head or head.endswith('.py'):
    return value
  return path_of(head) + sep + args

"""A tiny in-memory hybrid-target dataset with real task dependence, for unit tests.

Generative process (seeded by ``config.split_seed``, the data's seed;
``config.data.max_rows`` rows, default 4000):

* fields ``user`` (50 ids), ``item`` (40 ids), ``channel`` (5 ids, strings), ``hour``
  (24 ids) and one numeric field ``price`` (lognormal, ~3% nulls);
* latent logit ``s = b_user + b_item + 0.8 * a[user_group, item_group] - 0.3 * log(price)``
  with per-id biases ``b`` and a 4 x 4 group-affinity matrix ``a``;
* ``click ~ Bernoulli(sigmoid(s - 0.8))``; ``convert ~ Bernoulli(sigmoid(s - 0.5))`` only
  when ``click = 1`` (so the labels are nested);
* ``value = exp(1 + 0.4 * s + 0.5 * eps)`` only when ``convert = 1``, else 0;
* ``time`` = row position (chronological split).

Binary tasks ``('click', 'convert')``, core task ``'value'``. Runs in milliseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from htl_jax.data.schema import RawTable

DEFAULT_ROWS = 4000
_USERS, _ITEMS, _GROUPS = 50, 40, 4


def input_files(config: Any) -> list[str]:
  """No files: the data is generated from the config."""
  del config
  return []


def load_raw(config: Any) -> RawTable:
  """Generates the table described in the module docstring."""
  n = int(config.data.max_rows) or DEFAULT_ROWS
  rng = np.random.default_rng(int(config.split_seed))
  user_bias = rng.normal(0.0, 0.8, _USERS)
  item_bias = rng.normal(0.0, 0.8, _ITEMS)
  affinity = rng.normal(0.0, 1.0, (_GROUPS, _GROUPS))
  user = rng.integers(0, _USERS, n)
  item = rng.integers(0, _ITEMS, n)
  channel = rng.integers(0, 5, n)
  hour = rng.integers(0, 24, n)
  price = rng.lognormal(2.0, 0.7, n)
  score = (user_bias[user] + item_bias[item]
           + 0.8 * affinity[user % _GROUPS, item % _GROUPS] - 0.3 * np.log(price)
           + 0.2 * (channel == 0))
  click = rng.random(n) < 1.0 / (1.0 + np.exp(-(score - 0.8)))
  convert = click & (rng.random(n) < 1.0 / (1.0 + np.exp(-(score - 0.5))))
  value = np.where(convert, np.exp(1.0 + 0.4 * score + 0.5 * rng.normal(size=n)), 0.0)
  price_col = np.where(rng.random(n) < 0.03, np.nan, price)
  features = pl.DataFrame({
      'user': user,
      'item': item,
      'channel': np.array(['web', 'app', 'mail', 'ads', 'shop'])[channel],
      'hour': hour,
      'price': pl.Series(price_col).fill_nan(None),
  })
  labels = np.stack([click, convert], axis=1).astype(np.float32)
  return RawTable(features=features, numeric=('price',), labels=labels,
                  core=value.astype(np.float32), time=np.arange(n, dtype=np.int64),
                  binary_tasks=('click', 'convert'), core_task='value', source='synthetic',
                  label_columns=('click', 'convert', 'value'))

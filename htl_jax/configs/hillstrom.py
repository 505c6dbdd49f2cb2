"""Hillstrom e-mail analytics (MineThatData 2008): visit -> conversion -> spend.

64,000 customers, a real three-step hybrid target like the paper's Product data: binary
``visit`` (14.68%) -> ``conversion`` (0.90%, nested) -> core ``spend``. No time column, so a
random 8:1:1 split drawn once from ``split_seed``. Download ``hillstrom.csv`` (docs/data.md
says where and how to check it) and give its path::

  htl-train --config=hillstrom --workdir=runs/hillstrom --config.data.path=/path/hillstrom.csv

Without ``--config.data.path`` the file is looked for in ``$HTL_JAX_DATA`` (if set), else in
the current folder.

Variants go after a colon, e.g. ``--config=hillstrom:model=mmoe,smoke=True``.
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections

from htl_jax.configs import overrides
from htl_jax.configs.base import get_base_config

FILE_NAME = 'hillstrom.csv'


def default_path() -> str:
  """``$HTL_JAX_DATA/hillstrom.csv`` when that variable is set, else ``hillstrom.csv``."""
  return os.path.join(os.environ.get('HTL_JAX_DATA', ''), FILE_NAME)


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = get_base_config()
  config.dataset = 'tabular'
  config.data.path = default_path()
  config.data.categorical = 'history_segment,zip_code,channel,segment,mens,womens,newbie'
  config.data.numeric = 'recency,history'
  config.data.tasks = 'visit,conversion'
  config.data.core = 'spend'
  config.data.time_column = ''
  # 51,200 training rows: batches of 512 give 100 steps an epoch. Evaluations every half
  # epoch; the epoch cap is a safety net, early stopping (patience 3) ends the runs: measured
  # 5 to 16 epochs for lr 5e-3 to 1e-4 (docs/results.md).
  config.batch_size = 512
  config.num_epochs = 50
  config.eval_every = 50
  config.checkpoint_every = 50
  config.tau_decay_steps = 100
  config.log_every = 50
  return overrides.apply_args(config, arg)

"""Hillstrom e-mail analytics (MineThatData 2008): visit -> conversion -> spend.

64,000 customers, a real three-step hybrid target like the paper's Product data (see
``../shared/data/README.md``): binary ``visit`` (14.68%) -> ``conversion`` (0.90%, nested)
-> core ``spend``. No time column, so a seeded random 8:1:1 split. The file is read from
``<repository>/../shared/data/hillstrom.csv`` (override with ``--config.data.path``)::

  python -m experiments.main --config=configs/hillstrom.py --workdir=runs/hillstrom

Variants go after a colon, e.g. ``--config=configs/hillstrom.py:model=mmoe,smoke=True``.
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections

from configs import common
from configs.base import get_base_config

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.normpath(
    os.path.join(_REPOSITORY, '..', 'shared', 'data', 'hillstrom.csv'))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = get_base_config()
  config.dataset = 'tabular'
  config.data.path = DEFAULT_PATH
  config.data.categorical = 'history_segment,zip_code,channel,segment,mens,womens,newbie'
  config.data.numeric = 'recency,history'
  config.data.tasks = 'visit,conversion'
  config.data.core = 'spend'
  config.data.time_column = ''
  # 51,200 training rows: batches of 512 give 100 steps an epoch.
  config.batch_size = 512
  config.num_epochs = 5
  config.eval_every = 100
  config.checkpoint_every = 100
  config.tau_decay_steps = 100
  config.log_every = 50
  return common.apply_args(config, arg)

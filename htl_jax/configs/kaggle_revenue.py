"""Kaggle-Revenue (Acquire Valued Shoppers, ZILN preprocessing): 1Y -> 1M repurchase -> 1M spend.

Tasks (docs/design.md, :mod:`htl_jax.data.kaggle_revenue`): ``repurchase_1y`` ->
``repurchase_1m`` (nested) -> core ``amount_1m``, one example per (customer, company) of the
ZILN paper's 20 companies, split chronologically by the first purchase date. Download
``transactions.csv.gz`` from the Kaggle competition and decompress it into DIR, then::

  htl-train --config=kaggle_revenue \
      --workdir=runs/kaggle_revenue --config.data_dir=DIR

Variants go after a colon, e.g. ``--config=kaggle_revenue:model=mmoe,head=ziln``;
``smoke=True`` shrinks the run to a few steps on the first 3000 transaction rows.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from htl_jax.configs import overrides
from htl_jax.configs.base import get_base_config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = get_base_config()
  config.dataset = 'kaggle_revenue'
  config.data_dir = ''  # the folder holding transactions.csv; required
  config.data.passthrough = 'id,company'  # id columns written next to predictions
  return overrides.apply_args(config, arg)

"""The paper's "Product" data (click -> purchase -> purchase amount), in your own file.

The paper's Product data set is private; this config declares its task structure (binary
tasks ``click`` -> ``purchase``, core ``amount``) for a CSV or Parquet file of that shape
(:mod:`htl_jax.data.tabular`). Give the file and its feature columns (and, for a
chronological split, its time column)::

  htl-train --config=product --workdir=runs/product \
      --config.data.path=FILE --config.data.categorical=user_id,item_id,category \
      --config.data.numeric=price --config.data.time_column=ts

Variants go after a colon, e.g. ``--config=product:model=esmm``.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from htl_jax.configs import overrides
from htl_jax.configs.base import get_base_config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = get_base_config()
  config.dataset = 'tabular'
  config.data.tasks = 'click,purchase'
  config.data.core = 'amount'
  # Feature columns depend on the file: --config.data.categorical / --config.data.numeric.
  return overrides.apply_args(config, arg)

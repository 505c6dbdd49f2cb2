"""Your own data: one CSV or Parquet file, a chain of binary tasks and a continuous core.

Name the columns on the command line (comma-separated; tasks in chain order, each nested in
the previous one; ``time_column`` is optional, '' gives a seeded random 8:1:1 split)::

  htl-train --config=tabular --workdir=runs/mydata \
      --config.data.path=FILE --config.data.categorical=a,b --config.data.numeric=c,d \
      --config.data.tasks=y1,y2 --config.data.core=amount --config.data.time_column=ts

Files ending in .csv, .tsv, .parquet or .pq are read (:mod:`htl_jax.data.tabular`); a bad
file or column stops the run with a one-line message before training. Variants go after a
colon, e.g. ``--config=tabular:model=mmoe,smoke=True``.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from htl_jax.configs import overrides
from htl_jax.configs.base import get_base_config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = get_base_config()
  config.dataset = 'tabular'
  return overrides.apply_args(config, arg)

"""KuaiRand-Pure: click -> long view -> watch time (the paper's main dataset).

Runs on the embedded KuaiRand-format sample by default (a few minutes on 2 CPU cores)::

  htl-train --config=kuairand --workdir=runs/kuairand

and on the real data with ``--config.data_dir=/path/to/KuaiRand-Pure/data``. Variants go
after a colon, e.g. ``--config=kuairand:model=mmoe,smoke=True``; any field of
``htl_jax/configs/base.py`` can also be set with ``--config.NAME=VALUE``.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from htl_jax.configs import overrides
from htl_jax.configs.base import get_base_config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = get_base_config()
  config.dataset = 'kuairand'
  config.data_dir = ''          # '' = the embedded sample shipped with the package
  config.data.passthrough = 'user_id,video_id'  # id columns written next to predictions
  # The sample has 32,000 training rows: a smaller batch gives enough steps per epoch (62).
  # Evaluations every half epoch; the epoch cap is a safety net, early stopping (patience 3)
  # ends the runs: measured 3 to 14 epochs for lr 5e-3 to 1e-4 (docs/results.md). On the
  # full KuaiRand-Pure (1,853 steps an epoch at this batch) use --config.eval_every=900.
  config.batch_size = 512
  config.num_epochs = 50
  config.eval_every = 31
  config.checkpoint_every = 31
  config.tau_decay_steps = 100
  config.log_every = 31
  return overrides.apply_args(config, arg)

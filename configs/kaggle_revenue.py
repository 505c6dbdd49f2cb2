"""The checkout's path to a built-in config: :mod:`htl_jax.configs.kaggle_revenue`.

``--config=configs/kaggle_revenue.py`` and ``--config=kaggle_revenue`` load the same config;
edit that module, not this file.
"""

from htl_jax.configs.kaggle_revenue import get_config  # noqa: F401

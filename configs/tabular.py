"""The checkout's path to a built-in config: :mod:`htl_jax.configs.tabular`.

``--config=configs/tabular.py`` and ``--config=tabular`` load the same config;
edit that module, not this file.
"""

from htl_jax.configs.tabular import get_config  # noqa: F401

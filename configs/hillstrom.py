"""The checkout's path to a built-in config: :mod:`htl_jax.configs.hillstrom`.

``--config=configs/hillstrom.py`` and ``--config=hillstrom`` load the same config;
edit that module, not this file.
"""

from htl_jax.configs.hillstrom import get_config  # noqa: F401

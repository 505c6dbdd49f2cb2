"""The checkout's path to a built-in config: :mod:`htl_jax.configs.kuairand`.

``--config=configs/kuairand.py`` and ``--config=kuairand`` load the same config;
edit that module, not this file.
"""

from htl_jax.configs.kuairand import get_config  # noqa: F401

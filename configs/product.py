"""The checkout's path to a built-in config: :mod:`htl_jax.configs.product`.

``--config=configs/product.py`` and ``--config=product`` load the same config;
edit that module, not this file.
"""

from htl_jax.configs.product import get_config  # noqa: F401

"""``python -m experiments.tune`` in a checkout: the command ``htl-tune``.

See :mod:`htl_jax.cli.tune` for what it does and its flags (``--help``).
"""

from htl_jax.cli.tune import run

if __name__ == '__main__':
  run()

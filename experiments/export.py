"""``python -m experiments.export`` in a checkout: the command ``htl-export``.

See :mod:`htl_jax.cli.export` for what it does and its flags (``--help``).
"""

from htl_jax.cli.export import run

if __name__ == '__main__':
  run()

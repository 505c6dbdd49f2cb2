"""``python -m experiments.reproduce`` in a checkout: the command ``htl-reproduce``.

See :mod:`htl_jax.cli.reproduce` for what it does and its flags (``--help``).
"""

from htl_jax.cli.reproduce import run

if __name__ == '__main__':
  run()

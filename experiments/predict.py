"""``python -m experiments.predict`` in a checkout: the command ``htl-predict``.

See :mod:`htl_jax.cli.predict` for what it does and its flags (``--help``).
"""

from htl_jax.cli.predict import run

if __name__ == '__main__':
  run()

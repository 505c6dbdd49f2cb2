"""``python -m experiments.main`` in a checkout: the command ``htl-train``.

See :mod:`htl_jax.cli.train` for what it does and its flags (``--help``).
"""

from htl_jax.cli.train import run

if __name__ == '__main__':
  run()

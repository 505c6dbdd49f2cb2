"""Entry points (thin absl programs over the library) and what every one of them does first."""

from __future__ import annotations

from absl import app
from absl import logging


def start(argv: list[str]) -> None:
  """Common start: no stray arguments, INFO logging without orbax's line per checkpoint save."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)

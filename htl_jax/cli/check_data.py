"""``htl-check-data``: check a downloaded dataset before training on it.

  htl-check-data --config=kuairand --config.data_dir=/path/to/KuaiRand-Pure/data
  htl-check-data --config=kaggle_revenue --config.data_dir=DIR
  htl-check-data --config=hillstrom --config.data.path=/path/hillstrom.csv
  htl-check-data --config=tabular --config.data.path=FILE --config.data.tasks=... (etc.)

Compares the local copy with what the paper and the data's publishers state
(:mod:`htl_jax.data.check`): one line per check, ``ok`` or ``DIFFERS`` with the expected and
the found value, then a summary with the tolerances. Exit codes: 0 every check passes; 1
something differs (a warning: the data may still be usable); 2 a missing file or column, or
data that training would stop on (one ``error: ...`` line on stderr).
"""

from __future__ import annotations

import sys

from absl import flags

from htl_jax.cli import common
from htl_jax.data import check

flags.DEFINE_enum(
    'published', 'auto', check.PUBLISHED,
    'Which published statistics to compare with: auto (KuaiRand-Pure and Kaggle-Revenue by '
    "the config's dataset, Hillstrom for a tabular file named hillstrom.csv), hillstrom (a "
    'tabular file under another name), none (files, columns and values only).')
common.define_config_flags()
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  config = common.load_config()
  report = check.check_dataset(config, published=FLAGS.published)
  print('\n'.join(report.lines()), flush=True)
  if report.exit_code:
    sys.exit(report.exit_code)


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()

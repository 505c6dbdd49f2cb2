"""``htl-predict``: score a file with a trained run's best checkpoint.

  htl-predict --workdir=runs/kuairand --data=/path/to/KuaiRand-dir --out=predictions.parquet

``--data`` is what the run's loader reads: a CSV / Parquet file for tabular runs, a
directory with the log, user and video CSV files for KuaiRand, a directory holding
``transactions.csv`` for Kaggle-Revenue. The output (Parquet, or CSV when the name ends in
``.csv``) has, per input row, the passthrough columns (``config.data.passthrough`` of the
run, or ``--passthrough``), ``prob_<task>`` per binary task and ``pred_<core task>`` on the
original scale. A numeric cell that is not a number is scored as missing and counted per
column in the log; ``--strict`` stops on it instead. A workdir without a finished run, a
missing file or feature column, or an ``--out`` that is a directory or lies in a missing or
read-only directory stops with one line on stderr and exit code 2, before any scoring.
"""

from __future__ import annotations

from absl import flags

from htl_jax.cli import common
from htl_jax.serve.predict import DEFAULT_CHUNK_ROWS, predict_file

flags.DEFINE_string('workdir', None, 'The training run (its --workdir).')
flags.DEFINE_string('data', None, 'The input file or directory to score.')
flags.DEFINE_string('out', None, 'Predictions file: .parquet, or .csv for CSV.')
flags.DEFINE_integer('chunk_rows', DEFAULT_CHUNK_ROWS, 'Input rows read and scored at a time.',
                     lower_bound=1)
flags.DEFINE_string('passthrough', None, 'Comma-separated input columns to copy to the '
                    "output (default: the run's config.data.passthrough).")
flags.DEFINE_bool('strict', False, 'Stop (one error line, exit code 2, no output) on a '
                  'numeric cell that is not a number, instead of scoring it as missing and '
                  'counting it.')
flags.mark_flags_as_required(['workdir', 'data', 'out'])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  summary = predict_file(FLAGS.workdir, FLAGS.data, FLAGS.out, chunk_rows=FLAGS.chunk_rows,
                         passthrough=FLAGS.passthrough, strict=FLAGS.strict)
  print(f'{summary.rows} rows scored ({summary.rows_per_second:.0f} rows/s) -> {summary.out}')


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()

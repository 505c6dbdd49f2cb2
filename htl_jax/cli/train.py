"""``htl-train``: train and evaluate one model on one dataset (``train_and_evaluate``).

  htl-train --config=kuairand --workdir=runs/kuairand
  python -m experiments.main --config=configs/kuairand.py --workdir=runs/kuairand

Writes into ``--workdir`` the config, the fitted preprocessing, one metrics line per
evaluation, the best checkpoint's metrics and the checkpoints; running the same command
again resumes an interrupted run. On several hosts, run the same command on each with
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (or under ``srun`` /
``mpirun`` with none of them).

Exit codes: 2 bad input (config, data, flags; nothing already written is touched) or a
workdir in use by another process, 3 a non-finite loss (the last good checkpoint is kept), 4
another process of a multi-process run was lost (restart all of them to resume), 75 stopped
by SIGTERM / SIGINT after saving a checkpoint (run the same command again to resume).
"""

from __future__ import annotations

from absl import flags

from htl_jax.cli import common
from htl_jax.train.loop import train_and_evaluate

flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics; an existing run '
                    'there is resumed.')
common.define_training_flags('workdir')
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  train_and_evaluate(common.start_training(FLAGS.workdir), FLAGS.workdir)


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()

"""``htl-reproduce``: a table or figure of the paper, with seeds, significance and figures.

  htl-reproduce --experiment=table2 --config=kuairand --seeds=10 --workdir=runs/table2

Experiments: table1 (data statistics), table2, table3, table4, fig4, table5, table7, fig5,
fig7, fig8 (``htl_jax/repro/experiments.py``). Each run trains in ``<workdir>/<variant>/
seed<k>``; the runs are the trials of an Optuna study in ``<workdir>/optuna.db`` or in
``--storage=postgresql://...``, so the same command started on several machines shares the
work, a finished run is never redone and a killed one resumes. When every run is done the
command writes ``results.csv``, ``table.md`` (mean ± std, best bold, second underlined, ``*``
for p <= 0.05) and the experiment's figure, and prints the table. ``--config.NAME=VALUE``
changes every run.

On several hosts, one worker can be several processes (``--coordinator_address
--num_processes --process_id``, or ``srun`` / ``mpirun`` with none of them): its primary
process takes the runs and the others train each one with it; only the primary writes the
report.
"""

from __future__ import annotations

from absl import flags

from htl_jax.cli import common
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro.protocol import reproduce

flags.DEFINE_string('experiment', None, f'One of {", ".join(experiments_lib.EXPERIMENTS)}.')
flags.DEFINE_integer('seeds', 10, 'Seeds 0..N-1 for every variant (the paper: 10).')
flags.DEFINE_string('workdir', None, 'Run dirs, the SQLite study and the report.')
flags.DEFINE_string('storage', '', 'Optuna RDB URL shared by several machines '
                    '(default: sqlite file in --workdir).')
flags.DEFINE_list('variants', [], 'Only these variants of the experiment.')
flags.DEFINE_string('tuned', '', 'Directory of htl-tune workdirs, one per model.')
common.define_config_flags()
common.define_distributed_flags()
flags.mark_flags_as_required(['experiment', 'config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  config = common.load_config()
  common.join_processes()
  text = reproduce(config, FLAGS.experiment, FLAGS.seeds, FLAGS.workdir, FLAGS.storage,
                   FLAGS.variants, FLAGS.tuned)
  if text:
    print(text)


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()

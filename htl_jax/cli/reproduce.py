"""``htl-reproduce``: a table or figure of the paper by its protocol: tune, then seed.

  htl-reproduce --experiment=table2 --config=kuairand --tune_trials=40 --seeds=10 \
      --workdir=runs/table2

With ``--tune_trials=N`` every model of the experiment is first tuned over the paper's
Table 6 (one Optuna study per model, pruning, resumable; HTLNet's ablations start from
HTLNet's tuned configuration), in ``<workdir>/tune``; then every variant runs ``--seeds``
seeds from its tuned configuration. ``--tuned=DIR`` reads studies run separately (another
experiment's ``<workdir>/tune``, or ``htl-tune`` workdirs); without either, every variant
runs the config's defaults.

Experiments: table1 (data statistics), table2, table3, table4, fig4, table5, table7, fig5,
fig7, fig8 (``htl_jax/repro/experiments.py``). Each run trains in ``<workdir>/<variant>/
seed<k>``; the runs are the trials of an Optuna study in ``<workdir>/optuna.db`` or in
``--storage=postgresql://...``, so the same command started on several machines shares the
work, a finished run is never redone and a killed one resumes. When every run is done the
command writes ``results.csv``, ``table.md`` / ``table.tex`` / ``table.csv`` (mean ± std,
best bold, second italic, ``*`` for p <= 0.05) and the experiment's figure.
``--config.NAME=VALUE`` changes every run.

stdout shows one line per run it starts (runs done of all, what runs, time so far, ETA) and
a last line naming the table and the figure; the library's logs go to
``<workdir>/log.txt`` (``--verbose``: on stderr, and the table printed at the end).

On several hosts, one worker can be several processes (``--coordinator_address
--num_processes --process_id``, or ``srun`` / ``mpirun`` with none of them): its primary
process takes the runs and the others train each one with it; only the primary writes the
report.
"""

from __future__ import annotations

from absl import flags

from htl_jax.cli import common
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro.progress import Progress
from htl_jax.repro.protocol import ReproduceOptions, reproduce

flags.DEFINE_string('experiment', None, f'One of {", ".join(experiments_lib.EXPERIMENTS)}.')
flags.DEFINE_integer('seeds', 10, 'Seeds 0..N-1 for every variant (the paper: 10); 0 with '
                     '--tune_trials only tunes.', lower_bound=0)
flags.DEFINE_string('workdir', None, 'Run dirs, the SQLite study and the report.')
flags.DEFINE_string('storage', '', 'Optuna RDB URL shared by several machines '
                    '(default: sqlite file in --workdir).')
flags.DEFINE_list('variants', [], 'Only these variants of the experiment.')
flags.DEFINE_string('tuned', '', 'Directory of tuning studies: another experiment\'s '
                    '<workdir>/tune, or htl-tune workdirs (one per model).')
flags.DEFINE_integer('tune_trials', 0, 'Finished trials of every model\'s study over Table 6 '
                     'before the seeds run (0: no tuning).', lower_bound=0)
flags.DEFINE_integer('trial_seeds', 3, 'Seeds of every tuning trial; its value is their '
                     'mean and pruning judges the mean.', lower_bound=1)
flags.DEFINE_enum('selection', 'delta_m', ['delta_m', 'core'], 'The model-selection rule of '
                  'every run and study: delta_m (Delta_m of every task\'s validation metrics '
                  'against a DNN reference run) or core (the core task\'s best_metric).')
flags.DEFINE_bool('tune_ablations', False, 'Tune every variant over the subspace it has, '
                  'instead of starting ablations from HTLNet\'s tuned configuration.')
common.define_training_flags('experiment', 'workdir', long_running=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  config = common.start_training(
      FLAGS.workdir, long_running=True,
      studies=experiments_lib.get_experiment(FLAGS.experiment).trains)
  options = ReproduceOptions(
      storage=FLAGS.storage, variants=tuple(FLAGS.variants), tuned_dir=FLAGS.tuned,
      tune_trials=FLAGS.tune_trials, trial_seeds=FLAGS.trial_seeds,
      selection=FLAGS.selection, tune_ablations=FLAGS.tune_ablations,
      progress=Progress.to_stdout() if common.is_primary() else Progress())
  text = reproduce(config, FLAGS.experiment, FLAGS.seeds, FLAGS.workdir, options)
  if text and FLAGS.verbose:
    print(text)


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()

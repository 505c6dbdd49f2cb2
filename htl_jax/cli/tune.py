"""``htl-tune``: tune one model over the paper's Table 6 with Optuna (``htl_jax.repro.tuning``).

  htl-tune --config=kuairand --model=htlnet --trials=50 --workdir=runs/tune/htlnet \\
      [--storage=postgresql://user@host/db]

The study lives in ``<workdir>/optuna.db`` (SQLite) unless ``--storage`` names another
database; start the same command on several machines with one PostgreSQL ``--storage`` and
they share the trials. Rerunning a killed command continues the study. Writes
``<workdir>/best.json`` (the best trial's config overrides and validation metrics, read by
``htl-reproduce --tuned=DIR`` as ``DIR/<model>/best.json``), ``<workdir>/trials.csv`` and one
run dir per trial, ``<workdir>/trials/<number>``. ``--config.NAME=VALUE`` changes the base
config of every trial.

On several hosts, one worker can be several processes (``--coordinator_address
--num_processes --process_id``, or ``srun`` / ``mpirun`` with none of them): its primary
process takes the trials and the others train each one with it.

stdout shows one line per trial it starts (runs done of all, the trial, time so far, ETA)
and a last line with the best trial, its value and configuration, and ``best.json``'s path;
the library's logs go to ``<workdir>/log.txt`` (``--verbose``: on stderr).
"""

from __future__ import annotations

import json
import os

from absl import flags
from absl import logging

from htl_jax.cli import common
from htl_jax.repro import lockstep, reference, tuning
from htl_jax.repro.progress import Progress

flags.DEFINE_string('workdir', None, 'The study\'s directory (trial runs, best.json).')
flags.DEFINE_string('model', '', 'Model to tune ("" = the config\'s model).')
flags.DEFINE_integer('trials', 50, 'Finished (completed or pruned) trials the study reaches.')
flags.DEFINE_integer('trial_seeds', 1, 'Seeds of every trial; its value is their mean and '
                     'pruning judges the mean (htl-reproduce tunes with 3).', lower_bound=1)
flags.DEFINE_string('storage', '', 'Optuna storage URL ("" = sqlite:///<workdir>/optuna.db).')
flags.DEFINE_string('study_name', '', 'Study name ("" = <dataset>-<model>).')
flags.DEFINE_list('params', [], 'Subset of the model\'s Table 6 hyperparameters to search '
                  '(default: all; the others keep the config\'s values).')
flags.DEFINE_integer('pruner_startup_trials', 3,
                     'Completed trials before the median pruner starts pruning.')
flags.DEFINE_integer('random_trials', 0, 'TPE\'s random startup trials (0: a third of '
                     '--trials, 3 to 10).', lower_bound=0)
flags.DEFINE_integer('pruner_warmup_evals', 1,
                     'Evaluations every trial runs before the pruner may stop it.')
common.define_training_flags('workdir', long_running=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  config = common.start_training(FLAGS.workdir, long_running=True, studies=True)
  if FLAGS.model:
    config.model = FLAGS.model
  progress = Progress.to_stdout() if common.is_primary() else Progress()
  progress.add(FLAGS.trials * FLAGS.trial_seeds
               + reference.runs_needed(config, FLAGS.workdir, FLAGS.trial_seeds))
  options = tuning.StudyOptions(
      n_trials=FLAGS.trials, trial_seeds=FLAGS.trial_seeds, study_name=FLAGS.study_name,
      params=tuple(FLAGS.params), random_trials=FLAGS.random_trials,
      pruner_startup_trials=FLAGS.pruner_startup_trials,
      pruner_warmup_evals=FLAGS.pruner_warmup_evals, progress=progress)
  summary = tuning.tune(config, FLAGS.workdir, options, storage=FLAGS.storage)
  if lockstep.is_follower():
    return
  logging.info('study %s: %s trials, %.0f s in this process', summary['study'],
               json.dumps(summary['counts']), summary['wall_seconds'])
  best = summary['best']
  if best is None:
    progress.summary(f'study {summary["study"]}: {json.dumps(summary["counts"])}; no trial '
                     'completed')
    return
  progress.summary(
      f'study {summary["study"]}: best trial {best["trial"]}, valid {best["metric"]} = '
      f'{best["value"]:.6g} with {json.dumps(best["overrides"])}; '
      f'{os.path.join(FLAGS.workdir, "best.json")}')


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()

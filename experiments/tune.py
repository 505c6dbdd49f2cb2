"""Tune one model over the paper's Table 6 with Optuna (``htl_jax.repro.tuning``).

  python -m experiments.tune --config=configs/kuairand.py --model=htlnet --trials=50 \\
      --workdir=runs/tune/htlnet [--storage=postgresql://user@host/db]

The study lives in ``<workdir>/optuna.db`` (SQLite) unless ``--storage`` names another
database; start the same command on several machines with one PostgreSQL ``--storage`` and
they share the trials. Rerunning a killed command continues the study. Writes
``<workdir>/best.json`` (the best trial's config overrides and validation metrics, read by
``experiments.reproduce --tuned=DIR`` as ``DIR/<model>/best.json``), ``<workdir>/trials.csv``
and one run dir per trial, ``<workdir>/trials/<number>``. Exit code 2 with one line on bad
input (config, data, flags).

On several hosts, one worker can be several processes (``--coordinator_address
--num_processes --process_id``, or ``srun`` / ``mpirun`` with none of them, as for
``experiments.main``): its primary process takes the trials and the others train each one
with it.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from experiments import main as main_cli    # --config and --workdir, one-line flag errors
import experiments
from htl_jax.data.schema import DataError
from htl_jax.repro import storage as storage_lib
from htl_jax.repro import lockstep
from htl_jax.repro import tuning
from htl_jax.train import distributed
from htl_jax.train.loop import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string('model', '', 'Model to tune ("" = the config\'s model).')
flags.DEFINE_integer('trials', 50, 'Finished (completed or pruned) trials the study reaches.')
flags.DEFINE_string('storage', '', 'Optuna storage URL ("" = sqlite:///<workdir>/optuna.db).')
flags.DEFINE_string('study_name', '', 'Study name ("" = <dataset>-<model>).')
flags.DEFINE_list('params', [], 'Subset of the model\'s Table 6 hyperparameters to search '
                  '(default: all; the others keep the config\'s values).')
flags.DEFINE_integer('pruner_startup_trials', 5,
                     'Completed trials before the median pruner starts pruning.')
flags.DEFINE_integer('pruner_warmup_evals', 1,
                     'Evaluations every trial runs before the pruner may stop it.')


def main(argv: list[str]) -> None:
  experiments.start(argv)
  config = main_cli.load_config_and_join()
  with distributed.stop_all_on_failure():
    try:
      summary = _tune(config)
    except (DataError, ConfigError) as error:
      print(f'error: {error}', file=sys.stderr)
      distributed.exit_now(2)
  if lockstep.is_follower():
    return
  logging.info('study %s: %s trials, %.0f s in this process', summary['study'],
               json.dumps(summary['counts']), summary['wall_seconds'])
  if summary['best'] is not None:
    best = summary['best']
    logging.info('best trial %d: valid %s = %.6g with %s', best['trial'], best['metric'],
                 best['value'], json.dumps(best['overrides']))


def _tune(config) -> dict:
  if FLAGS.model:
    config.model = FLAGS.model
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise ConfigError(f'--workdir {FLAGS.workdir} is an existing file, not a directory')
  storage = None
  if not lockstep.is_follower():
    os.makedirs(FLAGS.workdir, exist_ok=True)     # the SQLite file goes there
    storage = storage_lib.open_storage(storage_lib.storage_url(FLAGS.workdir, FLAGS.storage))
  return tuning.run_study(config, FLAGS.workdir, storage, n_trials=FLAGS.trials,
                          study_name=FLAGS.study_name, params=FLAGS.params,
                          pruner_startup_trials=FLAGS.pruner_startup_trials,
                          pruner_warmup_evals=FLAGS.pruner_warmup_evals)


if __name__ == '__main__':
  app.run(main, flags_parser=main_cli.parse_flags)

"""Reproduce a table or figure of the paper: seeds, significance, figures, resumable.

  python -m experiments.reproduce --experiment=table2 --config=configs/kuairand.py \\
      --seeds=10 --workdir=runs/table2

Experiments: table1 (data statistics), table2, table3, table4, fig4, table5, table7, fig5,
fig7, fig8 (``htl_jax/repro/experiments.py``). Each run trains in ``<workdir>/<variant>/
seed<k>``; the runs are the trials of an Optuna study in ``<workdir>/optuna.db`` or in
``--storage=postgresql://...``, so the same command started on several machines shares the
work, a finished run is never redone and a killed one resumes. When every run is done the
command writes ``results.csv``, ``table.md`` (mean ± std, best bold, second underlined, ``*``
for p <= 0.05) and the experiment's figure, and prints the table.

On several hosts, one worker can be several processes (``--coordinator_address
--num_processes --process_id``, or ``srun`` / ``mpirun`` with none of them, as for
``experiments.main``): its primary process takes the runs and the others train each one
with it; only the primary writes the report.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

import experiments
from htl_jax.data import load_dataset
from htl_jax.data.schema import DataError
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro import lockstep, report, runner
from htl_jax.train import distributed
from htl_jax.train.loop import ConfigError, NonFiniteError, default_cache_dir

FLAGS = flags.FLAGS
flags.DEFINE_string('experiment', None, f'One of {", ".join(experiments_lib.EXPERIMENTS)}.')
config_flags.DEFINE_config_file('config', None, 'Dataset config (configs/*.py[:args]).',
                                lock_config=False)
flags.DEFINE_integer('seeds', 10, 'Seeds 0..N-1 for every variant (the paper: 10).')
flags.DEFINE_string('workdir', None, 'Run dirs, the SQLite study and the report.')
flags.DEFINE_string('storage', '', 'Optuna RDB URL shared by several machines '
                    '(default: sqlite file in --workdir).')
flags.DEFINE_multi_string('set', [], 'key=value config override for every run.')
flags.DEFINE_list('variants', [], 'Only these variants of the experiment.')
flags.DEFINE_string('tuned', '', 'Directory of experiments.tune workdirs, one per model.')
flags.mark_flags_as_required(['experiment', 'config', 'workdir'])


def reproduce(config, experiment_name: str, seeds: int, workdir: str, storage: str = '',
              variants=(), tuned_dir: str = '') -> str:
  """Runs the experiment and writes its report; returns ``table.md``'s text."""
  experiment = experiments_lib.get_experiment(experiment_name)
  os.makedirs(workdir, exist_ok=True)
  if not experiment.trains:
    if lockstep.is_follower():
      return ''

    data = load_dataset(config, config.cache_dir or default_cache_dir())
    text = report.dataset_table(data, f'{experiment.title} ({runner.dataset_tag(config)})')
    with open(os.path.join(workdir, 'table.md'), 'w') as f:
      f.write(text)
    return text
  chosen = list(experiments_lib.select_variants(experiment, list(variants)))
  results = runner.run_experiment(config, experiment_name, seeds, workdir, storage=storage,
                                  variants=chosen, tuned_dir=tuned_dir)
  if lockstep.is_follower():
    return ''
  text = report.write_report(workdir, results, experiment, chosen)
  if experiment.figure:
    path = report.draw_figure(experiment.figure, workdir, results)
    text += f'\nFigure: {path}\n'
  return text


def main(argv: list[str]) -> None:
  experiments.start(argv)
  try:
    config = FLAGS.config
    from configs import common  # pylint: disable=g-import-not-at-top
    common.apply_args(config, ','.join(FLAGS.set) if FLAGS.set else None)
    distributed.maybe_initialize()        # before anything touches a device
  except (DataError, ConfigError, ValueError, OSError, distributed.StartError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  with distributed.stop_all_on_failure():
    try:
      text = reproduce(config, FLAGS.experiment, FLAGS.seeds, FLAGS.workdir, FLAGS.storage,
                       FLAGS.variants, FLAGS.tuned)
    except (DataError, ConfigError, ValueError, OSError) as error:
      print(f'error: {error}', file=sys.stderr)
      distributed.exit_now(2)
    except NonFiniteError as error:
      print(f'error: {error}', file=sys.stderr)
      distributed.exit_now(3)
  if text:
    print(text)


if __name__ == '__main__':
  app.run(main)

"""Train and evaluate a hybrid-target model: a thin wrapper over ``train_and_evaluate``.

  python -m experiments.main --config=configs/kuairand.py --workdir=runs/kuairand

On several hosts, run the same command on each with ``--coordinator_address=HOST0:PORT
--num_processes=N --process_id=I`` (or under ``srun`` / ``mpirun`` with none of them):
see ``htl_jax.train.distributed`` and the README.

Bad input (a missing file or column, bad labels, an unknown or impossible config value)
stops before training with one line on stderr and exit code 2; a non-finite loss stops with
exit code 3, keeping the last good checkpoint; in a multi-process run, a process that loses
another one stops with one line and exit code 4 (restart all of them to resume).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

import experiments
from htl_jax.data.schema import DataError
from htl_jax.train import distributed
from htl_jax.train.loop import ConfigError, NonFiniteError, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def _one_line(error: BaseException) -> str:
  """The informative line of a flag/config error (config_flags embeds tracebacks)."""
  while error.__cause__ is not None:        # the root cause names the file or key
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if isinstance(error, (KeyError, AttributeError)):
    return f'unknown config key {lines[-1]}; the keys are the fields of configs/base.py'
  if any(line.startswith('Traceback') for line in lines):
    return lines[-1]
  return ' '.join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags; a bad config file argument or ``--config.X`` override is one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, OSError) as error:
    print(f'error: {_one_line(error)}', file=sys.stderr)
    sys.exit(2)


def load_config_and_join():
  """``--config``, then ``jax.distributed`` from the flags, before anything touches a device.

  Either failing is one line on stderr and exit code 2.
  """
  try:
    config = FLAGS.config
    config['model']            # config_flags defers a load failure to the first access
  except (OSError, ValueError) as error:
    print(f'error: cannot load --config: {_one_line(error)}', file=sys.stderr)
    sys.exit(2)
  try:
    distributed.maybe_initialize()
  except (ConfigError, distributed.StartError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  return config


def main(argv: list[str]) -> None:
  experiments.start(argv)
  config = load_config_and_join()
  with distributed.stop_all_on_failure():
    try:
      train_and_evaluate(config, FLAGS.workdir)
    except (DataError, ConfigError) as error:
      print(f'error: {error}', file=sys.stderr)
      distributed.exit_now(2)
    except NonFiniteError as error:
      print(f'error: {error}', file=sys.stderr)
      distributed.exit_now(3)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

"""What every command does: its start, its config flags, and errors as one line.

Each command module (``htl_jax/cli/<command>.py``) defines its own flags at import, calls
:func:`define_config_flags` if it takes a config and :func:`define_distributed_flags` if it
trains, and runs its ``main`` with :func:`run`, which

- parses the flags, turning a built-in config name (``--config=kuairand:smoke=True``) into
  its file, and a bad flag or config into one line (exit code 2);
- prints the resolved config and exits for ``--print_config``;
- sets GPU determinism as ``config.gpu_determinism`` says (:mod:`htl_jax.runtime.determinism`)
  when it loads the config, before anything touches a device;
- turns on JAX's persistent compilation cache (``--compilation_cache``,
  :mod:`htl_jax.runtime.compilation_cache`) before anything compiles; the commands that
  train call :func:`join_processes` (``jax.distributed``, the allocator, SIGTERM / SIGINT
  as a stop request: :mod:`htl_jax.runtime`);
- maps every :class:`htl_jax.errors.HtlError` to ``error: <message>`` on stderr and the
  error's exit code (the table in :mod:`htl_jax.errors`), in a multi-process run without
  waiting for the other processes. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import io
import logging as std_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from htl_jax import configs
from htl_jax.errors import ConfigError, HtlError, first_line
from htl_jax.runtime import (allocator, compilation_cache, determinism, distributed,
                             orbax_noise, preemption)

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'compilation_cache', None,
    'Directory of the persistent compilation cache (shared by processes and machines), '
    f"'none' to turn it off; default ${compilation_cache.ENV} or "
    '~/.cache/htl_jax/xla.')


def define_config_flags() -> None:
  """``--config`` (a built-in name or a file, ``:ARGS`` after it), ``--config.NAME=VALUE``
  overrides, and ``--print_config``."""
  config_flags.DEFINE_config_file(
      'config', None,
      f'A built-in config ({", ".join(configs.BUILTIN)}) or a config file, optionally '
      'followed by :KEY=VALUE,... (e.g. kuairand:model=mmoe,smoke=True). Any field can be '
      'set with --config.NAME=VALUE; --print_config lists them.', lock_config=True)
  flags.DEFINE_bool('print_config', False,
                    'Print the resolved config (every field and its value) and exit.')


def require(*names: str) -> None:
  """``--config`` and ``names`` are required, except that ``--print_config`` needs only
  ``--config``."""
  flags.mark_flag_as_required('config')
  flags.register_multi_flags_validator(
      [*names, 'print_config'], lambda values: values['print_config'] or all(
          values[name] not in (None, '') for name in names),
      message=f'flag(s) {", ".join("--" + n for n in names)} must be given (--print_config '
              'needs --config alone)')


def define_distributed_flags() -> None:
  """The flags of a multi-process run (:mod:`htl_jax.runtime.distributed`)."""
  flags.DEFINE_string(
      'coordinator_address', None,
      'host:port of process 0 for jax.distributed (e.g. 10.0.0.1:1234). Leave unset on one '
      'machine, or under SLURM / Open MPI / Kubernetes to let JAX detect it.')
  flags.DEFINE_integer(
      'num_processes', None, 'Number of processes of a multi-process run; 1 forces a '
      'single plain process even on a cluster.', lower_bound=1)
  flags.DEFINE_integer(
      'process_id', None, "This process's id, 0 .. num_processes - 1 (0 is the primary).",
      lower_bound=0)
  flags.DEFINE_integer(
      'heartbeat_timeout', 100, 'Seconds without heartbeats after which a process counts '
      'as dead and every other process stops.', lower_bound=1)
  flags.DEFINE_integer('initialization_timeout', 300,
                       'Seconds to wait for every process to join.', lower_bound=1)


def define_training_flags(*required: str, long_running: bool = False) -> None:
  """The flags of a command that trains: ``--config``, the distributed ones, ``--verbose``
  for the long-running ones (htl-reproduce, htl-tune), and ``required`` marked required."""
  define_config_flags()
  define_distributed_flags()
  if long_running:
    _define_verbose_flag()
  require(*required)


def start_training(workdir: str, long_running: bool = False, studies: bool = False) -> Any:
  """A training command's start: the config, ``jax.distributed`` and the process set-up
  (:func:`join_processes`); for the long-running ones the logs go to the workdir
  (:func:`log_to_workdir`) and, where a study runs, Optuna's with them."""
  config = load_config()
  join_processes()
  if long_running:
    log_to_workdir(workdir)
  if studies:
    optuna_logs_with_ours()
  return config


def _define_verbose_flag() -> None:
  flags.DEFINE_bool('verbose', False, 'Library logs on stderr, with the training progress '
                    'bars (default: into <workdir>/log.txt; the progress lines and the '
                    'summary stay on stdout).')


class _LogOnceClaimed(io.TextIOBase):
  """A text stream that holds what is written until the command has claimed its workdir
  (:func:`htl_jax.run_files.claimed`), then appends it all to ``path`` there: a
  command refused at its checks writes nothing into a workdir that is not its own."""

  def __init__(self, workdir: str, path: str):
    self.workdir, self.path = workdir, path
    self.held: list[str] = []
    self.file = None

  def write(self, text: str) -> int:
    from htl_jax import run_files  # pylint: disable=g-import-not-at-top
    if self.file is None and run_files.claimed(self.workdir):
      self.file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
      self.file.write(''.join(self.held))
      self.held.clear()
      print(f'logs: {self.path}', flush=True)
    if self.file is None:
      self.held.append(text)
    else:
      self.file.write(text)
    return len(text)

  def flush(self) -> None:
    if self.file is not None:
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None
    super().close()


def log_to_workdir(workdir: str) -> None:
  """Unless ``--verbose``: the primary process's library log lines go to
  ``<workdir>/log.txt`` once the command has claimed the workdir, and no training run draws
  a progress bar, so stdout shows only the command's own progress lines. Errors still come
  as one line on stderr. The other processes of a multi-process worker (on other hosts,
  never claiming the workdir) keep their logs on stderr, their scheduler's log."""
  if FLAGS.verbose:
    return
  from htl_jax.train import writers  # pylint: disable=g-import-not-at-top
  writers.PROGRESS_BAR = False
  if is_primary():
    logging.get_absl_handler().python_handler.setStream(
        _LogOnceClaimed(workdir, os.path.join(workdir, 'log.txt')))


def optuna_logs_with_ours() -> None:
  """Optuna's log lines join the library's (the log file unless ``--verbose``) instead of
  its own stderr handler. Call it only where a study runs: it imports Optuna."""
  if FLAGS.verbose:
    return
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.disable_default_handler()
  optuna.logging.enable_propagation()


def is_primary() -> bool:
  """Process 0 of the run (the one that talks to the user), after :func:`join_processes`."""
  import jax  # pylint: disable=g-import-not-at-top
  return not distributed.is_multiprocess() or jax.process_index() == 0


def join_processes() -> None:
  """Starts ``jax.distributed`` from the flags (before anything touches a device), then
  tunes the host allocator for XLA:CPU's step scratch where the backend is the CPU, and
  turns SIGTERM / SIGINT into a stop request (one process; with several, JAX's preemption
  service has SIGTERM)."""
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         heartbeat_timeout=FLAGS.heartbeat_timeout,
                         initialization_timeout=FLAGS.initialization_timeout)
  allocator.tune_for_cpu()
  preemption.install()


def _one_line(error: BaseException) -> str:
  """The informative line of a flag / config error (config_flags embeds tracebacks)."""
  while error.__cause__ is not None:        # the root cause names the file or key
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if isinstance(error, (KeyError, AttributeError)):
    return (f'unknown config key {lines[-1]}; the keys are the fields of '
            'htl_jax/configs/base.py (--print_config lists them)')
  if any(line.startswith('Traceback') for line in lines):
    return lines[-1]
  return ' '.join(lines)


def _resolve_config_names(argv: list[str]) -> list[str]:
  """``--config=NAME[:ARGS]`` of a built-in config -> ``--config=PATH[:ARGS]``."""
  out = []
  for arg in argv:
    if arg.startswith('--config='):
      arg = '--config=' + configs.resolve(arg[len('--config='):])
    out.append(arg)
  return out


def fail(message: str, code: int = 2) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _config_path(argv: list[str]) -> str:
  """The file of ``--config`` in ``argv`` ('' without one)."""
  for arg in argv:
    if arg.startswith('--config='):
      return os.path.realpath(arg[len('--config='):].partition(':')[0])
  return ''


def _config_code_error(error: BaseException, argv: list[str]) -> str:
  """One line when ``error`` came from running the config file itself (a syntax error, or
  anything its ``get_config`` raised), else ''. A config file is code: its errors are
  the user's to fix, with the file and line named."""
  path = _config_path(argv)
  if not path:
    return ''
  if isinstance(error, SyntaxError) and error.filename:
    if os.path.realpath(error.filename) == path:
      return f'cannot load --config {path}: line {error.lineno}: {error.msg}'
    return ''
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.realpath(f.filename) == path]
  if not frames:
    return ''
  return (f'cannot load --config {path}: line {frames[-1].lineno}: '
          f'{type(error).__name__}: {first_line(error)}')


def _raised_in_config_flags(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return any(os.sep + 'config_flags' + os.sep in f.filename for f in frames)


_HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull')


def _print_help(full: bool) -> NoReturn:
  """The command's docstring and flags as plain text on stdout; exit 0."""
  doc = sys.modules['__main__'].__doc__ or ''
  flags_text = FLAGS.get_help() if full else FLAGS.module_help(sys.argv[0])
  if not full:                     # absl heads it with the script's path
    flags_text = flags_text.lstrip('\n').split('\n', 1)[-1]
  print(re.sub(r'``([^`]+)``', r'\1', doc).strip() + '\n\nflags:\n' + flags_text)
  sys.exit(0)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad flag, config file or ``--config.X`` is one line, exit 2;
  ``--help`` is plain text on stdout, exit 0."""
  asked = [a for a in argv[1:] if a in _HELP]
  if asked:
    _print_help(full='--helpfull' in asked)
  argv = _resolve_config_names(argv)
  try:
    return FLAGS(argv)
  except ConfigError as error:
    fail(str(error))
  except (flags.Error, OSError) as error:       # config_flags wraps what a flag did wrong
    fail(_one_line(error))
  except (KeyError, AttributeError) as error:   # config_flags' lookup of a --config.X field
    if not _raised_in_config_flags(error):
      raise
    fail(_one_line(error))
  except Exception as error:  # pylint: disable=broad-except
    message = _config_code_error(error, argv)
    if not message:
      raise                                     # a bug of ours: its traceback stays
    fail(message)


def load_config() -> Any:
  """``--config`` resolved; with ``--print_config`` printed, and the process ends."""
  try:
    config = FLAGS.config
    config['model']            # config_flags defers a load failure to the first access
  except OSError as error:             # config_flags defers a missing file's error to here
    cause = [line.strip() for line in str(error).splitlines() if line.strip()][-1:]
    fail(f'cannot load --config: {cause[0] if cause else type(error).__name__}')
  except (KeyError, AttributeError) as error:      # a file whose config lacks the fields
    fail(f'cannot load --config: {_one_line(error)}')
  if FLAGS.print_config:
    print(config)
    sys.exit(0)
  # Before anything touches a device: XLA reads its flags when the backend starts.
  determinism.set_gpu_determinism(bool(config.gpu_determinism))
  return config


def start(argv: list[str]) -> None:
  """No stray arguments; INFO logging without orbax's line per checkpoint save."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.INFO)
    # JAX probing for backends it does not find ("Unable to initialize backend 'tpu'").
    std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)


def report(error: HtlError) -> NoReturn:
  """One line on stderr and the error's exit code (multi-process: at once)."""
  print(f'error: {error}', file=sys.stderr)
  distributed.exit_now(error.exit_code)


def _help_is_the_commands(main: Callable[[list[str]], None]) -> None:
  """``--help`` shows the command's docstring and flags, whatever runs it (a console
  script, ``python -m``, the checkout's ``experiments/`` shims)."""
  command = sys.modules[main.__module__]
  sys.modules['__main__'].__doc__ = command.__doc__
  for module in (command.__name__, __name__):
    for flag in FLAGS.get_key_flags_for_module(module):
      FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`; every HtlError is one line and its code."""
  _help_is_the_commands(main)

  def guarded(argv: list[str]) -> None:
    start(argv)
    preemption.exit_cleanly_on_sigterm()      # training commands replace it (join_processes)
    orbax_noise.install()
    compilation_cache.enable(FLAGS.compilation_cache)
    with distributed.stop_all_on_failure():
      try:
        main(argv)
      except HtlError as error:
        report(error)

  app.run(guarded, flags_parser=parse_flags)

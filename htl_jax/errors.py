"""The errors a user can meet, each with the exit code its command ends with.

Every error here is reported by the command-line entry points (:mod:`htl_jax.cli`) as ONE
line on stderr, ``error: <message>``, and ends the process with the class's ``exit_code``;
the message names what is wrong (the file, column, config key, workdir). Anything else is a
bug and keeps its traceback. This module imports nothing of ``htl_jax``, so every layer can
raise these.

| exit code | meaning |
|---|---|
| 2 | bad input: config, data, flags, a workdir that holds no finished run or is in use or a |
|   | run of another config, a storage that cannot be used |
| 3 | the loss or a gradient became NaN / inf (the last good checkpoint is kept) |
| 4 | another process of a multi-process run was lost (restart all of them to resume) |
| 75 | stopped by SIGTERM / SIGINT after saving a checkpoint (run the same command again) |
"""

from __future__ import annotations


class HtlError(Exception):
  """Base of the errors a command reports as one line (module docstring)."""

  exit_code = 1


class ConfigError(HtlError, ValueError):
  """A config value, flag or combination of them that cannot work."""

  exit_code = 2


class DataError(HtlError, ValueError):
  """Bad input data or data config; the message names the file, column and row count.

  Raised before anything reaches JAX and without touching an existing workdir.
  """

  exit_code = 2


class RunError(HtlError, ValueError):
  """A workdir that cannot be used as asked: it holds no finished run, or no readable
  checkpoint, or it is not a directory."""

  exit_code = 2


class StorageError(HtlError, RuntimeError):
  """The Optuna storage cannot be opened or used (down, a refused password, a missing
  driver); the message names the storage with its password masked."""

  exit_code = 2


class WorkdirBusyError(HtlError, RuntimeError):
  """Another live process holds the workdir (one owner per workdir, docs/design.md)."""

  exit_code = 2


class StartError(HtlError, RuntimeError):
  """``jax.distributed`` did not start (a process did not join in time, a bad address)."""

  exit_code = 2


class NonFiniteError(HtlError, FloatingPointError):
  """The loss or gradient became NaN/inf; training stopped, the last good checkpoint kept."""

  exit_code = 3


class PeerLostError(HtlError, RuntimeError):
  """A process of a multi-process run lost contact with another one."""

  exit_code = 4


class PreemptedError(HtlError):
  """SIGTERM or SIGINT arrived; the run saved a checkpoint and stopped.

  Running the same command again resumes it (``EX_TEMPFAIL``, 75: try again later).
  """

  exit_code = 75


def exit_code(error: BaseException) -> int | None:
  """The exit code of an :class:`HtlError`, None for anything else (a bug)."""
  return error.exit_code if isinstance(error, HtlError) else None


def first_line(error: BaseException) -> str:
  """The first line of an error's message, for a one-line report (polars' and orbax's
  messages run to several lines); the error's type name when the message is empty."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__

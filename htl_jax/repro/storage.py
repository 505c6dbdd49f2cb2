"""Where Optuna studies live: one convention for reproduction and tuning (DESIGN section 10).

By default a SQLite file ``<workdir>/optuna.db``; ``--storage=postgresql://...`` lets the
same command, started on several machines, share one study. Every storage is an
``RDBStorage`` with a heartbeat: a trial whose process died (SIGKILL, a lost machine) is
marked FAIL once its heartbeat is older than the grace period, and retried (the retry is a new
WAITING trial with the same parameters). The heartbeat interval is 60 s, or
``$HTL_JAX_HEARTBEAT_SECONDS`` (tests use 1 s).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Iterator

import optuna
import sqlalchemy.exc

HEARTBEAT_ENV = 'HTL_JAX_HEARTBEAT_SECONDS'
MAX_RETRY = 3


def storage_url(workdir: str, storage: str = '') -> str:
  """``storage`` if given, else the SQLite file ``<workdir>/optuna.db`` (absolute path)."""
  if storage:
    return storage
  return 'sqlite:///' + os.path.join(os.path.abspath(workdir), 'optuna.db')


def heartbeat_seconds() -> int:
  return int(os.environ.get(HEARTBEAT_ENV, '60'))


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
  """Optuna marks heartbeats and retries experimental; that warning is not the user's."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    yield


def open_storage(url: str) -> optuna.storages.RDBStorage:
  """An RDB storage with heartbeat and retry of dead trials, for ``url``.

  SQLite gets a 60 s busy timeout so several processes can share one file; the creation of
  the schema is retried, as two processes may race to create it.
  """
  engine_kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
  interval = heartbeat_seconds()
  last_error: Exception | None = None
  for _ in range(10):
    try:
      with quiet_experimental():
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
            grace_period=2 * interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRY))
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
      last_error = error
      time.sleep(0.5)
  raise RuntimeError(f'cannot open the Optuna storage {url}: {last_error}')

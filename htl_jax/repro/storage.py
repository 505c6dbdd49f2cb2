"""Where Optuna studies live: one convention for reproduction and tuning (docs/design.md).

By default a SQLite file ``<workdir>/optuna.db``; ``--storage=postgresql://...`` lets the
same command, started on several machines, share one study. Every storage is an
``RDBStorage`` with a heartbeat: a trial whose process died (SIGKILL, a lost machine) is
marked FAIL once its heartbeat is older than the grace period, and retried (the retry is a new
WAITING trial with the same parameters). The heartbeat interval is 60 s, or
``$HTL_JAX_HEARTBEAT_SECONDS`` (tests use 1 s). :func:`fail_stale_trials` also catches the
trials of processes killed before their first heartbeat.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
import warnings
from typing import Iterator

import optuna
from optuna.trial import TrialState
import sqlalchemy.engine
import sqlalchemy.exc

from htl_jax.errors import StorageError, first_line

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


def masked(url: str) -> str:
  """``url`` with its password replaced by ``***`` (for messages and logs)."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except (sqlalchemy.exc.ArgumentError, ValueError):
    return re.sub(r'(://[^:/@]*:)[^@]*@', r'\1***@', url)


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
  """Turns what the storage raises (the server down or gone, a refused password, a missing
  driver) into ONE :class:`htl_jax.errors.StorageError` naming the masked URL."""
  try:
    yield
  except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
    detail = first_line(getattr(error, 'orig', None) or error)
    if url and '://' in url:
      detail = detail.replace(url, masked(url))
    raise StorageError(f'storage {masked(url)}: {detail[:300]}') from None


def open_storage(url: str) -> optuna.storages.RDBStorage:
  """An RDB storage with heartbeat and retry of dead trials, for ``url``.

  SQLite gets a 60 s busy timeout so several processes can share one file; the creation of
  the schema is retried, as two processes may race to create it.

  Raises:
    StorageError: the storage cannot be opened (one line, the password masked).
  """
  engine_kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
  interval = heartbeat_seconds()
  last_error: Exception | None = None
  with storage_errors(url):
    for _ in range(10):
      try:
        with quiet_experimental():
          return optuna.storages.RDBStorage(
              url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
              grace_period=2 * interval,
              heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                  max_retry=MAX_RETRY))
      except sqlalchemy.exc.IntegrityError as error:     # two processes created the schema
        last_error = error
        time.sleep(0.5)
      except sqlalchemy.exc.OperationalError as error:
        if 'locked' not in str(error):                 # only a busy SQLite file is retried
          raise
        last_error = error
        time.sleep(0.5)
    raise last_error


def retry_now(study: optuna.Study, number: int) -> None:
  """Trial ``number`` (FAIL) is retried at once: a WAITING copy with its parameters and
  attributes, as for a dead process's trial, without waiting for its heartbeat to go stale
  (a preempted process marks its trial so). Preemptions do not count against MAX_RETRY."""
  frozen = study.get_trials(deepcopy=False)[number]
  if frozen.state == TrialState.FAIL:
    with quiet_experimental():
      optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(study, frozen)


# (study id, trial id) of the RUNNING trials this process has given one heartbeat.
_HEARTBEAT_GIVEN: set[tuple[int, int]] = set()


def fail_stale_trials(study: optuna.Study) -> None:
  """Marks the trials of dead processes FAIL (and retries them), as Optuna does, and more.

  Optuna fails a RUNNING trial whose last heartbeat is older than the grace period, but not
  one that has no heartbeat at all: a process killed after taking a waiting trial and before
  its heartbeat thread's first record (seen on a loaded machine) leaves a trial that would
  stay RUNNING forever, and every other process would wait for it. So each RUNNING trial
  older than the grace period gets ONE heartbeat from this process: a live trial's own
  heartbeats go on regardless, and a dead one goes stale one grace period later.
  """
  storage = study._storage  # pylint: disable=protected-access
  interval = getattr(storage, 'get_heartbeat_interval', lambda: None)()
  if interval is None:
    return
  with quiet_experimental():
    optuna.storages.fail_stale_trials(study)
  grace = datetime.timedelta(seconds=2 * interval)
  now = datetime.datetime.now()
  for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    key = (study._study_id, trial._trial_id)  # pylint: disable=protected-access
    if key in _HEARTBEAT_GIVEN or trial.datetime_start is None:
      continue
    if now - trial.datetime_start > grace:
      storage.record_heartbeat(trial._trial_id)  # pylint: disable=protected-access
      _HEARTBEAT_GIVEN.add(key)

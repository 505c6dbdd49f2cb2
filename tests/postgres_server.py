"""A real PostgreSQL server on 127.0.0.1 for storage tests (skips where none is installed).

``.ci/run`` installs Debian's ``postgresql`` package when it can; the fixture finds
``initdb`` and ``pg_ctl`` under ``/usr/lib/postgresql/*/bin``, creates a cluster in a
temporary directory owned by the ``postgres`` system user (``initdb`` refuses to run as
root), starts it on a free port with trust authentication, and stops it afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _binaries() -> tuple[str, str] | None:
  for folder in sorted(glob.glob('/usr/lib/postgresql/*/bin'), reverse=True):
    initdb, pg_ctl = os.path.join(folder, 'initdb'), os.path.join(folder, 'pg_ctl')
    if os.path.exists(initdb) and os.path.exists(pg_ctl):
      return initdb, pg_ctl
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def postgres_url():
  """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a fresh server (the docs' form)."""
  binaries = _binaries()
  if binaries is None:
    pytest.skip('no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb); '
                '`apt-get install postgresql` provides them')
  initdb, pg_ctl = binaries
  as_postgres: list[str] = []
  if os.geteuid() == 0:
    if shutil.which('runuser') is None:
      pytest.skip('running as root without runuser: cannot start PostgreSQL as postgres')
    as_postgres = ['runuser', '-u', 'postgres', '--']
  root = tempfile.mkdtemp(prefix='htl_pg_')
  data = os.path.join(root, 'data')
  if as_postgres:
    shutil.chown(root, 'postgres')
    os.chmod(root, 0o700)
  port = _free_port()
  run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True,
                                    text=True, timeout=120)
  try:
    run(initdb, '-D', data, '-U', 'postgres', '--auth=trust')
    run(pg_ctl, '-D', data, '-l', os.path.join(root, 'log'), '-w', '-t', '60', '-o',
        f'-p {port} -k {root} -h 127.0.0.1', 'start')
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
    shutil.rmtree(root, ignore_errors=True)
    pytest.skip(f'could not start PostgreSQL: {getattr(error, "stderr", error)}')
  try:
    yield f'postgresql://postgres@127.0.0.1:{port}/postgres'
  finally:
    subprocess.run([*as_postgres, pg_ctl, '-D', data, '-m', 'immediate', 'stop'],
                   capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)

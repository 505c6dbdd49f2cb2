"""The persistent compilation cache (htl_jax.runtime.compilation_cache): atomic entries.

A process killed mid-write, or a reader racing a writer, must never leave an entry that every
later run warns about: entries are written under a temporary name and renamed, and an entry
that does not read is removed on read and written whole by the next compile. Real processes,
real files.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

from conftest import REPO

_PROGRAM = textwrap.dedent('''
    import jax, jax.numpy as jnp
    from htl_jax.runtime import compilation_cache
    path = compilation_cache.enable({directory!r})
    print('CACHE', path)
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 3.0)
    print('VALUE', float(f(jnp.ones((8, 8))).sum()))
''')


def _run(directory: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('HTL_JAX_COMPILATION_CACHE', None)
  done = subprocess.run([sys.executable, '-c', _PROGRAM.format(directory=directory)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _entries(directory: str) -> list[str]:
  return sorted(p for p in glob.glob(os.path.join(directory, '*', '*-cache*'))
                if not os.path.basename(p).startswith('.'))


def test_a_truncated_entry_is_removed_once_and_written_whole_again(tmp_path):
  directory = str(tmp_path / 'xla')
  first = _run(directory)
  entries = _entries(directory)
  assert entries, first.stdout
  sizes = {p: os.path.getsize(p) for p in entries}
  for path in entries:                       # a process killed mid-write left half of each
    with open(path, 'r+b') as f:
      f.truncate(sizes[path] // 2)
  second = _run(directory)
  assert 'does not read (truncated); removed' in second.stderr
  assert 'Error reading persistent compilation cache entry' not in second.stderr
  assert {p: os.path.getsize(p) for p in _entries(directory)} == sizes    # whole again
  third = _run(directory)
  assert 'does not read' not in third.stderr and 'Error reading' not in third.stderr
  assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1] == \
      third.stdout.splitlines()[-1]
  assert not glob.glob(os.path.join(directory, '*', '.*.tmp-*'))       # no temporary left

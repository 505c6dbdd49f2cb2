"""JAX's persistent compilation cache: each program shape compiles once, across processes.

A researcher's table is tens to hundreds of short runs, and on a few CPU cores most of a
short run is compiling. With the cache on, a program compiled by one run (in any process
that shares the directory) is loaded from disk by every later one. Every command turns it
on (:func:`enable`, ``--compilation_cache``); library users may call :func:`enable` too.

The directory is ``$HTL_JAX_COMPILATION_CACHE``, else ``~/.cache/htl_jax/xla``, with one
subdirectory per machine kind (the processor's model and instruction-set flags, and the jax
version): XLA:CPU code compiled for one processor may not run on another, and machines of
a study that share a home directory then share what they can. JAX writes each entry under
a temporary name and renames it, so processes and machines may share the directory.
Programs are cached whatever their compile time (JAX's default skips those under 1 s,
which on CPU are most of ours).
"""

from __future__ import annotations

import hashlib
import os
import platform

from absl import logging
import jax

ENV = 'HTL_JAX_COMPILATION_CACHE'


def default_dir() -> str:
  """``$HTL_JAX_COMPILATION_CACHE``, else ``~/.cache/htl_jax/xla``."""
  return os.environ.get(ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'htl_jax',
                                             'xla')


def machine_tag() -> str:
  """The processor kind and jax version, as a directory name."""
  identity = [platform.machine(), jax.__version__]
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('model name', 'flags', 'Features')):
          identity.append(line.split(':', 1)[1].strip())
        if len(identity) >= 4:
          break
  except OSError:
    identity.append(platform.processor())
  digest = hashlib.sha256('|'.join(identity).encode()).hexdigest()[:12]
  return f'{platform.machine()}-jax{jax.__version__}-{digest}'


def enable(directory: str | None = None) -> str:
  """Turns the persistent cache on in ``directory`` (default :func:`default_dir`).

  ``''`` or ``'none'`` leaves it off. Call it before the first compilation.

  Returns:
    The directory the cache uses ('' when off).
  """
  directory = default_dir() if directory is None else directory
  if directory in ('', 'none'):
    return ''
  path = os.path.join(os.path.expanduser(directory), machine_tag())
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:      # a read-only home: compile as before
    logging.warning('compilation cache off: cannot create %s (%s)', path, error)
    return ''
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path

"""JAX's persistent compilation cache: each program shape compiles once, across processes.

A researcher's table is tens to hundreds of short runs, and on a few CPU cores most of a
short run is compiling. With the cache on, a program compiled by one run (in any process
that shares the directory) is loaded from disk by every later one. Every command turns it
on (:func:`enable`, ``--compilation_cache``); library users may call :func:`enable` too.

The directory is ``$HTL_JAX_COMPILATION_CACHE``, else ``~/.cache/htl_jax/xla``, with one
subdirectory per machine kind (the processor's model and instruction-set flags, and the jax
version): XLA:CPU code compiled for one processor may not run on another, and machines of
a study that share a home directory then share what they can. Programs are cached whatever
their compile time (JAX's default skips those under 1 s, which on CPU are most of ours).

**Entries are written atomically.** JAX's own file cache (``jax._src.lru_cache.LRUCache``,
jax 0.5 to 0.10) writes an entry in place and never rewrites an existing one, so a process
killed mid-write leaves a truncated entry that every later run warns about and recompiles,
and a process reading while another writes can see half an entry. :func:`enable` installs
:class:`AtomicFileCache` in its place: it writes each entry under a temporary name and
renames it (readers see all of an entry or none), and an entry that does not decompress is
removed on read, so the next compile writes it whole and the warning never repeats. This
uses JAX's private cache module; where it is missing (another jax version) JAX's own cache
is used as it is, and the log says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform

from absl import logging
import jax

from htl_jax import run_files

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


def _atomic_cache_class():
  """:class:`AtomicFileCache` over this jax's ``LRUCache`` (None where jax has none)."""
  try:
    from jax._src import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
    from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None

  class AtomicFileCache(lru_cache.LRUCache):
    """JAX's file cache, with atomic writes and unreadable entries removed (module doc)."""

    def get(self, key: str):
      value = super().get(key)
      if value is None:
        return None
      try:
        jax_cache.decompress_executable(value)
      except Exception:  # pylint: disable=broad-except   # any damage of the stored bytes
        logging.warning('compilation cache: entry %s does not read (truncated); removed, '
                        'the program is compiled again', key)
        with contextlib.suppress(OSError):
          os.remove(self.path / f'{key}{lru_cache._CACHE_SUFFIX}')  # pylint: disable=protected-access
        return None
      return value

    def put(self, key: str, value: bytes) -> None:
      if self.eviction_enabled:          # size-bounded caches keep JAX's own locking
        super().put(key, value)
        return
      path = self.path / f'{key}{lru_cache._CACHE_SUFFIX}'  # pylint: disable=protected-access
      if path.exists():
        return
      run_files.write_bytes(str(path), value)

  return AtomicFileCache, jax_cache


def _install_atomic_cache() -> bool:
  """Makes JAX build :class:`AtomicFileCache` for its persistent cache; False where this
  jax has no such hook (its own cache is used then)."""
  cache_class, jax_cache = _atomic_cache_class()
  if cache_class is None or not hasattr(jax_cache, 'get_file_cache'):
    logging.info('compilation cache: this jax has no file-cache hook; entries are written '
                 'by JAX itself')
    return False

  def get_file_cache(path: str):
    max_size = jax.config.jax_compilation_cache_max_size
    return cache_class(path, max_size=max_size), path

  jax_cache.get_file_cache = get_file_cache
  return True


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
  _install_atomic_cache()
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path

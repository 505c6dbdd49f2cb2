"""Host allocator tuning for XLA:CPU: keep each step's scratch memory instead of unmapping it.

XLA:CPU allocates one scratch block per executed step (all temporaries of the compiled
program; ``compiled.memory_analysis().temp_size_in_bytes``). glibc's ``malloc`` serves blocks
above ``M_MMAP_THRESHOLD`` (at most 32 MiB by default) with a fresh ``mmap`` and unmaps them on
``free``, so EVERY step page-faults its whole scratch block in again: HTLNet with the
gradient process at batch 2048 has more scratch than the threshold, and its page faults
were a large part of a step (docs/benchmarks.md has the numbers). Raising the mmap and trim
thresholds lets the block come from the heap and stay there, so later steps reuse it.

This is a process-wide setting, so nothing applies it on import and no library function
calls it: the commands that train (:func:`htl_jax.cli.common.join_processes`) and
``tools/bench.py`` call :func:`tune_for_cpu`, which applies it when the default backend is
the CPU (a GPU's scratch lives in device memory under XLA's own allocator, so there the host
heap keeps glibc's defaults). Programs that run the steps with
their own loop on CPU can call it too (or preload tcmalloc/jemalloc, which reuse freed
memory by default). The cost: up to 1 GiB of freed memory may stay with the process instead
of going back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import jax

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_scratch_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
  """Raise glibc's mmap and trim thresholds (bytes) so freed step scratch is reused.

  Args:
    mmap_threshold: blocks at least this large are still served by ``mmap``.
    trim_threshold: free memory at the top of the heap kept before returning it to the OS.

  Returns:
    True when both settings were applied; False on platforms without glibc's ``mallopt``
    (macOS, musl), where nothing is changed.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  limit = (1 << 31) - 1
  ok_mmap = mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold), limit))
  ok_trim = mallopt(_M_TRIM_THRESHOLD, min(int(trim_threshold), limit))
  return bool(ok_mmap and ok_trim)


def tune_for_cpu() -> bool:
  """:func:`keep_scratch_memory` when JAX's default backend is the CPU (it starts the
  backend: call it after ``jax.distributed`` is up). True when applied."""
  return jax.default_backend() == 'cpu' and keep_scratch_memory()

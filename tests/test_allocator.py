"""``keep_scratch_memory``: a freed large block is reused instead of page-faulted in again.

Each case runs in a fresh interpreter (the setting is process-wide): it allocates, touches
and frees a 48 MiB block (like XLA's per-step scratch) ten times and counts minor page
faults after the first round. Without the setting glibc maps and unmaps the block every
time (~12k faults a round); with it the block stays in the heap.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

# Plain malloc/memset/free through ctypes, as XLA allocates (numpy would madvise huge pages).
_CHILD = """
import ctypes, resource, sys
sys.path.insert(0, {repo!r})
from htl_jax.runtime.allocator import keep_scratch_memory
tuned = keep_scratch_memory() if {tune} else False
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 48 << 20

def one_round():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)

one_round()                                        # first round: faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  one_round()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tune: bool) -> tuple[bool, int]:
  out = subprocess.run([sys.executable, '-c', _CHILD.format(repo=REPO, tune=tune)],
                       check=True, capture_output=True, text=True).stdout.split()
  return out[0] == 'True', int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt only')
def test_freed_scratch_block_is_reused():
  tuned, faults_tuned = _faults(True)
  _, faults_default = _faults(False)
  assert tuned
  assert faults_default > 10 * 10_000          # ~12k faults for each 48 MiB round
  assert faults_tuned < 1_000

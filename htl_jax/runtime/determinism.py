"""Bit-for-bit GPU runs: deterministic reductions and full float32 matmul precision.

A run promises equality: the same config gives the same run, and so do 1 and N devices (to
rounding) and a resumed run (DESIGN section 8). On a GPU two things break it unless XLA is
told otherwise:

- scatter-adds (the embedding table's gradient sums by id) and some reductions use atomics,
  whose order changes from run to run: ``--xla_gpu_deterministic_ops=true`` in ``XLA_FLAGS``
  makes XLA pick deterministic kernels (read once, when the backend starts);
- float32 matmuls run as TF32 (a 10-bit mantissa) on NVIDIA GPUs since Ampere:
  ``jax_default_matmul_precision='highest'`` keeps them float32.

:func:`set_gpu_determinism` sets both; ``config.gpu_determinism`` (default True; False is the
switch for speed) decides it at the start of every command (``htl_jax.cli.common``), before
anything touches a device. Library users call it themselves, before their first device use.
On CPU both are no-ops (tested: a run's metrics are identical with and without them), so
they are set whatever the backend will be, without starting one to find out; what is in
effect is logged by a run on a GPU only (:func:`describe`), and at ``--verbosity=1`` here.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from absl import logging
import jax

FLAG = '--xla_gpu_deterministic_ops'
PRECISION = 'highest'


def _xla_flags() -> list[str]:
  return shlex.split(os.environ.get('XLA_FLAGS', ''))


def _backend_started() -> bool:
  """True once JAX has started a backend (XLA_FLAGS are read then, and never again)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):       # a JAX without it: assume not yet
    return False


def status() -> dict[str, Any]:
  """What is in effect: ``{'deterministic_ops': bool, 'matmul_precision': str or None}``.

  ``deterministic_ops`` is the last setting of :data:`FLAG` in ``XLA_FLAGS`` (a bare flag is
  true); ``matmul_precision`` is ``jax_default_matmul_precision`` (None: the backend's
  default, TF32 on recent NVIDIA GPUs).
  """
  deterministic = False
  for flag in _xla_flags():
    name, _, value = flag.partition('=')
    if name == FLAG:
      deterministic = value.lower() in ('', 'true', '1')
  return {'deterministic_ops': deterministic,
          'matmul_precision': jax.config.jax_default_matmul_precision}


def set_gpu_determinism(enabled: bool = True) -> bool:
  """Deterministic GPU kernels and float32 matmuls (``enabled``), or leave both alone.

  Args:
    enabled: True sets ``--xla_gpu_deterministic_ops=true`` in ``XLA_FLAGS`` (replacing any
      setting of that flag there) and ``jax_default_matmul_precision='highest'``. False
      changes nothing: XLA's and JAX's defaults apply, or what ``XLA_FLAGS`` and
      ``JAX_DEFAULT_MATMUL_PRECISION`` say.

  Returns:
    True when the run is deterministic as far as these settings go: both are in effect.
    With ``enabled`` after the backend started, the flag only counts if it was already in
    ``XLA_FLAGS`` (XLA read them at the start); otherwise a warning says so.
  """
  if not enabled:
    logging.vlog(1, 'GPU determinism off (config.gpu_determinism=False): XLA may pick '
                 'non-deterministic GPU kernels and run float32 matmuls as TF32')
    current = status()
    return current['deterministic_ops'] and current['matmul_precision'] == PRECISION
  was_on = status()['deterministic_ops']
  flags = [f for f in _xla_flags() if f.partition('=')[0] != FLAG]
  os.environ['XLA_FLAGS'] = shlex.join(flags + [f'{FLAG}=true'])
  jax.config.update('jax_default_matmul_precision', PRECISION)
  if _backend_started() and not was_on:
    logging.warning('%s=true set after JAX started its backend: it applies to the next '
                    'process only; set it before the first device use', FLAG)
    return False
  logging.vlog(1, 'GPU determinism on: %s=true, float32 matmuls at %r precision (set '
               'config.gpu_determinism=False for speed)', FLAG, PRECISION)
  return True


def describe() -> str:
  """One line on what is in effect, for a run's log on a GPU (the settings change nothing
  on a CPU, so nothing is said there)."""
  current = status()
  if current['deterministic_ops'] and current['matmul_precision'] == PRECISION:
    return f'GPU determinism on ({FLAG}=true, float32 matmuls)'
  return 'GPU determinism off: non-deterministic kernels and TF32 matmuls are allowed'

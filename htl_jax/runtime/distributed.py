"""Many hosts: ``jax.distributed`` start-up and failure handling for the entry points.

A command that trains (``htl-train``, ``htl-reproduce``, ``htl-tune``; :mod:`htl_jax.cli`)
takes the flags ``--coordinator_address``, ``--num_processes``, ``--process_id``,
``--heartbeat_timeout`` and ``--initialization_timeout``, calls :func:`initialize` with them
before anything touches a device, then runs its work inside :func:`stop_all_on_failure`::

  distributed.initialize(address, num_processes, process_id)
  with distributed.stop_all_on_failure():
    train_and_evaluate(config, workdir)

When to start ``jax.distributed`` (:func:`initialize`):

- any of the three flags given: with them (JAX's own cluster detection fills in the missing
  ones on a cluster); ``--num_processes=1`` runs one plain process even on a cluster;
- none given, inside a multi-process launch JAX can auto-detect: SLURM (``srun`` with more
  than one task), Open MPI (``mpirun`` with more than one rank) or a Kubernetes indexed Job:
  with JAX's auto-detection;
- otherwise (a laptop, one ``sbatch`` step without ``srun``, a single pod): one plain
  process, nothing started, so the usual single-process run is unchanged.

On CPU the collectives between processes are JAX's gloo TCP collectives.

Failures. If a process dies, the others learn it at their next collective (gloo: the TCP
connection closes, at once) or, at the latest, when the coordination service misses the
dead process's heartbeats for ``--heartbeat_timeout`` seconds (JAX then terminates the
survivors itself). :func:`stop_all_on_failure` turns the first case into one line on
stderr and exit code 4 and ends the process at once: a normal exit would wait in JAX's
shutdown barrier for the dead process. Restarting every process with the same command
resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator, NoReturn, Optional

from absl import logging
import jax

from htl_jax.errors import ConfigError, PeerLostError, StartError

# Exit code of a process that stopped because another process of the run is gone.
PEER_FAILURE_EXIT_CODE = PeerLostError.exit_code
# Lower-cased pieces of the runtime errors raised when a collective's peer is gone.
_PEER_FAILURE_MARKS = ('gloo', 'connection closed', 'connection reset', 'broken pipe',
                       'heartbeat', 'unavailable', 'deadline_exceeded', 'coordination service',
                       'barrier', 'nccl')


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, '1'))
  except ValueError:
    return 1


def detected_cluster() -> Optional[str]:
  """The multi-process launcher this process runs under, if JAX can auto-detect it.

  Returns:
    ``'slurm'`` (an ``srun`` step of more than one task), ``'ompi'`` (``mpirun`` with more
    than one rank), ``'k8s'`` (a pod of a Kubernetes indexed Job), or None. A single task
    or rank, or an ``sbatch`` script outside ``srun``, gives None.
  """
  env = os.environ
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(name in env for name in slurm) and _env_int('SLURM_STEP_NUM_TASKS') > 1:
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env and _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'ompi'
  if 'KUBERNETES_SERVICE_HOST' in env and 'JOB_COMPLETION_INDEX' in env:
    return 'k8s'
  return None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None, *,
               heartbeat_timeout: int = 100, initialization_timeout: int = 300) -> bool:
  """Starts ``jax.distributed`` when this is a multi-process run (see module doc).

  Must run before anything touches a device.

  Args:
    coordinator_address: ``host:port`` of process 0, or None.
    num_processes: number of processes, or None; 1 means one plain process.
    process_id: this process's id, or None.
    heartbeat_timeout: seconds without heartbeats before a process counts as dead.
    initialization_timeout: seconds to wait for every process to connect.

  Returns:
    True when ``jax.distributed`` was started, False for one plain process.

  Raises:
    ConfigError: flags that cannot describe a run (some given, others missing and no
      cluster to detect them).
    StartError: ``jax.distributed`` did not start.
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if num_processes == 1:
    if process_id not in (None, 0):
      raise ConfigError(f'--process_id={process_id} with --num_processes=1')
    return False
  cluster = detected_cluster()
  if cluster is None:
    if all(value is None for value in given.values()):
      return False
    missing = [f'--{name}' for name, value in given.items() if value is None]
    if missing:
      raise ConfigError(f'a multi-process run needs {", ".join(missing)} too (or a '
                        'SLURM / Open MPI / Kubernetes launch that JAX detects)')
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} must be in [0, {num_processes})')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as error:
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
    raise StartError(f'jax.distributed could not start (process {process_id} of '
                     f'{num_processes}, coordinator {coordinator_address}, {cluster or "flags"}'
                     f'): {detail[:300]}') from error
  logging.info('jax.distributed: process %d of %d (%s), coordinator %s',
               jax.process_index(), jax.process_count(), cluster or 'flags',
               coordinator_address or 'auto-detected')
  return True


def is_multiprocess() -> bool:
  """True once ``jax.distributed`` runs (without touching a device)."""
  return jax.distributed.is_initialized()


def is_peer_failure(error: BaseException) -> bool:
  """True when ``error`` says that a collective lost another process of the run."""
  if not is_multiprocess() or not isinstance(error, (jax.errors.JaxRuntimeError,
                                                     ValueError, RuntimeError)):
    return False
  text = str(error).lower()
  return any(mark in text for mark in _PEER_FAILURE_MARKS)


def peer_failure_message(error: BaseException) -> str:
  """One line: which process stopped, why, and how to resume."""
  detail = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
  return (f'error: process {jax.process_index()} of {jax.process_count()} lost contact with '
          f'another process of the run ({detail[:300]}); stopping. Restart every process '
          'with the same command to resume from the latest checkpoint.')


def exit_now(code: int) -> NoReturn:
  """Ends this process with ``code``; with several processes, without waiting for them.

  A normal exit runs JAX's shutdown barrier, which waits for every process (up to its
  shutdown timeout) and then aborts with a stack dump when one of them is dead.
  """
  if not is_multiprocess():
    sys.exit(code)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def stop_all_on_failure() -> Iterator[None]:
  """Runs the block; in a multi-process run, an uncaught error ends the process at once.

  A lost peer prints :func:`peer_failure_message` and exits with
  ``PEER_FAILURE_EXIT_CODE``; any other error prints its traceback and exits with 1, so
  that the other processes see this one gone at their next collective instead of waiting
  for it. With one process, errors propagate unchanged.
  """
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    if not is_multiprocess():
      raise
    if is_peer_failure(error):
      print(peer_failure_message(error), file=sys.stderr)
      exit_now(PEER_FAILURE_EXIT_CODE)
    traceback.print_exc()
    exit_now(1)

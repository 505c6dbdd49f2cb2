"""Data parallelism: the ONLY module that touches ``pmap``, devices and collectives.

Steps run under ``jax.pmap(axis_name='batch')`` over all devices of all processes, also
with one device, so 1 and N devices run the same program. The global batch is split evenly:
process ``p`` of ``P`` feeds the contiguous part ``p`` of each global batch
(:func:`process_part`), and splits it across its local devices (:func:`shard`), so the
devices in ``pmap``'s axis order (process-major) hold the global batch in order. What goes to
the devices (:func:`replicate`, :func:`put_sharded`, :func:`prefetch`) is laid out as ``pmap``
takes its arguments, one slice per local device put there from the host, so no step moves
it. Per-task gradients are gathered (sparse rows) or averaged (dense towers) across ALL
devices of all processes BEFORE the gradient process, so N devices give the same update as 1
device with the same global batch. Evaluation outputs are gathered the same way, so every
process ends up with the predictions of the whole global batch.

With several processes (``jax.distributed``, see ``htl_jax.runtime.distributed``), ``pmap``
maps over the local devices of each process and its collectives span every device of every
process; on CPU they go through JAX's gloo collectives. This works with ``pmap`` as is, so
nothing here needs ``shard_map``; a later move to it touches this file only.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

AXIS = 'batch'


def device_count() -> int:
  """Devices in a step: every device of every process."""
  return jax.device_count()


def local_device_count() -> int:
  """Devices of this process."""
  return jax.local_device_count()


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_primary() -> bool:
  """True in the process that writes metrics, configs and logs (process 0)."""
  return jax.process_index() == 0


def process_part() -> tuple[int, int]:
  """``(index, count)``: this process feeds part ``index`` of ``count`` of a global batch."""
  return jax.process_index(), jax.process_count()


def mean(tree: Any) -> Any:
  """Average over all devices (inside a pmapped step).

  The leaves of each dtype travel as ONE flat vector: gloo (CPU, several processes) runs a
  tuple all-reduce leaf by leaf, one collective per leaf (HTLNet has ~50 tower leaves).
  With one device this is the identity.
  """
  if device_count() == 1:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  by_dtype: dict[Any, list[int]] = {}
  for i, leaf in enumerate(leaves):
    by_dtype.setdefault(jnp.result_type(leaf), []).append(i)
  averaged = list(leaves)
  for members in by_dtype.values():
    flat = jax.lax.pmean(jnp.concatenate([jnp.ravel(leaves[i]) for i in members]), AXIS)
    offsets = np.cumsum([0] + [int(np.size(leaves[i])) for i in members])
    for i, start, stop in zip(members, offsets[:-1], offsets[1:]):
      averaged[i] = flat[start:stop].reshape(jnp.shape(leaves[i]))
  return jax.tree.unflatten(treedef, averaged)


def gather(x: jax.Array, axis: int = 0) -> jax.Array:
  """Concatenate every device's ``x`` along ``axis``, in global device order (in a step).

  With one device this is the identity (the collective would copy the per-task row
  gradients for nothing).
  """
  if device_count() == 1:
    return x
  return jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)


def platform() -> str:
  """The default backend's platform: 'cpu', 'gpu' or 'tpu' (this starts the backend)."""
  return jax.default_backend()


def _local_sharding() -> jax.sharding.NamedSharding:
  """How ``pmap`` lays out an argument with a leading local-device axis: one slice per local
  device, in ``jax.local_devices()`` order (the local part of its mesh over :data:`AXIS`)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any) -> Any:
  """Pytree -> one copy per local device (leading device axis), as ``pmap`` lays it out.

  Each device's copy goes from the host straight to its own device (:func:`put_sharded` of
  a broadcast view: no host copy per device), so no device holds another's copy, and
  passing the result to a pmapped step moves no data (with a donated state, the step reuses
  these buffers; tested). Leaves may be numpy or JAX arrays or scalars.
  """
  n = local_device_count()
  return put_sharded(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None],
                                                            (n,) + np.shape(x)),
                                  jax.device_get(tree)))


def put_sharded(tree: Any) -> Any:
  """Host pytree with a leading local-device axis -> slice ``i`` on local device ``i``, as
  ``pmap`` lays out its arguments (each slice goes from the host to its device; nothing
  compiles, and a pmapped step takes the result without moving it)."""
  return jax.device_put(tree, _local_sharding())


def unreplicate(tree: Any) -> Any:
  """First local device's copy, on the host (read from that device's buffer: no program
  runs to slice it out)."""
  def first(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array):           # device 0's shard holds its whole copy
      x = x.addressable_shards[0].data
    return np.asarray(np.asarray(x)[0])    # an array also for a 0-d copy, not a scalar

  return jax.tree.map(first, tree)


def shard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Split this process's part of a batch into ``[local devices, rows / devices, ...]``."""
  n = local_device_count()

  def split(x: np.ndarray) -> np.ndarray:
    if x.shape[0] % n:
      raise ValueError(f'batch part of {x.shape[0]} rows is not divisible by {n} devices')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return {k: split(v) for k, v in batch.items()}


def unshard(x: Any) -> np.ndarray:
  """``[local devices, b, ...]`` step output -> ``[local devices * b, ...]`` numpy."""
  x = np.asarray(jax.device_get(x))
  return x.reshape((-1,) + x.shape[2:])


def pmap_program(fn: Callable[..., Any], static: tuple[int, ...] = (),
                 donate: Optional[int] = None, gathered: bool = False) -> Callable[..., Any]:
  """``fn`` compiled data-parallel over all devices of all processes.

  Args:
    fn: the per-device program.
    static: positions of its static arguments (hashable: a setup, a count), broadcast to
      every device; jit's cache keeps one program per value and shapes.
    donate: the position of the argument whose buffers the program reuses (the state).
    gathered: every output gathered over all devices: each device returns the outputs of
      the whole global batch (leading axis in global batch order), which
      :func:`unreplicate` takes on the host. Evaluation uses it, so that each row is
      predicted by exactly one device and every process sees every prediction.
  """
  program = fn
  if gathered:
    def program(*args):
      return jax.tree.map(lambda x: gather(x, 0), fn(*args))
  return jax.pmap(program, axis_name=AXIS, static_broadcasted_argnums=static,
                  donate_argnums=() if donate is None else (donate,))


def same_on_all_processes(values: np.ndarray) -> bool:
  """True when the int32 vector ``values`` is equal in every process (a collective).

  Call it from every process at the same point; with one process it is always True.
  """
  values = np.asarray(values, np.int32)
  if process_count() == 1:
    return True
  everyone = np.asarray(multihost_utils.process_allgather(values))
  return bool(np.all(everyone == everyone[0]))


def broadcast_json(value: Any = None) -> Any:
  """The primary process's ``value`` (anything JSON can hold), on every process.

  A collective: every process calls it at the same point; the others' ``value`` is
  ignored. With one process it returns ``value``. It travels as UTF-8 bytes, after its
  length (every process must pass an array of the same shape).
  """
  if process_count() == 1:
    return value
  data = json.dumps(value).encode() if is_primary() else b''
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buffer = np.frombuffer(data, np.uint8) if is_primary() else np.zeros(size, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
  return json.loads(received.tobytes().decode())


def prefetch(batches: Iterator[dict[str, np.ndarray]], size: int = 2,
             already_sharded: bool = False) -> Iterator[Any]:
  """This process's batches, sharded and put on its devices ``size`` dispatches ahead.

  The host prepares and transfers batch ``i + 1`` while the devices run step ``i``
  (``flax.jax_utils.prefetch_to_device``). ``already_sharded``: the batches have their
  leading local-device axis already (:func:`shard`).
  """
  sharded = batches if already_sharded else (shard(batch) for batch in batches)
  return jax_utils.prefetch_to_device(sharded, size, devices=jax.local_devices())

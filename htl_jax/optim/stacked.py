"""The stacked-input contract shared by the gradient processes of :mod:`htl_jax.optim`.

Every leaf of a *stacked* pytree has a leading **task axis** of size ``K`` holding the
per-task gradients of the shared parameters ``theta_s`` (the core task at ``core_index``).
These helpers check that axis, view leaves as ``[K, n]`` matrices, and take the joint dot
products and norms over all leaves (the flattened ``theta_s``) that every process needs.
Dot products use ``Precision.HIGHEST`` so that accelerators do not silently round float32
inputs to TF32. Depends on jax and numpy only.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional
import warnings

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


class TaskDiagnostics(NamedTuple):
  """What a gradient process did to each task's gradient at its last update (``[K]`` each).

  One record from the transform to the run's ``metrics.jsonl`` (its ``grad`` entries carry
  these field names) and Fig. 5. Every norm and cosine is over all leaves jointly (the
  flattened ``theta_s``). A field the process does not define is None (a transform built
  without ``num_tasks`` records no diagnostics at all: its state's ``diagnostics`` is
  None).

  Attributes:
    norm: the raw per-task gradient norms ``||G_k||``.
    norm_processed: the norms of each task's term of the combined gradient.
    cos_core: the cosine of each raw gradient with the core's (1 for the core itself; 0
      where either is zero).
    eq16_share: Algorithm 1 only: 1 where Eq. 16 projected the task's gradient (it
      conflicted with the core's), else 0; with ``per_leaf`` the share of leaves.
    eq17_factor: Algorithm 1 only: the factor Eq. 17 multiplied the task's gradient by,
      ``gamma w_t + 1 - gamma`` (1 for the core and with Eq. 17 off; with ``per_leaf`` the
      mean over leaves).
  """

  norm: jax.Array
  norm_processed: jax.Array
  cos_core: jax.Array
  eq16_share: Optional[jax.Array] = None
  eq17_factor: Optional[jax.Array] = None


def no_diagnostics(num_tasks: Optional[int], algorithm1: bool = False
                   ) -> Optional[TaskDiagnostics]:
  """The initial record: zeros of shape ``[K]`` (None without ``num_tasks``); the Eq. 16
  and 17 fields None unless ``algorithm1`` (then zeros and ones)."""
  if num_tasks is None:
    return None
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  if not algorithm1:
    return TaskDiagnostics(zeros, zeros, zeros)
  return TaskDiagnostics(zeros, zeros, zeros, zeros, jnp.ones((num_tasks,), jnp.float32))


def diagnostics_of(updates: Any, core_index: int, processed_sq: Optional[jax.Array],
                   eq16_share: Optional[jax.Array] = None,
                   eq17_factor: Optional[jax.Array] = None) -> TaskDiagnostics:
  """The record of one update: the raw norms and cosines of ``updates`` (stacked), the
  processed norms ``sqrt(processed_sq)`` (None: no process, the raw norms), and Algorithm
  1's fields when given."""
  norms, cosines = task_norms_and_cosines(updates, core_index)
  processed = norms if processed_sq is None else jnp.sqrt(jnp.maximum(processed_sq, 0.0))
  as32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
  return TaskDiagnostics(as32(norms), as32(processed), as32(cosines), as32(eq16_share),
                         as32(eq17_factor))


def renamed(new: str, old: str, value: Any, old_value: Any, function: str) -> Any:
  """``old_value`` (with a DeprecationWarning) when the deprecated name ``old`` was given,
  else ``value``: one release of grace for a renamed argument (CHANGELOG 0.3.0)."""
  if old_value is None:
    return value
  warnings.warn(f'{function}({old}=...) is deprecated; use {new}=... (the old name goes '
                'in the next release)', DeprecationWarning, stacklevel=3)
  return old_value


def leading_size(updates: Any) -> int:
  """Returns K, the size of the task axis shared by every leaf of `updates`."""
  leaves = jax.tree.leaves(updates)
  if not leaves:
    raise ValueError('Stacked per-task gradients must have at least one leaf.')
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        'Every leaf of the stacked gradients needs the same leading task '
        f'axis; got leading sizes {sorted(map(str, sizes))}.')
  return sizes.pop()


def check_num_tasks(num_tasks: int | None, size: int, name: str) -> None:
  if num_tasks is not None and num_tasks != size:
    raise ValueError(f'{name} was built with num_tasks={num_tasks} but the stacked '
                     f'gradients have a task axis of size {size}.')


def task_position(index: int, size: int) -> int:
  """Normalises a (possibly negative) task index into ``[0, size)``."""
  if not -size <= index < size:
    raise ValueError(f'Task index {index} is out of range for {size} tasks.')
  return index % size


def as_matrix(leaf: jax.Array) -> jax.Array:
  """Views a stacked leaf ``[K, ...]`` as ``[K, n]`` in at least float32."""
  dtype = jnp.promote_types(leaf.dtype, jnp.float32)
  return leaf.reshape(leaf.shape[0], int(np.prod(leaf.shape[1:]))).astype(dtype)


def safe_div(num: jax.Array, den: jax.Array, default: float) -> jax.Array:
  """``num / den`` where ``den > 0``, else ``default`` (no NaN anywhere)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), default)


def combine(coeffs: jax.Array, leaf: jax.Array) -> jax.Array:
  """``sum_k coeffs[k] * leaf[k]``: removes the task axis of one leaf."""
  out = jnp.tensordot(coeffs.astype(leaf.dtype), leaf, axes=1, precision=HIGHEST)
  return out.astype(leaf.dtype)


def gram(matrices: list[jax.Array]) -> jax.Array:
  """``[K, K]`` matrix of joint dot products ``G_i . G_j`` over all leaves."""
  return sum(jnp.einsum('kn,ln->kl', m, m, precision=HIGHEST) for m in matrices)


def core_dots(matrices: list[jax.Array], core: int) -> jax.Array:
  """``[K]`` joint dot products ``G_k . G_core`` over all leaves."""
  return sum(jnp.einsum('kn,n->k', m, m[core], precision=HIGHEST) for m in matrices)


def task_norms_and_cosines(
    stacked_grads: Any, core_index: int = -1) -> tuple[jax.Array, jax.Array]:
  """Norms of the per-task gradients and their cosine with the core gradient.

  Both are taken over all leaves jointly (the flattened ``theta_s``). The
  cosine of the core task with itself is 1; a task with a zero gradient (or a
  zero core gradient) has cosine 0.

  Args:
    stacked_grads: Pytree whose leaves have a leading task axis of size K.
    core_index: Position of the core task on the task axis.

  Returns:
    ``(norms, cosines)``, two float arrays of shape ``[K]``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = {'w': jnp.array([[3., 4.], [0., 2.]])}
    >>> norms, cos = task_norms_and_cosines(g)
    >>> print(norms, cos)
    [5. 2.] [0.8 1. ]
  """
  size = leading_size(stacked_grads)
  core = task_position(core_index, size)
  matrices = [as_matrix(x) for x in jax.tree.leaves(stacked_grads)]
  dots = core_dots(matrices, core)
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(m), axis=1) for m in matrices))
  cosines = safe_div(dots, norms * norms[core], 0.0)
  return norms, cosines.at[core].set(1.0)

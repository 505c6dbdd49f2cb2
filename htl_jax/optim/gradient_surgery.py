"""PCGrad ("Gradient Surgery", Yu et al. 2020) as an Optax transform on stacked gradients.

Follows the stacked-input contract of :mod:`htl_jax.optim.transforms`: each leaf has a leading
task axis; the output is the combined gradient without it. Task orders come from a PRNG key
in the state. Depends on jax and optax only.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from htl_jax.optim import stacked as stacked_lib
from htl_jax.optim.stacked import TaskDiagnostics


# --- PCGrad (Yu et al., 2020).


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: Raw ``uint32[2]`` PRNG key; split once per update to draw task orders.
    diagnostics: a :class:`~htl_jax.optim.stacked.TaskDiagnostics` of the last update
      (the norms of the raw and of the projected per-task gradients :math:`g_i^{PC}`, the
      cosines with the core; None without ``num_tasks``).
  """
  key: jax.Array
  diagnostics: Optional[TaskDiagnostics]

  @property
  def processed_norms(self) -> jax.Array:
    """Deprecated (0.2's field): ``diagnostics.norm_processed``."""
    return self.diagnostics.norm_processed


def pcgrad_task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """Draws, for every task ``i``, a uniformly random order of the other tasks.

  Args:
    key: PRNG key.
    num_tasks: K.

  Returns:
    An int32 array ``[K, K-1]`` whose row ``i`` is a permutation of
    ``{0..K-1} \\ {i}``.
  """
  keys = jax.random.split(key, num_tasks)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_tasks - 1))(keys)
  rows = jnp.arange(num_tasks)[:, None]
  return (perms + (perms >= rows)).astype(jnp.int32)


def pcgrad_combine(stacked: Any, orders: jax.Array) -> Any:
  """PCGrad's combined gradient for given task orders (pure function).

  For each task ``i``, ``g_i^PC`` starts at ``g_i`` and is projected, in the
  order ``orders[i]``, onto the normal plane of each ORIGINAL ``g_j`` it
  conflicts with (``g_i^PC . g_j < 0``). The result is ``sum_i g_i^PC``. Dot
  products are joint over all leaves. Each ``g_i^PC`` is a linear combination
  of the original gradients, so the loop runs on ``[K, K]`` coefficients and
  the Gram matrix; the leaves are read twice (Gram matrix, final sum).

  Args:
    stacked: Pytree whose leaves have a leading task axis of size K.
    orders: int array ``[K, K-1]``; row ``i`` lists the other tasks in the
      order task ``i`` visits them (see :func:`pcgrad_task_orders`).

  Returns:
    The combined gradient, leaves without the task axis.

  Example:
    >>> import jax.numpy as jnp
    >>> g = {'w': jnp.array([[1., 0.], [-1., 1.]])}
    >>> print(pcgrad_combine(g, jnp.array([[1], [0]]))['w'])
    [0.5 1.5]
  """
  leaves, treedef = jax.tree.flatten(stacked)
  return _sum_projected(leaves, treedef, _pcgrad_coefficients(leaves, orders)[0])


def _sum_projected(leaves: list[jax.Array], treedef: Any, coeffs: jax.Array) -> Any:
  """``sum_i g_i^PC = sum_j (sum_i C_ij) g_j``, leaf by leaf, the task axis removed."""
  weights = jnp.sum(coeffs, axis=0)
  return jax.tree.unflatten(treedef, [stacked_lib.combine(weights, x) for x in leaves])


def _pcgrad_coefficients(leaves: list[jax.Array], orders: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """``[K, K]`` coefficients ``C`` with ``g_i^PC = sum_j C_ij g_j``, and the Gram matrix."""
  size = stacked_lib.leading_size(leaves)
  gram = stacked_lib.gram([stacked_lib.as_matrix(x) for x in leaves])
  sq_norms = jnp.diagonal(gram)
  orders = jnp.asarray(orders, jnp.int32).reshape(size, size - 1)

  def visit(position, coeffs):
    # coeffs[i] holds g_i^PC in the basis of the original gradients.
    other = orders[:, position]
    dots = jnp.sum(coeffs * gram[other], axis=1)  # g_i^PC . g_other[i]
    step = jnp.where(dots < 0, stacked_lib.safe_div(dots, sq_norms[other], 0.0), 0.0)
    return coeffs - step[:, None] * jax.nn.one_hot(other, size, dtype=gram.dtype)

  coeffs = jax.lax.fori_loop(0, size - 1, visit, jnp.eye(size, dtype=gram.dtype))
  return coeffs, gram


def pcgrad(seed: int = 0, num_tasks: int | None = None, core_index: int = -1
           ) -> optax.GradientTransformation:
  r"""Projecting conflicting gradients (PCGrad).

  Algorithm 1 of Yu et al. (2020): for every task :math:`i`,
  :math:`g_i^{PC} \leftarrow g_i`; then for every other task :math:`j`, in a
  random order drawn separately for each :math:`i` (as the reference
  implementation shuffles the task list per task),

  .. math::

    g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j
    \quad \text{if } g_i^{PC} \cdot g_j < 0 ,

  always against the original :math:`g_j`. The output is
  :math:`\sum_i g_i^{PC}`, with dot products joint over all leaves. The orders
  come from a PRNG key kept in the state: each update splits it into a new
  state key and a subkey passed to :func:`pcgrad_task_orders`, and combines
  with :func:`pcgrad_combine`. Zero gradients are never projected on.

  Args:
    seed: Seed of the PRNG key that draws the task orders.
    num_tasks: K, optional; when given, the state records a
      :class:`~htl_jax.optim.stacked.TaskDiagnostics` of every update and updates
      whose task axis has another size raise ``ValueError``.
    core_index: Position of the core task on the task axis: PCGrad treats every
      task alike, so it only decides the diagnostics' cosines.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`PCGradState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = pcgrad(seed=0)
    >>> stacked = {'w': jnp.array([[1., 0.], [-1., 1.]])}
    >>> combined, state = tx.update(stacked, tx.init({'w': jnp.zeros(2)}))
    >>> print(combined['w'])
    [0.5 1.5]

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020
  """

  def init_fn(params):
    del params
    return PCGradState(key=jax.random.PRNGKey(seed),
                       diagnostics=stacked_lib.no_diagnostics(num_tasks))

  def update_fn(updates, state, params=None):
    del params
    size = stacked_lib.leading_size(updates)
    stacked_lib.check_num_tasks(num_tasks, size, 'pcgrad')
    key, subkey = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    coeffs, gram = _pcgrad_coefficients(leaves, pcgrad_task_orders(subkey, size))
    combined = _sum_projected(leaves, treedef, coeffs)
    diagnostics = state.diagnostics
    if num_tasks is not None:
      # ||g_i^PC||^2 = ||sum_j C_ij g_j||^2 = C_i G C_i^T, G the Gram matrix of the g_j.
      processed_sq = jnp.einsum('ij,jl,il->i', coeffs, gram, coeffs,
                                precision=stacked_lib.HIGHEST)
      diagnostics = stacked_lib.diagnostics_of(
          updates, stacked_lib.task_position(core_index, size), processed_sq)
    return combined, PCGradState(key=key, diagnostics=diagnostics)

  return optax.GradientTransformation(init_fn, update_fn)

"""MetaBalance (He et al. 2022) as an Optax transform on stacked per-task gradients.

Follows the stacked-input contract of :mod:`htl_jax.optim.transforms`: each leaf has a leading
task axis; the output is the combined gradient without it. The moving averages of the
per-task gradient norms live in the state. Depends on jax and optax only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from htl_jax.optim import stacked as stacked_lib
from htl_jax.optim.stacked import TaskDiagnostics


# --- MetaBalance (He et al., 2022).


class MetaBalanceState(NamedTuple):
  """State of :func:`metabalance`.

  Attributes:
    norm_ema: Pytree mirroring ``params``; each leaf is a ``[K]`` array of the
      moving averages of the per-task gradient norms of that parameter.
    diagnostics: a :class:`~htl_jax.optim.stacked.TaskDiagnostics` of the last update
      (the norms of the raw and of the rescaled per-task gradients, the cosines with
      the core task), joint over all leaves.
  """
  norm_ema: Any
  diagnostics: TaskDiagnostics

  @property
  def processed_norms(self) -> jax.Array:
    """Deprecated (0.2's field): ``diagnostics.norm_processed``."""
    return self.diagnostics.norm_processed


def metabalance(
    num_tasks: int,
    beta: float = 0.9,
    relax: float | jax.Array = 0.7,
    core_index: int = -1,
    *,
    target_index: int | None = None,
) -> optax.GradientTransformation:
  r"""MetaBalance: scale auxiliary gradients toward the target task's magnitude.

  Algorithm 1 of He et al. (2022), per shared parameter (leaf). First the moving
  averages of the gradient norms are updated with the current gradients, then
  every auxiliary task :math:`k \ne` target is rescaled:

  .. math::

    m_k &\leftarrow \beta m_k + (1 - \beta) \|g_k\| \\
    g_k &\leftarrow r \, \frac{m_{target}}{m_k} g_k + (1 - r) g_k \\
    g &= \textstyle\sum_k g_k ,

  with relax factor :math:`r`. The averages start at zero; where
  :math:`m_k = 0` the ratio is taken as 1. The target task is the core task
  (``core_index``, as in :func:`~htl_jax.optim.hybrid_grad_balance`). Input and
  output follow the same stacked contract: leaves ``[K, *param.shape]`` in,
  ``param.shape`` out. ``relax`` may be a traced scalar, so it can be injected
  with :func:`optax.inject_hyperparams` (``static_args=('num_tasks',
  'core_index')``; ``beta`` is then injected too).

  Args:
    num_tasks: K, the size of the task axis (the state holds ``[K]`` per leaf, so
      it is required here).
    beta: Decay :math:`\beta` of the moving averages of the norms.
    relax: Relax factor :math:`r` in ``[0, 1]`` (the MetaBalance paper tunes it; so
      does ``htl-reproduce``, docs/tuning.md).
    core_index: Position of the target (core) task on the task axis.
    target_index: Deprecated name of ``core_index`` (a DeprecationWarning; goes in the
      next release).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`MetaBalanceState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = metabalance(num_tasks=2, beta=0.5, relax=1.0)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> stacked = {'w': jnp.array([[0., 4.], [1., 0.]])}  # [aux, target]
    >>> combined, state = tx.update(stacked, state)
    >>> print(combined['w'], state.norm_ema['w'])
    [1. 1.] [2.  0.5]

  References:
    He et al., `MetaBalance: Improving Multi-Task Recommendations via Adapting
    Gradient Magnitudes of Auxiliary Tasks <https://arxiv.org/abs/2203.06801>`_,
    WWW 2022
  """
  core_index = stacked_lib.renamed('core_index', 'target_index', core_index, target_index,
                                   'metabalance')
  if num_tasks < 1:
    raise ValueError(f'num_tasks must be positive; got {num_tasks}.')
  if isinstance(beta, (int, float)) and not 0.0 <= beta < 1.0:
    raise ValueError(f'beta must be in [0, 1); got {beta}.')
  if isinstance(relax, (int, float)) and not 0.0 <= relax <= 1.0:
    raise ValueError(f'relax must be in [0, 1]; got {relax}.')
  target = stacked_lib.task_position(core_index, num_tasks)

  def init_fn(params):
    return MetaBalanceState(
        norm_ema=jax.tree.map(
            lambda p: jnp.zeros((num_tasks,),
                                jnp.promote_types(jnp.result_type(p), jnp.float32)),
            params),
        diagnostics=stacked_lib.no_diagnostics(num_tasks))

  def new_average(grad, ema):
    norms = jnp.sqrt(jnp.sum(jnp.square(stacked_lib.as_matrix(grad)), axis=1))
    return (beta * ema + (1.0 - beta) * norms).astype(ema.dtype)

  def scales(ema):
    ratio = stacked_lib.safe_div(ema[target], ema, 1.0)
    return jnp.where(jnp.arange(num_tasks) == target, 1.0, relax * ratio + (1.0 - relax))

  def processed_sq(grad, ema):
    return jnp.square(scales(ema)) * jnp.sum(jnp.square(stacked_lib.as_matrix(grad)), axis=1)

  def update_fn(updates, state, params=None):
    del params
    stacked_lib.check_num_tasks(num_tasks, stacked_lib.leading_size(updates), 'metabalance')
    norm_ema = jax.tree.map(new_average, updates, state.norm_ema)
    combined = jax.tree.map(lambda g, ema: stacked_lib.combine(scales(ema), g), updates, norm_ema)
    processed = sum(jax.tree.leaves(jax.tree.map(processed_sq, updates, norm_ema)))
    return combined, MetaBalanceState(
        norm_ema=norm_ema,
        diagnostics=stacked_lib.diagnostics_of(updates, target, processed))

  return optax.GradientTransformation(init_fn, update_fn)

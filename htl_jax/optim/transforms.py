"""HTLNet's gradient process (Algorithm 1, Eq. 16-17) as an Optax gradient transformation.

Every gradient process of :mod:`htl_jax.optim` (this one, :mod:`~htl_jax.optim.gradient_surgery`,
:mod:`~htl_jax.optim.meta_balance`) follows one *stacked-input* contract: each leaf of the
``updates`` pytree carries a leading **task axis** of size ``K`` holding the
per-task gradients of the shared parameters ``theta_s`` (the core / target task
at ``core_index``, by default the last one). ``update`` combines the ``K``
gradients into one and returns it with the task axis removed, so the result has
the structure and shapes of ``params``. Put the transformation FIRST in an
:func:`optax.chain`; every later element sees ordinary gradients::

  tx = optax.chain(hybrid_grad_balance(), optax.adam(1e-3))
  opt_state = tx.init(params)                      # params: no task axis
  updates, opt_state = tx.update(stacked_grads, opt_state, params)

All functions are pure, ``jax.jit``-able and finite for all-zero gradients. Dot
products use ``Precision.HIGHEST`` so that accelerators do not silently round
float32 inputs to TF32. This module depends on jax and optax only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from htl_jax.optim import stacked as stacked_lib
from htl_jax.optim.stacked import TaskDiagnostics


# --- HTLNet, Algorithm 1.


class HybridGradBalanceState(NamedTuple):
  """State of :func:`hybrid_grad_balance`: what the last update did.

  Attributes:
    diagnostics: a :class:`~htl_jax.optim.stacked.TaskDiagnostics` (``[K]`` per field; None
      when the transformation was built without ``num_tasks``): the raw norms, the norms
      after Eq. 16-17, the cosines with the core, where Eq. 16 fired and Eq. 17's factor.
  """
  diagnostics: Optional[TaskDiagnostics]

  # The field names of 0.2 (deprecated: use ``diagnostics``; they go in the next release).
  @property
  def task_norms(self) -> jax.Array:
    return self.diagnostics.norm

  @property
  def core_cosine(self) -> jax.Array:
    return self.diagnostics.cos_core

  @property
  def processed_norms(self) -> jax.Array:
    return self.diagnostics.norm_processed

  @property
  def projected(self) -> jax.Array:
    return self.diagnostics.eq16_share

  @property
  def magnitude_factor(self) -> jax.Array:
    return self.diagnostics.eq17_factor


def _balance_coefficients(
    matrices: list[jax.Array], core: int, alpha: float | jax.Array,
    gamma: float | jax.Array, clip: float | jax.Array,
    conflict: bool, magnitude: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Algorithm 1 on `matrices` (leaves viewed as ``[K, n]``), as coefficients.

  Eq. 16 writes the projected gradient as ``G_t - c_t G_core`` with
  ``c_t = alpha * (G_t . G_core) / ||G_core||^2`` where the dot product is
  negative (else 0), and Eq. 17 scales it by ``s_t = gamma * w_t + (1 - gamma)``,
  so the output ``G_core + sum_t s_t (G_t - c_t G_core)`` is linear in the raw
  gradients. Dot products and norms run over all of `matrices` jointly.

  Returns:
    ``(a, processed_sq, projected, scale)``: ``[K]`` coefficients with
    ``sum_k a_k G_k`` = Algorithm 1's output; ``[K]`` squared norms of each
    task's term of that sum, ``||s_t (G_t - c_t G_core)||^2`` (the core's:
    ``||G_core||^2``); ``[K]`` 1 where Eq. 16 projected; and ``[K]`` ``s_t``.
  """
  is_core = jnp.arange(matrices[0].shape[0]) == core
  dots = stacked_lib.core_dots(matrices, core)
  core_sq = dots[core]
  if conflict:
    project = jnp.logical_and(dots < 0, ~is_core)
    proj = jnp.where(project, alpha * stacked_lib.safe_div(dots, core_sq, 0.0), 0.0)
  else:
    project = jnp.zeros(dots.shape, bool)
    proj = jnp.zeros_like(dots)
  # Norm AFTER the projection, computed from the projected vectors themselves
  # (not from ||G_t||^2 - c_t^2 ||G_core||^2, which cancels badly).
  projected_sq = sum(
      jnp.sum(jnp.square(m - proj[:, None] * m[core][None, :]), axis=1)
      for m in matrices)
  if magnitude:
    ratio = stacked_lib.safe_div(jnp.sqrt(core_sq), jnp.sqrt(projected_sq), 1.0)
    weight = jnp.clip(ratio, 1.0 / clip, clip)
    scale = gamma * weight + (1.0 - gamma)
  else:
    scale = jnp.ones_like(dots)
  scale = jnp.where(is_core, 1.0, scale)
  core_coeff = 1.0 - jnp.sum(jnp.where(is_core, 0.0, scale * proj))
  return (jnp.where(is_core, core_coeff, scale), jnp.square(scale) * projected_sq,
          project.astype(dots.dtype), scale)


def hybrid_grad_balance(
    alpha: float | jax.Array = 1.0,
    gamma: float | jax.Array = 0.1,
    weight_bound: float | jax.Array = 10.0,
    core_index: int = -1,
    per_leaf: bool = False,
    conflict: bool = True,
    magnitude: bool = True,
    num_tasks: int | None = None,
    *,
    clip: float | jax.Array | None = None,
) -> optax.GradientTransformation:
  r"""HTLNet's gradient process: resolve conflicts with, and rescale to, the core.

  Implements Algorithm 1 of Tang et al. (2024). With per-task gradients
  :math:`G_t` of the shared parameters and the core gradient :math:`G_c`, for
  every non-core task :math:`t`:

  .. math::

    G_t &\leftarrow G_t - \alpha \frac{G_t \cdot G_c}{\|G_c\|^2} G_c
      \quad \text{if } G_t \cdot G_c < 0 \qquad \text{(Eq. 16)} \\
    w_t &= \mathrm{clip}\left(\frac{\|G_c\|}{\|G_t\|}, \frac{1}{C}, C\right),
      \qquad G_t \leftarrow \gamma w_t G_t + (1 - \gamma) G_t
      \qquad \text{(Eq. 17)} \\
    G_s &= G_c + \textstyle\sum_{t \ne c} G_t
      \qquad \text{(Algorithm 1, lines 16-17)},

  where :math:`\alpha` is the paper's *projection relax factor* (Algorithm 1's
  input; Table 6 searches :math:`\{10^{-6}, \dots, 10^{-1}, 1\}`, Fig. 8
  sweeps it): :math:`\alpha = 1` projects a conflicting :math:`G_t` fully onto
  the normal plane of :math:`G_c`, smaller values only part of the way. It is
  NOT a step size. :math:`\|G_t\|` in Eq. 17 is the norm after Eq. 16. Dot
  products and norms run over all leaves jointly (the flattened
  :math:`\theta_s`) unless ``per_leaf=True``, which applies the algorithm to
  each leaf separately, in at least float32 with ``Precision.HIGHEST``. Where
  :math:`\|G_t\| = 0` the ratio is taken as 1; where :math:`\|G_c\| = 0` no
  projection happens and :math:`w_t = 1/C`. The output is finite for all-zero
  gradients.

  **Input and output.** Every leaf of ``updates`` is ``[K, *param.shape]``: the
  per-task gradients of that parameter stacked on a leading task axis, the core
  at ``core_index``; the output is :math:`G_s` with the shapes of ``params``
  (``param.shape``, the task axis removed; a gradient, never a parameter step),
  so the transformation goes first in an :func:`optax.chain`, in front of any
  optimizer. ``jax.jacrev`` of a function returning the ``[K]`` vector of task
  losses gives exactly this input (it is a ``jax.vmap`` over one-hot cotangents
  of ONE backward pass). In a model whose towers are task-specific, apply it to
  the shared parameters only (``optax.multi_transform``, docs/optax.md).

  **Defaults are neutral, not tuned**: ``alpha=1, gamma=0.1, weight_bound=10``
  scale a binary gradient by at most 1.9; with a raw-scale MSE core that dwarfs
  the binary losses the process then barely acts. The tuned values belong to
  the data (the configs set theirs; Table 6 searches them).

  **With** :func:`optax.inject_hyperparams`: ``alpha``, ``gamma`` and
  ``weight_bound`` may be traced scalars, so they can be injected (one compiled
  program for every value); every other argument must be listed in
  ``static_args`` (``per_leaf``, ``conflict``, ``magnitude`` are bools, which
  ``inject_hyperparams`` would otherwise turn into arrays)::

    tx = optax.inject_hyperparams(
        hybrid_grad_balance,
        static_args=('core_index', 'per_leaf', 'conflict', 'magnitude', 'num_tasks'))(
            alpha=1.0, gamma=0.5, weight_bound=100.0, num_tasks=3)
    state.hyperparams['gamma'] = 1.0     # takes effect at the next update

  Args:
    alpha: Projection relax factor :math:`\alpha` of Eq. 16, in ``[0, 1]``.
    gamma: Weight :math:`\gamma` of the magnitude-aligned part in Eq. 17.
    weight_bound: The bound :math:`C \ge 1` of Eq. 17's weight :math:`w_t`
      (clipped to ``[1/C, C]``); Table 6's C.
    core_index: Position of the core task on the task axis.
    per_leaf: Apply the algorithm leaf by leaf instead of jointly.
    conflict: Apply the conflict projection of Eq. 16.
    magnitude: Apply the magnitude alignment of Eq. 17.
    num_tasks: K. When given, the state records a
      :class:`~htl_jax.optim.stacked.TaskDiagnostics` of every update (over all
      leaves jointly, also when ``per_leaf=True``) and updates with another K raise
      ``ValueError``; when ``None`` nothing is recorded.
    clip: Deprecated name of ``weight_bound`` (a DeprecationWarning; goes in the
      next release).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`HybridGradBalanceState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> params = {'w': jnp.zeros(2)}
    >>> stacked = {'w': jnp.array([[-1., 1.], [1., 0.]])}  # [aux, core]
    >>> tx = hybrid_grad_balance(num_tasks=2)
    >>> state = tx.init(params)
    >>> combined, state = tx.update(stacked, state)
    >>> print(combined['w'])
    [1. 1.]
    >>> print(state.diagnostics.norm, state.diagnostics.cos_core)
    [1.4142135 1.       ] [-0.70710677  1.        ]
    >>> half_tx = hybrid_grad_balance(alpha=0.5, magnitude=False)
    >>> half, _ = half_tx.update(stacked, half_tx.init(params))
    >>> print(half['w'])
    [0.5 1. ]
    >>> chained = optax.chain(hybrid_grad_balance(), optax.sgd(0.5))
    >>> updates, _ = chained.update(stacked, chained.init(params))
    >>> print(updates['w'])
    [-0.5 -0.5]

  References:
    Tang et al., `Touch the Core: Exploring Task Dependence Among Hybrid
    Targets for Recommendation <https://arxiv.org/abs/2403.17442>`_, RecSys 2024
  """
  weight_bound = stacked_lib.renamed('weight_bound', 'clip', weight_bound, clip,
                                     'hybrid_grad_balance')
  # Values given as arrays (e.g. injected hyperparameters) are the caller's to check;
  # numbers are checked here.
  if isinstance(weight_bound, (int, float)) and weight_bound < 1.0:
    raise ValueError(f'weight_bound must be >= 1 so that [1/C, C] is valid; got '
                     f'{weight_bound}.')
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha (the projection relax factor) must be in [0, 1]; got {alpha}.')
  if num_tasks is not None and num_tasks < 1:
    raise ValueError(f'num_tasks must be positive; got {num_tasks}.')

  def init_fn(params):
    del params
    return HybridGradBalanceState(stacked_lib.no_diagnostics(num_tasks, algorithm1=True))

  def update_fn(updates, state, params=None):
    del params
    size = stacked_lib.leading_size(updates)
    stacked_lib.check_num_tasks(num_tasks, size, 'hybrid_grad_balance')
    core = stacked_lib.task_position(core_index, size)
    leaves, treedef = jax.tree.flatten(updates)
    coeff_fn = functools.partial(_balance_coefficients, core=core, alpha=alpha,
                                 gamma=gamma, clip=weight_bound, conflict=conflict,
                                 magnitude=magnitude)
    groups = [[x] for x in leaves] if per_leaf else [leaves]
    out, processed_sq, projected, factor = [], 0.0, 0.0, 0.0
    for group in groups:
      coeffs, group_sq, group_projected, group_factor = coeff_fn(
          [stacked_lib.as_matrix(x) for x in group])
      out.extend(stacked_lib.combine(coeffs, x) for x in group)
      processed_sq = processed_sq + group_sq
      projected, factor = projected + group_projected, factor + group_factor
    if num_tasks is not None:
      state = HybridGradBalanceState(stacked_lib.diagnostics_of(
          updates, core, processed_sq, projected / len(groups), factor / len(groups)))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from htl_jax.optim import stacked as stacked_lib


# --- HTLNet, Algorithm 1.


class HybridGradBalanceState(NamedTuple):
  """Diagnostics of the last :func:`hybrid_grad_balance` update.

  Attributes:
    task_norms: ``[K]`` norms of the raw per-task gradients (before Eq. 16-17),
      or shape ``[0]`` when the transformation was built without `num_tasks`.
    core_cosine: ``[K]`` cosine of each raw task gradient with the core
      gradient (1 for the core task itself), or shape ``[0]``.
    processed_norms: ``[K]`` norms of the per-task gradients after Eq. 16-17
      (the terms of Algorithm 1's final sum; the core's is its raw norm), or
      shape ``[0]``.
    projected: ``[K]`` 1 where Eq. 16 projected the task's gradient (it
      conflicted with the core's), else 0; with ``per_leaf`` the share of leaves.
      Shape ``[0]`` without `num_tasks`.
    magnitude_factor: ``[K]`` the factor Eq. 17 multiplied the task's gradient
      by, ``gamma * w_t + 1 - gamma`` (1 for the core and with Eq. 17 off); with
      ``per_leaf`` the mean over leaves. Shape ``[0]`` without `num_tasks`.
  """
  task_norms: jax.Array
  core_cosine: jax.Array
  processed_norms: jax.Array
  projected: jax.Array
  magnitude_factor: jax.Array


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
    clip: float | jax.Array = 10.0,
    core_index: int = -1,
    per_leaf: bool = False,
    conflict: bool = True,
    magnitude: bool = True,
    num_tasks: int | None = None,
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
  each leaf separately. Where :math:`\|G_t\| = 0` the ratio is taken as 1;
  where :math:`\|G_c\| = 0` no projection happens and :math:`w_t = 1/C`. The
  output is finite for all-zero gradients.

  Every leaf of ``updates`` has a leading task axis of size K; the output is
  the combined gradient :math:`G_s` with that axis removed (a gradient, never
  a parameter step), so the transformation goes first in an
  :func:`optax.chain`, in front of any optimizer.

  Args:
    alpha: Projection relax factor :math:`\alpha` of Eq. 16, in ``[0, 1]``.
    gamma: Weight :math:`\gamma` of the magnitude-aligned part in Eq. 17.
    clip: Clip bound :math:`C \ge 1` of the weight :math:`w_t` in Eq. 17.
      ``alpha``, ``gamma`` and ``clip`` may be scalar arrays (traced values), so one
      compiled program serves every value.
    core_index: Position of the core task on the task axis.
    per_leaf: Apply the algorithm leaf by leaf instead of jointly.
    conflict: Apply the conflict projection of Eq. 16.
    magnitude: Apply the magnitude alignment of Eq. 17.
    num_tasks: K. When given, the state records the norms of the raw per-task
      gradients, their cosine with the core gradient and the norms of the
      processed per-task gradients at the last update (over all leaves
      jointly, also when ``per_leaf=True``); when ``None`` the state holds
      empty arrays and nothing is recorded.

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
    >>> print(state.task_norms, state.core_cosine)
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
  # Values given as arrays (e.g. read from a train state inside a compiled step) are the
  # caller's to check; numbers are checked here.
  if isinstance(clip, (int, float)) and clip < 1.0:
    raise ValueError(f'clip must be >= 1 so that [1/clip, clip] is valid; got {clip}.')
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha (the projection relax factor) must be in [0, 1]; got {alpha}.')
  if num_tasks is not None and num_tasks < 1:
    raise ValueError(f'num_tasks must be positive; got {num_tasks}.')
  diag_size = 0 if num_tasks is None else num_tasks

  def init_fn(params):
    del params
    zeros = jnp.zeros((diag_size,), jnp.float32)
    return HybridGradBalanceState(task_norms=zeros, core_cosine=zeros,
                                  processed_norms=zeros, projected=zeros,
                                  magnitude_factor=jnp.ones((diag_size,), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    size = stacked_lib.leading_size(updates)
    stacked_lib.check_num_tasks(num_tasks, size, 'hybrid_grad_balance')
    core = stacked_lib.task_position(core_index, size)
    leaves, treedef = jax.tree.flatten(updates)
    coeff_fn = functools.partial(_balance_coefficients, core=core, alpha=alpha,
                                 gamma=gamma, clip=clip, conflict=conflict,
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
      norms, cosines = stacked_lib.task_norms_and_cosines(updates, core)
      dtype = state.task_norms.dtype
      state = HybridGradBalanceState(
          task_norms=norms.astype(dtype), core_cosine=cosines.astype(dtype),
          processed_norms=jnp.sqrt(processed_sq).astype(dtype),
          projected=(projected / len(groups)).astype(dtype),
          magnitude_factor=(factor / len(groups)).astype(dtype))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)

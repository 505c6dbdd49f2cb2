"""Multi-task gradient processes as Optax gradient transformations.

Every transformation here follows one *stacked-input* contract: each leaf of the
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
float32 inputs to TF32. This module depends on jax, optax and numpy only.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


# --- Shared helpers.


def _leading_size(updates: Any) -> int:
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


def _check_num_tasks(num_tasks: int | None, size: int, name: str) -> None:
  if num_tasks is not None and num_tasks != size:
    raise ValueError(f'{name} was built with num_tasks={num_tasks} but the stacked '
                     f'gradients have a task axis of size {size}.')


def _task_position(index: int, size: int) -> int:
  """Normalises a (possibly negative) task index into ``[0, size)``."""
  if not -size <= index < size:
    raise ValueError(f'Task index {index} is out of range for {size} tasks.')
  return index % size


def _as_matrix(leaf: jax.Array) -> jax.Array:
  """Views a stacked leaf ``[K, ...]`` as ``[K, n]`` in at least float32."""
  dtype = jnp.promote_types(leaf.dtype, jnp.float32)
  return leaf.reshape(leaf.shape[0], int(np.prod(leaf.shape[1:]))).astype(dtype)


def _safe_div(num: jax.Array, den: jax.Array, default: float) -> jax.Array:
  """``num / den`` where ``den > 0``, else ``default`` (no NaN anywhere)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), default)


def _combine(coeffs: jax.Array, leaf: jax.Array) -> jax.Array:
  """``sum_k coeffs[k] * leaf[k]``: removes the task axis of one leaf."""
  out = jnp.tensordot(coeffs.astype(leaf.dtype), leaf, axes=1, precision=_HIGHEST)
  return out.astype(leaf.dtype)


def _gram(matrices: list[jax.Array]) -> jax.Array:
  """``[K, K]`` matrix of joint dot products ``G_i . G_j`` over all leaves."""
  return sum(jnp.einsum('kn,ln->kl', m, m, precision=_HIGHEST) for m in matrices)


def _core_dots(matrices: list[jax.Array], core: int) -> jax.Array:
  """``[K]`` joint dot products ``G_k . G_core`` over all leaves."""
  return sum(jnp.einsum('kn,n->k', m, m[core], precision=_HIGHEST) for m in matrices)


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
  size = _leading_size(stacked_grads)
  core = _task_position(core_index, size)
  matrices = [_as_matrix(x) for x in jax.tree.leaves(stacked_grads)]
  dots = _core_dots(matrices, core)
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(m), axis=1) for m in matrices))
  cosines = _safe_div(dots, norms * norms[core], 0.0)
  return norms, cosines.at[core].set(1.0)


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
  """
  task_norms: jax.Array
  core_cosine: jax.Array
  processed_norms: jax.Array


def _balance_coefficients(
    matrices: list[jax.Array], core: int, alpha: float, gamma: float, clip: float,
    conflict: bool, magnitude: bool) -> tuple[jax.Array, jax.Array]:
  """Algorithm 1 on `matrices` (leaves viewed as ``[K, n]``), as coefficients.

  Eq. 16 writes the projected gradient as ``G_t - c_t G_core`` with
  ``c_t = alpha * (G_t . G_core) / ||G_core||^2`` where the dot product is
  negative (else 0), and Eq. 17 scales it by ``s_t = gamma * w_t + (1 - gamma)``,
  so the output ``G_core + sum_t s_t (G_t - c_t G_core)`` is linear in the raw
  gradients. Dot products and norms run over all of `matrices` jointly.

  Returns:
    ``(a, processed_sq)``: ``[K]`` coefficients with ``sum_k a_k G_k`` =
    Algorithm 1's output, and ``[K]`` squared norms of each task's term of that
    sum, ``||s_t (G_t - c_t G_core)||^2`` (the core's: ``||G_core||^2``).
  """
  is_core = jnp.arange(matrices[0].shape[0]) == core
  dots = _core_dots(matrices, core)
  core_sq = dots[core]
  if conflict:
    project = jnp.logical_and(dots < 0, ~is_core)
    proj = jnp.where(project, alpha * _safe_div(dots, core_sq, 0.0), 0.0)
  else:
    proj = jnp.zeros_like(dots)
  # Norm AFTER the projection, computed from the projected vectors themselves
  # (not from ||G_t||^2 - c_t^2 ||G_core||^2, which cancels badly).
  projected_sq = sum(
      jnp.sum(jnp.square(m - proj[:, None] * m[core][None, :]), axis=1)
      for m in matrices)
  if magnitude:
    ratio = _safe_div(jnp.sqrt(core_sq), jnp.sqrt(projected_sq), 1.0)
    weight = jnp.clip(ratio, 1.0 / clip, clip)
    scale = gamma * weight + (1.0 - gamma)
  else:
    scale = jnp.ones_like(dots)
  scale = jnp.where(is_core, 1.0, scale)
  core_coeff = 1.0 - jnp.sum(jnp.where(is_core, 0.0, scale * proj))
  return jnp.where(is_core, core_coeff, scale), jnp.square(scale) * projected_sq


def hybrid_grad_balance(
    alpha: float = 1.0,
    gamma: float = 0.1,
    clip: float = 10.0,
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
  if clip < 1.0:
    raise ValueError(f'clip must be >= 1 so that [1/clip, clip] is valid; got {clip}.')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha (the projection relax factor) must be in [0, 1]; got {alpha}.')
  if num_tasks is not None and num_tasks < 1:
    raise ValueError(f'num_tasks must be positive; got {num_tasks}.')
  diag_size = 0 if num_tasks is None else num_tasks

  def init_fn(params):
    del params
    zeros = jnp.zeros((diag_size,), jnp.float32)
    return HybridGradBalanceState(task_norms=zeros, core_cosine=zeros,
                                  processed_norms=zeros)

  def update_fn(updates, state, params=None):
    del params
    size = _leading_size(updates)
    _check_num_tasks(num_tasks, size, 'hybrid_grad_balance')
    core = _task_position(core_index, size)
    leaves, treedef = jax.tree.flatten(updates)
    coeff_fn = functools.partial(_balance_coefficients, core=core, alpha=alpha,
                                 gamma=gamma, clip=clip, conflict=conflict,
                                 magnitude=magnitude)
    groups = [[x] for x in leaves] if per_leaf else [leaves]
    out, processed_sq = [], 0.0
    for group in groups:
      coeffs, group_sq = coeff_fn([_as_matrix(x) for x in group])
      out.extend(_combine(coeffs, x) for x in group)
      processed_sq = processed_sq + group_sq
    if num_tasks is not None:
      norms, cosines = task_norms_and_cosines(updates, core)
      dtype = state.task_norms.dtype
      state = HybridGradBalanceState(
          task_norms=norms.astype(dtype), core_cosine=cosines.astype(dtype),
          processed_norms=jnp.sqrt(processed_sq).astype(dtype))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


# --- PCGrad (Yu et al., 2020).


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: Raw ``uint32[2]`` PRNG key; split once per update to draw task orders.
    processed_norms: ``[K]`` norms of the projected per-task gradients
      :math:`g_i^{PC}` at the last update (joint over all leaves), or shape
      ``[0]`` when the transformation was built without `num_tasks`.
  """
  key: jax.Array
  processed_norms: jax.Array


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
  coeffs, _ = _pcgrad_coefficients(leaves, orders)
  weights = jnp.sum(coeffs, axis=0)
  return jax.tree.unflatten(treedef, [_combine(weights, x) for x in leaves])


def _pcgrad_coefficients(leaves: list[jax.Array], orders: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """``[K, K]`` coefficients ``C`` with ``g_i^PC = sum_j C_ij g_j``, and the Gram matrix."""
  size = _leading_size(leaves)
  gram = _gram([_as_matrix(x) for x in leaves])
  sq_norms = jnp.diagonal(gram)
  orders = jnp.asarray(orders, jnp.int32).reshape(size, size - 1)

  def visit(position, coeffs):
    # coeffs[i] holds g_i^PC in the basis of the original gradients.
    other = orders[:, position]
    dots = jnp.sum(coeffs * gram[other], axis=1)  # g_i^PC . g_other[i]
    step = jnp.where(dots < 0, _safe_div(dots, sq_norms[other], 0.0), 0.0)
    return coeffs - step[:, None] * jax.nn.one_hot(other, size, dtype=gram.dtype)

  coeffs = jax.lax.fori_loop(0, size - 1, visit, jnp.eye(size, dtype=gram.dtype))
  return coeffs, gram


def pcgrad(seed: int = 0, num_tasks: int | None = None) -> optax.GradientTransformation:
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
    num_tasks: K, optional; when given, updates whose task axis has another
      size raise ``ValueError``.

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

  diag_size = 0 if num_tasks is None else num_tasks

  def init_fn(params):
    del params
    return PCGradState(key=jax.random.PRNGKey(seed),
                       processed_norms=jnp.zeros((diag_size,), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    size = _leading_size(updates)
    _check_num_tasks(num_tasks, size, 'pcgrad')
    key, subkey = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    coeffs, gram = _pcgrad_coefficients(leaves, pcgrad_task_orders(subkey, size))
    weights = jnp.sum(coeffs, axis=0)
    combined = jax.tree.unflatten(treedef, [_combine(weights, x) for x in leaves])
    processed = state.processed_norms
    if num_tasks is not None:
      processed_sq = jnp.einsum('ij,jl,il->i', coeffs, gram, coeffs, precision=_HIGHEST)
      processed = jnp.sqrt(jnp.maximum(processed_sq, 0.0)).astype(processed.dtype)
    return combined, PCGradState(key=key, processed_norms=processed)

  return optax.GradientTransformation(init_fn, update_fn)


# --- MetaBalance (He et al., 2022).


class MetaBalanceState(NamedTuple):
  """State of :func:`metabalance`.

  Attributes:
    norm_ema: Pytree mirroring ``params``; each leaf is a ``[K]`` array of the
      moving averages of the per-task gradient norms of that parameter.
    processed_norms: ``[K]`` norms of the rescaled per-task gradients at the
      last update, joint over all leaves.
  """
  norm_ema: Any
  processed_norms: jax.Array


def metabalance(
    num_tasks: int,
    beta: float = 0.9,
    relax: float = 0.7,
    target_index: int = -1,
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
  :math:`m_k = 0` the ratio is taken as 1.

  Args:
    num_tasks: K, the size of the task axis (the state holds ``[K]`` per leaf).
    beta: Decay :math:`\beta` of the moving averages of the norms.
    relax: Relax factor :math:`r` in ``[0, 1]``.
    target_index: Position of the target (core) task on the task axis.

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
  if num_tasks < 1:
    raise ValueError(f'num_tasks must be positive; got {num_tasks}.')
  if not 0.0 <= beta < 1.0:
    raise ValueError(f'beta must be in [0, 1); got {beta}.')
  if not 0.0 <= relax <= 1.0:
    raise ValueError(f'relax must be in [0, 1]; got {relax}.')
  target = _task_position(target_index, num_tasks)

  def init_fn(params):
    return MetaBalanceState(
        norm_ema=jax.tree.map(
            lambda p: jnp.zeros((num_tasks,),
                                jnp.promote_types(jnp.result_type(p), jnp.float32)),
            params),
        processed_norms=jnp.zeros((num_tasks,), jnp.float32))

  def new_average(grad, ema):
    norms = jnp.sqrt(jnp.sum(jnp.square(_as_matrix(grad)), axis=1))
    return (beta * ema + (1.0 - beta) * norms).astype(ema.dtype)

  def scales(ema):
    ratio = _safe_div(ema[target], ema, 1.0)
    return jnp.where(jnp.arange(num_tasks) == target, 1.0, relax * ratio + (1.0 - relax))

  def processed_sq(grad, ema):
    return jnp.square(scales(ema)) * jnp.sum(jnp.square(_as_matrix(grad)), axis=1)

  def update_fn(updates, state, params=None):
    del params
    _check_num_tasks(num_tasks, _leading_size(updates), 'metabalance')
    norm_ema = jax.tree.map(new_average, updates, state.norm_ema)
    combined = jax.tree.map(lambda g, ema: _combine(scales(ema), g), updates, norm_ema)
    processed = sum(jax.tree.leaves(jax.tree.map(processed_sq, updates, norm_ema)))
    return combined, MetaBalanceState(
        norm_ema=norm_ema,
        processed_norms=jnp.sqrt(processed).astype(state.processed_norms.dtype))

  return optax.GradientTransformation(init_fn, update_fn)

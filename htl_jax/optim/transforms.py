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
  """
  task_norms: jax.Array
  core_cosine: jax.Array


def _balance_coefficients(
    matrices: list[jax.Array], core: int, gamma: float, clip: float,
    conflict: bool, magnitude: bool) -> jax.Array:
  """``[K]`` coefficients ``a`` with ``sum_k a_k G_k`` = Algorithm 1's output.

  Eq. 16 writes the projected gradient as ``G_t - c_t G_core`` and Eq. 17 scales
  it by ``s_t = gamma * w_t + (1 - gamma)``, so the output
  ``G_core + sum_t s_t (G_t - c_t G_core)`` is linear in the raw gradients.
  Dot products and norms run over all of `matrices` (leaves viewed as [K, n]).
  """
  is_core = jnp.arange(matrices[0].shape[0]) == core
  dots = _core_dots(matrices, core)
  core_sq = dots[core]
  if conflict:
    project = jnp.logical_and(dots < 0, ~is_core)
    proj = jnp.where(project, _safe_div(dots, core_sq, 0.0), 0.0)
  else:
    proj = jnp.zeros_like(dots)
  if magnitude:
    # Norm AFTER the projection, computed from the projected vectors themselves
    # (not from ||G_t||^2 - c_t^2 ||G_core||^2, which cancels badly).
    projected_sq = sum(
        jnp.sum(jnp.square(m - proj[:, None] * m[core][None, :]), axis=1)
        for m in matrices)
    ratio = _safe_div(jnp.sqrt(core_sq), jnp.sqrt(projected_sq), 1.0)
    weight = jnp.clip(ratio, 1.0 / clip, clip)
    scale = gamma * weight + (1.0 - gamma)
  else:
    scale = jnp.ones_like(dots)
  scale = jnp.where(is_core, 1.0, scale)
  core_coeff = 1.0 - jnp.sum(jnp.where(is_core, 0.0, scale * proj))
  return jnp.where(is_core, core_coeff, scale)


def hybrid_grad_balance(
    alpha: float | None = None,
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

    G_t &\leftarrow G_t - \frac{G_t \cdot G_c}{\|G_c\|^2} G_c
      \quad \text{if } G_t \cdot G_c < 0 \qquad \text{(Eq. 16)} \\
    w_t &= \mathrm{clip}\left(\frac{\|G_c\|}{\|G_t\|}, \frac{1}{C}, C\right),
      \qquad G_t \leftarrow \gamma w_t G_t + (1 - \gamma) G_t
      \qquad \text{(Eq. 17)} \\
    G &= G_c + \textstyle\sum_{t \ne c} G_t ,

  where :math:`\|G_t\|` in Eq. 17 is the norm after Eq. 16. Dot products and
  norms run over all leaves jointly (the flattened :math:`\theta_s`) unless
  ``per_leaf=True``, which applies the algorithm to each leaf separately. Where
  :math:`\|G_t\| = 0` the ratio is taken as 1; where :math:`\|G_c\| = 0` no
  projection happens and :math:`w_t = 1/C`. The output is finite for all-zero
  gradients.

  Every leaf of ``updates`` has a leading task axis of size K; the output drops
  it. Algorithm 1 ends with the step :math:`\theta_s \leftarrow \theta_s -
  \alpha G`. With ``alpha=None`` the transformation returns :math:`G` itself:
  put it first in :func:`optax.chain`, in front of an optimizer. With a float
  ``alpha`` it returns the full update :math:`-\alpha G`, a stand-alone SGD
  optimizer for :math:`\theta_s`; do NOT chain that with another optimizer
  (e.g. ``optax.adam`` would follow the sign-flipped direction and ascend).

  Args:
    alpha: Step size of Algorithm 1, or ``None`` to return the combined
      gradient (for chaining with an optimizer).
    gamma: Weight :math:`\gamma` of the magnitude-aligned part in Eq. 17.
    clip: Clip bound :math:`C \ge 1` of the weight :math:`w_t` in Eq. 17.
    core_index: Position of the core task on the task axis.
    per_leaf: Apply the algorithm leaf by leaf instead of jointly.
    conflict: Apply the conflict projection of Eq. 16.
    magnitude: Apply the magnitude alignment of Eq. 17.
    num_tasks: K. When given, the state records the norms of the raw per-task
      gradients and their cosine with the core gradient at the last update
      (over all leaves jointly, also when ``per_leaf=True``); when ``None`` the
      state holds empty arrays and nothing is recorded.

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
  if num_tasks is not None and num_tasks < 1:
    raise ValueError(f'num_tasks must be positive; got {num_tasks}.')
  diag_size = 0 if num_tasks is None else num_tasks

  def init_fn(params):
    del params
    zeros = jnp.zeros((diag_size,), jnp.float32)
    return HybridGradBalanceState(task_norms=zeros, core_cosine=zeros)

  def update_fn(updates, state, params=None):
    del params
    size = _leading_size(updates)
    _check_num_tasks(num_tasks, size, 'hybrid_grad_balance')
    core = _task_position(core_index, size)
    leaves, treedef = jax.tree.flatten(updates)
    coeff_fn = functools.partial(_balance_coefficients, core=core, gamma=gamma,
                                 clip=clip, conflict=conflict, magnitude=magnitude)
    if per_leaf:
      out = [_combine(coeff_fn([_as_matrix(x)]), x) for x in leaves]
    else:
      coeffs = coeff_fn([_as_matrix(x) for x in leaves])
      out = [_combine(coeffs, x) for x in leaves]
    if alpha is not None:
      out = [(-alpha * x).astype(x.dtype) for x in out]
    if num_tasks is not None:
      norms, cosines = task_norms_and_cosines(updates, core)
      state = HybridGradBalanceState(
          task_norms=norms.astype(state.task_norms.dtype),
          core_cosine=cosines.astype(state.core_cosine.dtype))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


# --- PCGrad (Yu et al., 2020).


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: Raw ``uint32[2]`` PRNG key; split once per update to draw task orders.
  """
  key: jax.Array


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
  size = _leading_size(stacked)
  leaves, treedef = jax.tree.flatten(stacked)
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
  weights = jnp.sum(coeffs, axis=0)
  return jax.tree.unflatten(treedef, [_combine(weights, x) for x in leaves])


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

  def init_fn(params):
    del params
    return PCGradState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None):
    del params
    size = _leading_size(updates)
    _check_num_tasks(num_tasks, size, 'pcgrad')
    key, subkey = jax.random.split(state.key)
    combined = pcgrad_combine(updates, pcgrad_task_orders(subkey, size))
    return combined, PCGradState(key=key)

  return optax.GradientTransformation(init_fn, update_fn)


# --- MetaBalance (He et al., 2022).


class MetaBalanceState(NamedTuple):
  """State of :func:`metabalance`.

  Attributes:
    norm_ema: Pytree mirroring ``params``; each leaf is a ``[K]`` array of the
      moving averages of the per-task gradient norms of that parameter.
  """
  norm_ema: Any


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
    return MetaBalanceState(norm_ema=jax.tree.map(
        lambda p: jnp.zeros((num_tasks,), jnp.promote_types(jnp.result_type(p), jnp.float32)),
        params))

  def new_average(grad, ema):
    norms = jnp.sqrt(jnp.sum(jnp.square(_as_matrix(grad)), axis=1))
    return (beta * ema + (1.0 - beta) * norms).astype(ema.dtype)

  def rescale(grad, ema):
    ratio = _safe_div(ema[target], ema, 1.0)
    scale = jnp.where(jnp.arange(num_tasks) == target, 1.0, relax * ratio + (1.0 - relax))
    return _combine(scale, grad)

  def update_fn(updates, state, params=None):
    del params
    _check_num_tasks(num_tasks, _leading_size(updates), 'metabalance')
    norm_ema = jax.tree.map(new_average, updates, state.norm_ema)
    combined = jax.tree.map(rescale, updates, norm_ema)
    return combined, MetaBalanceState(norm_ema=norm_ema)

  return optax.GradientTransformation(init_fn, update_fn)

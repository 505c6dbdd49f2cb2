"""Tests for htl_jax.optim.transforms against float64 numpy loop references.

The transformations run in float32; the references below are written
independently with plain loops over tasks in float64 on the same (float32
representable) inputs.
"""

from __future__ import annotations

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htl_jax.optim import meta_balance as metabalance_lib
from htl_jax.optim import gradient_surgery as pcgrad_lib
from htl_jax.optim import stacked as stacked_lib
from htl_jax.optim import transforms
from htl_jax.optim import (
    HybridGradBalanceState, MetaBalanceState, PCGradState, hybrid_grad_balance,
    metabalance, pcgrad, pcgrad_combine, pcgrad_task_orders,
    task_norms_and_cosines)

LEAF_SHAPES = {'emb': (4, 3), 'bias': (5,)}
_task_orders = jax.jit(pcgrad_task_orders, static_argnums=1)


# ----------------------------------------------------------------------------
# float64 references.
# ----------------------------------------------------------------------------


def _flatten(tree: dict[str, np.ndarray]) -> np.ndarray:
  """[K, N] float64 matrix of a stacked dict (keys in sorted order)."""
  k = next(iter(tree.values())).shape[0]
  return np.concatenate(
      [np.asarray(tree[n], np.float64).reshape(k, -1) for n in sorted(tree)], 1)


def _unflatten(vec: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, start = {}, 0
  for name in sorted(like):
    shape = like[name].shape[1:]
    size = int(np.prod(shape))
    out[name] = vec[start:start + size].reshape(shape)
    start += size
  return out


def ref_algorithm1_terms(g: np.ndarray, core: int, gamma: float, clip: float,
                         conflict: bool = True, magnitude: bool = True,
                         alpha: float = 1.0) -> list[np.ndarray]:
  """HTLNet Algorithm 1 on a [K, N] matrix, one task at a time: the K terms of G_s."""
  g_core = g[core]
  terms = []
  for t in range(g.shape[0]):
    if t == core:
      terms.append(g_core.copy())
      continue
    g_t = g[t].copy()
    dot = float(g_t @ g_core)
    if conflict and dot < 0:                                    # Eq. 16
      g_t = g_t - alpha * dot / float(g_core @ g_core) * g_core
    if magnitude:                                               # Eq. 17
      norm_t = np.linalg.norm(g_t)
      w = np.linalg.norm(g_core) / norm_t if norm_t > 0 else 1.0
      w = min(max(w, 1.0 / clip), clip)
      g_t = gamma * w * g_t + (1 - gamma) * g_t
    terms.append(g_t)
  return terms


def ref_algorithm1(g: np.ndarray, core: int, gamma: float, clip: float,
                   conflict: bool = True, magnitude: bool = True,
                   alpha: float = 1.0) -> np.ndarray:
  """G_s = G_core + sum_t G_t (Algorithm 1, lines 16-17)."""
  return np.sum(ref_algorithm1_terms(g, core, gamma, clip, conflict, magnitude, alpha), 0)


def ref_hybrid(tree, core=-1, gamma=0.1, clip=10.0, conflict=True,
               magnitude=True, per_leaf=False, alpha=1.0):
  k = next(iter(tree.values())).shape[0]
  core = core % k
  if per_leaf:
    return {n: ref_algorithm1(np.asarray(x, np.float64).reshape(k, -1), core,
                              gamma, clip, conflict, magnitude, alpha).reshape(x.shape[1:])
            for n, x in tree.items()}
  return _unflatten(
      ref_algorithm1(_flatten(tree), core, gamma, clip, conflict, magnitude, alpha), tree)


def ref_processed_norms(tree, core=-1, gamma=0.1, clip=10.0, per_leaf=False, alpha=1.0):
  """Norms of Algorithm 1's per-task terms, joint over all leaves."""
  k = next(iter(tree.values())).shape[0]
  groups = ([np.asarray(x, np.float64).reshape(k, -1) for _, x in sorted(tree.items())]
            if per_leaf else [_flatten(tree)])
  sq = np.zeros(k)
  for g in groups:
    terms = ref_algorithm1_terms(g, core % k, gamma, clip, alpha=alpha)
    sq += np.array([float(t @ t) for t in terms])
  return np.sqrt(sq)


def ref_pcgrad(tree, orders) -> dict[str, np.ndarray]:
  """Yu et al. Algorithm 1 with a given visiting order per task."""
  g = _flatten(tree)
  total = np.zeros(g.shape[1])
  for i in range(g.shape[0]):
    g_pc = g[i].copy()
    for j in orders[i]:
      dot = float(g_pc @ g[j])
      if dot < 0:
        g_pc = g_pc - dot / float(g[j] @ g[j]) * g[j]
    total = total + g_pc
  return _unflatten(total, tree)


def ref_pcgrad_norms(tree, orders) -> np.ndarray:
  """Norms of the projected per-task gradients g_i^PC."""
  g = _flatten(tree)
  norms = []
  for i in range(g.shape[0]):
    g_pc = g[i].copy()
    for j in orders[i]:
      dot = float(g_pc @ g[j])
      if dot < 0:
        g_pc = g_pc - dot / float(g[j] @ g[j]) * g[j]
    norms.append(np.linalg.norm(g_pc))
  return np.array(norms)


def ref_metabalance(steps, beta, relax, target):
  """MetaBalance over a list of stacked dicts; returns outputs and last EMA."""
  k = next(iter(steps[0].values())).shape[0]
  ema = {n: np.zeros(k) for n in steps[0]}
  outputs = []
  for tree in steps:
    out = {}
    processed_sq = np.zeros(k)
    for name, x in tree.items():
      g = np.asarray(x, np.float64).reshape(k, -1)
      for t in range(k):
        ema[name][t] = beta * ema[name][t] + (1 - beta) * np.linalg.norm(g[t])
      total = np.zeros(g.shape[1])
      for t in range(k):
        g_t = g[t]
        if t != target and ema[name][t] > 0:
          g_t = g_t * ema[name][target] / ema[name][t] * relax + g_t * (1 - relax)
        total = total + g_t
        processed_sq[t] += float(g_t @ g_t)
      out[name] = total.reshape(x.shape[1:])
    outputs.append(out)
  return outputs, ema, np.sqrt(processed_sq)


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _stacked(seed: int, k: int = 3, scales=None) -> dict[str, np.ndarray]:
  """Random float32 stacked gradients; `scales[t]` multiplies task t."""
  rng = np.random.default_rng(seed)
  tree = {n: rng.normal(size=(k,) + s).astype(np.float32)
          for n, s in LEAF_SHAPES.items()}
  if scales is not None:
    scales = np.asarray(scales, np.float32)
    tree = {n: x * scales.reshape((k,) + (1,) * (x.ndim - 1))
            for n, x in tree.items()}
  return tree


def _params(k: int = 3) -> dict[str, jax.Array]:
  del k
  return {n: jnp.zeros(s) for n, s in LEAF_SHAPES.items()}


def _assert_tree_close(actual, expected, scale: float, rtol: float = 1e-5):
  assert sorted(actual) == sorted(expected)
  for name in expected:
    a = np.asarray(actual[name])
    assert a.shape == expected[name].shape, name
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, expected[name], rtol=rtol, atol=2e-6 * scale,
                               err_msg=name)


def _scale(tree) -> float:
  return max(float(np.max(np.abs(x))) for x in tree.values())


def _run(tx, tree):
  state = tx.init(_params())
  return tx.update(jax.tree.map(jnp.asarray, tree), state)


def _conflicting(k: int = 3, core: int = -1) -> dict[str, np.ndarray]:
  """Aux tasks anti-aligned with the core task, plus noise."""
  tree = _stacked(7, k)
  aux = [t for t in range(k) if t != core % k]
  for x in tree.values():
    x[aux] = -1.5 * x[core] + 0.3 * x[aux]
  return tree


# ----------------------------------------------------------------------------
# hybrid_grad_balance.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('core_index', [-1, 0])
def test_hybrid_conflicting_matches_reference(core_index):
  tree = _conflicting(core=core_index)
  g = _flatten(tree)
  core = core_index % 3
  assert all(g[t] @ g[core] < 0 for t in range(3) if t != core)
  out, _ = _run(hybrid_grad_balance(core_index=core_index), tree)
  _assert_tree_close(out, ref_hybrid(tree, core=core_index), _scale(tree))


def test_hybrid_aligned_only_rescales():
  tree = _stacked(1)
  for name, x in tree.items():
    x[:] = np.abs(x) * np.array([1.0, 3.0, 0.5], np.float32).reshape(
        (3,) + (1,) * (x.ndim - 1))
  out, _ = _run(hybrid_grad_balance(gamma=0.3), tree)
  expected = ref_hybrid(tree, gamma=0.3)
  _assert_tree_close(out, expected, _scale(tree))
  # Without conflicts Eq. 16 is a no-op: switching it off changes nothing.
  out_no_conflict, _ = _run(hybrid_grad_balance(gamma=0.3, conflict=False), tree)
  _assert_tree_close(out_no_conflict, expected, _scale(tree))


def test_hybrid_badly_scaled_clips_both_sides():
  tree = _stacked(2, k=3, scales=[1e2, 1e-2, 1.0])
  g = _flatten(tree)
  ratios = [np.linalg.norm(g[2]) / np.linalg.norm(g[t]) for t in (0, 1)]
  assert ratios[0] < 1 / 10 and ratios[1] > 10  # the clip is active both ways
  out, _ = _run(hybrid_grad_balance(gamma=0.5, weight_bound=10.0), tree)
  expected = ref_hybrid(tree, gamma=0.5, clip=10.0)
  _assert_tree_close(out, expected, _scale(tree))
  # The clip matters: an unclipped reference differs.
  unclipped = ref_hybrid(tree, gamma=0.5, clip=1e9)
  assert not np.allclose(_flatten({n: v[None] for n, v in unclipped.items()}),
                         _flatten({n: v[None] for n, v in expected.items()}))


@pytest.mark.parametrize('zero_tasks', [(0, 1, 2), (2,), (0,)])
def test_hybrid_zero_gradients_are_finite(zero_tasks):
  tree = _conflicting()
  for x in tree.values():
    x[list(zero_tasks)] = 0.0
  out, state = _run(hybrid_grad_balance(num_tasks=3), tree)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in out.values())
  assert np.all(np.isfinite(np.asarray(state.diagnostics.norm)))
  assert np.all(np.isfinite(np.asarray(state.diagnostics.cos_core)))
  # Zero gradients have cosine 0 with the core; the core has cosine 1 with itself.
  expected_cos = [1.0 if t == 2 else 0.0 for t in range(3)] if 2 in zero_tasks else None
  if expected_cos is not None:
    np.testing.assert_array_equal(state.diagnostics.cos_core, expected_cos)
  _assert_tree_close(out, ref_hybrid(tree), max(_scale(tree), 1.0))


def test_hybrid_per_leaf_differs_from_joint_and_both_match():
  tree = _conflicting()
  tree['bias'] = -tree['bias']  # leaf-level conflicts now differ from joint ones
  joint, _ = _run(hybrid_grad_balance(), tree)
  per_leaf, _ = _run(hybrid_grad_balance(per_leaf=True), tree)
  scale = _scale(tree)
  _assert_tree_close(joint, ref_hybrid(tree), scale)
  _assert_tree_close(per_leaf, ref_hybrid(tree, per_leaf=True), scale)
  assert not np.allclose(np.asarray(joint['bias']), np.asarray(per_leaf['bias']),
                         atol=1e-3)


@pytest.mark.parametrize('conflict,magnitude',
                         list(itertools.product([True, False], repeat=2)))
def test_hybrid_switches(conflict, magnitude):
  tree = _conflicting()
  tx = hybrid_grad_balance(gamma=0.4, conflict=conflict, magnitude=magnitude)
  out, _ = _run(tx, tree)
  expected = ref_hybrid(tree, gamma=0.4, conflict=conflict, magnitude=magnitude)
  _assert_tree_close(out, expected, _scale(tree))
  if not conflict and not magnitude:
    _assert_tree_close(out, {n: x.astype(np.float64).sum(0) for n, x in tree.items()},
                       _scale(tree))


def _aligned() -> dict[str, np.ndarray]:
  tree = _stacked(1)
  for x in tree.values():
    x[:] = np.abs(x) * np.array([1.0, 3.0, 0.5], np.float32).reshape(
        (3,) + (1,) * (x.ndim - 1))
  return tree


GRADIENT_CASES = {
    'conflicting': _conflicting,
    'aligned': _aligned,
    'badly_scaled': lambda: _stacked(2, k=3, scales=[1e2, 1e-2, 1.0]),
    'all_zero': lambda: {n: np.zeros((3,) + s, np.float32) for n, s in LEAF_SHAPES.items()},
}


@pytest.mark.parametrize('per_leaf', [False, True], ids=['joint', 'per_leaf'])
@pytest.mark.parametrize('case', sorted(GRADIENT_CASES))
@pytest.mark.parametrize('alpha', [1e-6, 1e-3, 0.5, 1.0])
def test_hybrid_alpha_matches_algorithm1(alpha, case, per_leaf):
  """Eq. 16 with the projection relax factor alpha, then Eq. 17, then G_s."""
  tree = GRADIENT_CASES[case]()
  tx = hybrid_grad_balance(alpha=alpha, gamma=0.3, weight_bound=10.0, per_leaf=per_leaf,
                           num_tasks=3)
  out, state = _run(tx, tree)
  scale = max(_scale(tree), 1.0)
  _assert_tree_close(out, ref_hybrid(tree, gamma=0.3, per_leaf=per_leaf, alpha=alpha),
                     scale)
  np.testing.assert_allclose(
      state.diagnostics.norm_processed,
      ref_processed_norms(tree, gamma=0.3, per_leaf=per_leaf, alpha=alpha),
      rtol=1e-5, atol=2e-6 * scale)


def test_hybrid_alpha_scales_the_projection():
  """alpha interpolates between no projection (0) and the full one (1)."""
  tree = _conflicting()
  outs = {a: _flatten({n: v[None] for n, v in _run(
      hybrid_grad_balance(alpha=a, magnitude=False), tree)[0].items()})[0]
          for a in (0.0, 0.5, 1.0)}
  np.testing.assert_allclose(outs[0.0], _flatten(tree).sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0.5], (outs[0.0] + outs[1.0]) / 2, rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs[0.5], outs[1.0], atol=1e-3)
  with pytest.raises(ValueError, match='relax factor'):
    hybrid_grad_balance(alpha=2.0)


def test_hybrid_diagnostics_in_state():
  tree = _conflicting()
  tx = hybrid_grad_balance(num_tasks=3, per_leaf=True)
  state = tx.init(_params())
  assert isinstance(state, HybridGradBalanceState)
  assert state.diagnostics.norm.shape == (3,) and state.diagnostics.cos_core.shape == (3,)
  _, state = tx.update(jax.tree.map(jnp.asarray, tree), state)
  g = _flatten(tree)
  norms = np.linalg.norm(g, axis=1)
  cos = g @ g[2] / (norms * norms[2])
  np.testing.assert_allclose(state.diagnostics.norm, norms, rtol=1e-5)
  np.testing.assert_allclose(state.diagnostics.cos_core, cos, rtol=1e-5, atol=1e-6)
  assert state.diagnostics.cos_core[2] == 1.0
  # The helper agrees, also for another core position.
  norms0, cos0 = task_norms_and_cosines(jax.tree.map(jnp.asarray, tree), 0)
  np.testing.assert_allclose(norms0, norms, rtol=1e-5)
  np.testing.assert_allclose(cos0, g @ g[0] / (norms * norms[0]), rtol=1e-5,
                             atol=1e-6)
  # Without num_tasks nothing is recorded and the state stays empty.
  tx_plain = hybrid_grad_balance()
  _, plain = tx_plain.update(jax.tree.map(jnp.asarray, tree), tx_plain.init(_params()))
  assert plain.diagnostics is None


def test_hybrid_jit_and_chain():
  tree = jax.tree.map(jnp.asarray, _conflicting())
  expected = ref_hybrid(_conflicting())
  params = _params()
  # SGD(1) after the transform gives exactly -G.
  sgd_tx = optax.chain(hybrid_grad_balance(num_tasks=3), optax.sgd(1.0))
  updates, _ = jax.jit(sgd_tx.update)(tree, sgd_tx.init(params), params)
  _assert_tree_close(updates, {n: -v for n, v in expected.items()}, _scale(expected))
  # Adam after the transform equals Adam fed the reference G, over two steps.
  adam_tx = optax.chain(hybrid_grad_balance(), optax.adam(1e-3))
  ref_adam = optax.adam(1e-3)
  step = jax.jit(adam_tx.update)
  state, ref_state = adam_tx.init(params), ref_adam.init(params)
  for factor in (1.0, -0.5):
    scaled = jax.tree.map(lambda x: factor * x, tree)
    updates, state = step(scaled, state, params)
    ref_g = {n: jnp.asarray(factor * v, jnp.float32) for n, v in expected.items()}
    ref_updates, ref_state = ref_adam.update(ref_g, ref_state, params)
    for name in ref_updates:
      np.testing.assert_allclose(updates[name], ref_updates[name], rtol=1e-4,
                                 atol=1e-7)
      assert np.all(np.asarray(updates[name]) != 0)


def test_hybrid_rejects_bad_inputs():
  with pytest.raises(ValueError, match='weight_bound'):
    hybrid_grad_balance(weight_bound=0.5)
  tx = hybrid_grad_balance(num_tasks=2)
  with pytest.raises(ValueError, match='num_tasks=2'):
    _run(tx, _stacked(0, k=3))
  bad = {'a': jnp.zeros((3, 2)), 'b': jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match='task axis'):
    hybrid_grad_balance().update(bad, hybrid_grad_balance().init(None))
  with pytest.raises(ValueError, match='out of range'):
    _run(hybrid_grad_balance(core_index=3), _stacked(0, k=3))


# ----------------------------------------------------------------------------
# PCGrad.
# ----------------------------------------------------------------------------


def _pcgrad_tree() -> dict[str, np.ndarray]:
  """Three tasks with pairwise conflicts, so the visiting order matters."""
  tree = _stacked(11)
  for x in tree.values():
    x[1] = -0.8 * x[0] + 0.6 * x[1]
    x[2] = -0.5 * x[0] - 0.7 * x[1] + 0.4 * x[2]
  return tree


def _all_orders(k: int):
  per_task = [list(itertools.permutations([j for j in range(k) if j != i]))
              for i in range(k)]
  return [np.array(rows) for rows in itertools.product(*per_task)]


def test_pcgrad_combine_matches_reference_for_every_order():
  tree = _pcgrad_tree()
  g = _flatten(tree)
  assert g[0] @ g[1] < 0 and g[1] @ g[2] < 0 and g[0] @ g[2] < 0
  combine = jax.jit(pcgrad_combine)
  stacked = jax.tree.map(jnp.asarray, tree)
  results = []
  for orders in _all_orders(3):
    out = combine(stacked, jnp.asarray(orders))
    expected = ref_pcgrad(tree, orders)
    _assert_tree_close(out, expected, _scale(tree))
    results.append(_flatten({n: v[None] for n, v in expected.items()})[0])
  assert len(results) == 8
  # The orders lead to different results, so the check above is order-specific.
  assert max(np.max(np.abs(r - results[0])) for r in results) > 1e-2


def test_pcgrad_projects_only_conflicting_pairs():
  tree = _pcgrad_tree()
  for x in tree.values():
    x[2] = np.abs(x[2])
    x[0] = 0.5 * x[2] + 0.1 * x[0]  # aligned with task 2
    x[1] = -x[2] + 0.2 * x[1]       # conflicts with tasks 0 and 2
  g = _flatten(tree)
  assert g[0] @ g[2] > 0 and g[1] @ g[2] < 0 and g[0] @ g[1] < 0
  orders = np.array([[1, 2], [2, 0], [0, 1]])
  out = pcgrad_combine(jax.tree.map(jnp.asarray, tree), jnp.asarray(orders))
  _assert_tree_close(out, ref_pcgrad(tree, orders), _scale(tree))
  # All tasks aligned: nothing is projected and PCGrad is the plain sum.
  aligned = {n: np.abs(x) for n, x in tree.items()}
  out = pcgrad_combine(jax.tree.map(jnp.asarray, aligned), jnp.asarray(orders))
  _assert_tree_close(out, {n: x.astype(np.float64).sum(0) for n, x in aligned.items()},
                     _scale(aligned))


def test_pcgrad_task_orders_are_permutations_of_the_others():
  keys = jax.random.split(jax.random.PRNGKey(3), 200)
  orders = np.asarray(jax.vmap(_task_orders, in_axes=(0, None))(keys, 3))
  assert orders.shape == (200, 3, 2)
  for i in range(3):
    others = sorted(j for j in range(3) if j != i)
    assert all(sorted(row) == others for row in orders[:, i])
    # Both orders of the two other tasks occur.
    assert len({tuple(row) for row in orders[:, i]}) == 2


def test_pcgrad_transform_uses_state_key_and_changes_order():
  tree = _pcgrad_tree()
  stacked = jax.tree.map(jnp.asarray, tree)
  tx = pcgrad(seed=5, num_tasks=3)
  state = tx.init(_params())
  assert isinstance(state, PCGradState)
  update = jax.jit(tx.update)
  seen = set()
  for _ in range(6):
    _, subkey = jax.random.split(state.key)
    orders = np.asarray(_task_orders(subkey, 3))
    seen.add(orders.tobytes())
    out, new_state = update(stacked, state)
    _assert_tree_close(out, ref_pcgrad(tree, orders), _scale(tree))
    np.testing.assert_allclose(new_state.diagnostics.norm_processed,
                               ref_pcgrad_norms(tree, orders), rtol=1e-5)
    assert not np.array_equal(np.asarray(new_state.key), np.asarray(state.key))
    state = new_state
  assert len(seen) > 1


def test_pcgrad_zero_gradients_and_chain():
  tree = _pcgrad_tree()
  for x in tree.values():
    x[1] = 0.0
  tx = optax.chain(pcgrad(), optax.sgd(1.0))
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.asarray, tree), tx.init(params), params)
  # With task 1 zero, only tasks 0 and 2 interact, so every order agrees.
  expected = ref_pcgrad(tree, np.array([[1, 2], [0, 2], [0, 1]]))
  _assert_tree_close(updates, {n: -v for n, v in expected.items()}, _scale(tree))
  zeros = {n: jnp.zeros((3,) + s) for n, s in LEAF_SHAPES.items()}
  out, _ = pcgrad().update(zeros, pcgrad().init(params))
  assert all(np.all(np.asarray(x) == 0) for x in out.values())
  with pytest.raises(ValueError, match='num_tasks=2'):
    pcgrad(num_tasks=2).update(zeros, pcgrad().init(params))


# ----------------------------------------------------------------------------
# MetaBalance.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('target_index', [-1, 1])
def test_metabalance_multi_step_matches_reference(target_index):
  steps = [_stacked(20 + s, scales=[10.0 ** (s - 1), 0.1, 1.0]) for s in range(4)]
  steps[0] = {n: np.zeros_like(x) for n, x in steps[0].items()}  # EMA starts at 0
  tx = metabalance(num_tasks=3, beta=0.8, relax=0.6, core_index=target_index)
  state = tx.init(_params())
  assert isinstance(state, MetaBalanceState)
  assert all(v.shape == (3,) for v in jax.tree.leaves(state.norm_ema))
  update = jax.jit(tx.update)
  outputs, ema, processed = ref_metabalance(steps, 0.8, 0.6, target_index % 3)
  for tree, expected in zip(steps, outputs):
    out, state = update(jax.tree.map(jnp.asarray, tree), state)
    _assert_tree_close(out, expected, max(_scale(tree), 1.0))
  np.testing.assert_allclose(state.diagnostics.norm_processed, processed, rtol=1e-5)
  for name in ema:
    np.testing.assert_allclose(state.norm_ema[name], ema[name], rtol=1e-5)


def test_metabalance_in_chain_and_validation():
  tree = _stacked(30)
  params = _params()
  tx = optax.chain(metabalance(num_tasks=3), optax.sgd(1.0))
  updates, _ = tx.update(jax.tree.map(jnp.asarray, tree), tx.init(params), params)
  expected = ref_metabalance([tree], 0.9, 0.7, 2)[0][0]
  _assert_tree_close(updates, {n: -v for n, v in expected.items()}, _scale(tree))
  with pytest.raises(ValueError, match='num_tasks=2'):
    _run(metabalance(num_tasks=2), tree)
  with pytest.raises(ValueError, match='beta'):
    metabalance(num_tasks=2, beta=1.0)


# ----------------------------------------------------------------------------
# Docstring examples.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('module', [transforms, pcgrad_lib, metabalance_lib, stacked_lib])
def test_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted >= 1
  assert result.failed == 0


def test_state_records_where_eq16_fired_and_the_eq17_factor():
  """Task 0 conflicts with the core (dot -3 < 0) and is projected to [0, 1]: Eq. 17 then
  scales it by 0.1 * min(3 / 1, 10) + 0.9 = 1.2. Task 1 is orthogonal (dot 0): no
  projection, factor 0.1 * 3 / 2 + 0.9 = 1.05. The core's factor is 1."""
  stacked = {'w': jnp.array([[-1., 1.], [0., 2.], [3., 0.]])}
  tx = hybrid_grad_balance(gamma=0.1, weight_bound=10.0, num_tasks=3)
  _, state = tx.update(stacked, tx.init({'w': jnp.zeros(2)}))
  np.testing.assert_array_equal(state.diagnostics.eq16_share, [1.0, 0.0, 0.0])
  np.testing.assert_allclose(state.diagnostics.eq17_factor, [1.2, 1.05, 1.0], rtol=1e-6)
  off = hybrid_grad_balance(conflict=False, magnitude=False, num_tasks=3)
  _, state = off.update(stacked, off.init({'w': jnp.zeros(2)}))
  np.testing.assert_array_equal(state.diagnostics.eq16_share, 0.0)
  np.testing.assert_array_equal(state.diagnostics.eq17_factor, 1.0)


def test_old_argument_and_state_names_still_work_with_a_deprecation_warning():
  """0.2's names (clip=, target_index=, state.task_norms ...) work one more release."""
  tree = _stacked(0, k=3)
  with pytest.warns(DeprecationWarning, match='weight_bound'):
    old = hybrid_grad_balance(gamma=0.5, clip=7.0, num_tasks=3)
  new = hybrid_grad_balance(gamma=0.5, weight_bound=7.0, num_tasks=3)
  out_old, state = _run(old, tree)
  out_new, _ = _run(new, tree)
  _assert_tree_close(out_old, out_new, 1.0)
  np.testing.assert_array_equal(state.task_norms, state.diagnostics.norm)
  np.testing.assert_array_equal(state.core_cosine, state.diagnostics.cos_core)
  np.testing.assert_array_equal(state.processed_norms, state.diagnostics.norm_processed)
  np.testing.assert_array_equal(state.projected, state.diagnostics.eq16_share)
  np.testing.assert_array_equal(state.magnitude_factor, state.diagnostics.eq17_factor)
  with pytest.warns(DeprecationWarning, match='core_index'):
    old_mb = metabalance(3, target_index=0)
  _assert_tree_close(_run(old_mb, tree)[0], _run(metabalance(3, core_index=0), tree)[0], 1.0)


# ----------------------------------------------------------------------------- inject_hyperparams

_INJECTED = {
    # transform, its static arguments, the values of two updates (the second changes them)
    'hybrid': (hybrid_grad_balance,
               ('core_index', 'per_leaf', 'conflict', 'magnitude', 'num_tasks'),
               [dict(alpha=1.0, gamma=0.1, weight_bound=10.0),
                dict(alpha=0.3, gamma=0.9, weight_bound=2.0)]),
    'pcgrad': (pcgrad, ('num_tasks', 'core_index'), [dict(seed=0), dict(seed=0)]),
    'metabalance': (metabalance, ('num_tasks', 'core_index'),
                    [dict(relax=0.7, beta=0.9), dict(relax=0.2, beta=0.9)]),
}


@pytest.mark.parametrize('name', sorted(_INJECTED))
def test_injected_values_equal_the_transform_built_with_them(name):
  """Under optax.inject_hyperparams (values in the state, one jitted update for all of
  them), each update equals the transform built with that update's values directly; a value
  changed in the state is used from the next update on."""
  factory, static, values = _INJECTED[name]
  fixed = {'num_tasks': 3}
  tree = {k: jnp.asarray(v) for k, v in _stacked(7).items()}
  injected = optax.inject_hyperparams(factory, static_args=static)(**values[0], **fixed)
  state = injected.init(_params())
  update = jax.jit(injected.update)
  outputs, direct_state = [], None
  for current in values:
    for key, value in current.items():
      state.hyperparams[key] = jnp.asarray(value)
    got, state = update(tree, state)
    direct = factory(**current, **fixed)
    # A stateful transform (MetaBalance's averages, PCGrad's key) carries its direct state
    # from the previous update, as the injected one does.
    if direct_state is None:
      direct_state = direct.init(_params())
    want, direct_state = direct.update(tree, direct_state)
    _assert_tree_close(got, want, _scale(tree))
    outputs.append(got)
  if values[0] != values[1]:
    assert not np.allclose(outputs[0]['emb'], outputs[1]['emb'])     # the new values acted

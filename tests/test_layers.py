"""Building blocks against their definitions: the IFU (Eq. 13-14) and the split Dense layer.

Both are written for speed (no concatenated tower input, ``h1`` applied once to the
weighted input, ``h2`` and ``h3`` as one matmul), so each is checked against the naive
formula in float64 numpy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htl_jax.models import layers


def _items(count: int, batch: int = 5, width: int = 6) -> list[jax.Array]:
  keys = jax.random.split(jax.random.PRNGKey(count), count)
  return [jax.random.normal(k, (batch, width)) for k in keys]


@pytest.mark.parametrize('count', [1, 2, 3])
def test_attention_fusion_equals_eq_13_14(count):
  items = _items(count)
  module = layers.AttentionFusion(4)
  params = module.init(jax.random.PRNGKey(0), items)['params']
  # Non-zero biases, so that a bias applied in the wrong place shows.
  params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 1 else p, params)
  got = np.asarray(module.apply({'params': params}, items))

  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  xs = [np.asarray(x, np.float64) for x in items]

  def h(name, x):
    return x @ p[f'{name}_kernel'] + p[f'{name}_bias']

  scores = np.stack([np.sum(h('h2', x) * h('h3', x), -1) / np.sqrt(4.0) for x in xs])
  weights = np.exp(scores - scores.max(0))
  weights /= weights.sum(0)                                     # softmax over the items
  want = sum(w[:, None] * h('h1', x) for w, x in zip(weights, xs))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_parts_dense_equals_dense_on_the_concatenation():
  parts = [jax.random.normal(jax.random.PRNGKey(i), (7, w)) for i, w in enumerate((3, 2, 9))]
  split = layers.PartsDense(5)
  variables = split.init(jax.random.PRNGKey(1), parts)
  dense = nn.Dense(5)
  concat = jnp.concatenate(parts, -1)
  ref_shapes = jax.tree.map(jnp.shape, dense.init(jax.random.PRNGKey(1), concat))
  assert jax.tree.map(jnp.shape, variables) == ref_shapes
  variables = jax.tree.map(lambda v: v + 0.5, variables)          # a non-zero bias too
  np.testing.assert_allclose(split.apply(variables, parts), dense.apply(variables, concat),
                             rtol=1e-5, atol=1e-6)

  # Same gradients for the kernel and for every part.
  def loss(module, v, x):
    return jnp.sum(jnp.sin(module.apply(v, x)))

  g_split = jax.grad(lambda v, x: loss(split, v, x), argnums=(0, 1))(variables, parts)
  g_dense = jax.grad(lambda v, x: loss(dense, v, x), argnums=(0, 1))(variables, concat)
  np.testing.assert_allclose(g_split[0]['params']['kernel'], g_dense[0]['params']['kernel'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.concatenate(g_split[1], -1), g_dense[1], rtol=1e-5,
                             atol=1e-6)


def test_tower_takes_parts_with_the_parameters_of_one_input():
  parts = [jnp.ones((2, 3)), jnp.ones((2, 4))]
  tower = layers.Tower((6, 3))
  split = jax.tree.map(jnp.shape, tower.init(jax.random.PRNGKey(0), parts))
  whole = jax.tree.map(jnp.shape, tower.init(jax.random.PRNGKey(0), jnp.ones((2, 7))))
  assert split == whole

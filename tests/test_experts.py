"""Expert banks run as batched matmuls but are the per-expert MLPs they replace.

Same parameter tree (``expert_<i>/dense_<j>/{kernel,bias}``) and the same initial values as
one ``layers.MLP`` per expert, the same outputs, and banks applied together (one first-layer
matmul for the banks that read one input) equal the banks applied one by one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htl_jax.models import experts
from htl_jax.models.layers import MLP


class PerExpertBank(nn.Module):
  """Reference: one plain MLP per expert, stacked."""

  dims: tuple[int, ...]
  num: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.stack([MLP(self.dims, name=f'expert_{i}')(x)[-1] for i in range(self.num)], 1)


@pytest.mark.parametrize('dims', [(16,), (16, 8), (12, 8, 4)])
def test_expert_bank_equals_one_mlp_per_expert(dims):
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 10))
  reference = PerExpertBank(dims, 3).init(jax.random.PRNGKey(1), x)
  params = experts.ExpertBank(dims, 3).init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(experts.ExpertBank(dims, 3).apply(reference, x),
                             PerExpertBank(dims, 3).apply(reference, x), rtol=1e-5, atol=1e-6)


class Banks(nn.Module):
  """Three banks, two of them on one input: together (apply_banks) or one by one."""

  together: bool

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> list[jax.Array]:
    sizes, inputs = (2, 1, 3), (x, y, x)
    if not self.together:
      return [experts.ExpertBank((8, 4), n, name=f'bank_{b}')(v)
              for b, (n, v) in enumerate(zip(sizes, inputs))]
    banks = [experts.ExpertWeights((8, 4), n, v.shape[-1], name=f'bank_{b}')()
             for b, (n, v) in enumerate(zip(sizes, inputs))]
    return experts.apply_banks(banks, inputs)


def test_banks_on_one_input_share_a_matmul_and_equal_separate_banks():
  x, y = (jax.random.normal(k, (5, 7)) for k in jax.random.split(jax.random.PRNGKey(2)))
  params = Banks(False).init(jax.random.PRNGKey(3), x, y)
  assert jax.tree.structure(Banks(True).init(jax.random.PRNGKey(3), x, y)) == \
      jax.tree.structure(params)
  together = Banks(True).apply(params, x, y)
  separate = Banks(False).apply(params, x, y)
  for a, b in zip(together, separate):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Banks 0 and 2 read x: their first layers are ONE dot_general in the program.
  jaxpr = jax.make_jaxpr(lambda p: Banks(True).apply(p, x, y))(params)
  first_layers = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general'
                  and e.invars[0].aval.shape in ((5, 7),)]
  assert len(first_layers) == 2           # one for x's banks (2 + 3 experts), one for y's


def test_empty_bank_is_rejected():
  with pytest.raises(ValueError, match='at least one expert'):
    experts.ExpertBank((4,), 0).init(jax.random.PRNGKey(0), jnp.ones((2, 3)))

"""Tests of every registered model (and the HTLNet ablations) against the model interface.

Each case compiles ONE function that initializes the model, evaluates it, trains it for 30
Adam steps on a fixed batch (``lax.scan``) and takes the per-task gradients of the embedding
copies; the test functions then read the cached results.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htl_jax import losses
from htl_jax.data.schema import HybridSpec
from htl_jax.models import MODELS, ModelConfig, ModelOutput, isolated_towers
from htl_jax.models.adatt import AdaTT
from htl_jax.models.ple import PLE

BATCH, FIELDS, DIM = 64, 4, 4
STEPS = 30
SPEC = HybridSpec(fields=tuple(f'f{i}' for i in range(FIELDS)), vocab_sizes=(5,) * FIELDS,
                  binary_tasks=('click', 'convert'), core_task='revenue')
TINY = ModelConfig(tower_dims=(16, 8), expert_dims=(16,), num_experts=2, fusion_dim=8,
                   label_embed_dim=4)
HTLNET_ABLATIONS = {
    'no_label_embedding': {'use_label_embedding': False},
    'no_representation': {'use_representation': False},
    'concat_fusion': {'fusion': 'concat'},
    'no_stop_gradient': {'stop_gradient': False},
    'no_gumbel_noise': {'gumbel_noise': False},
    'ziln_head': {'head': 'ziln'},
}
BASELINES = ('dnn', 'shared_bottom', 'mmoe', 'ple', 'adatt', 'esmm', 'aitm', 'tafe')
MONOTONE = ('esmm', 'tafe')


def _cases() -> dict[str, tuple[str, Callable[[], nn.Module]]]:
  """Case id -> (registry name, model factory)."""
  cases = {name: (name, functools.partial(MODELS[name], SPEC, TINY)) for name in MODELS}
  for suffix, change in HTLNET_ABLATIONS.items():
    cfg = dataclasses.replace(TINY, **change)
    cases[f'htlnet-{suffix}'] = ('htlnet', functools.partial(MODELS['htlnet'], SPEC, cfg))
  two_levels = dataclasses.replace(TINY, expert_dims=(16, 8))
  cases['ple-two_levels'] = ('ple', lambda: PLE(spec=SPEC, cfg=two_levels))
  cases['adatt-general-two_levels'] = (
      'adatt', lambda: AdaTT(spec=SPEC, cfg=two_levels, num_shared_experts=2))
  return cases


CASES = _cases()


def _batch() -> tuple[np.ndarray, np.ndarray]:
  """Nested binary labels ``y2 <= y1`` and a lognormal-ish core that is 0 unless ``y2``."""
  rng = np.random.default_rng(0)
  click = rng.random(BATCH) < 0.5
  convert = click & (rng.random(BATCH) < 0.5)
  y = np.stack([click, convert], axis=1).astype(np.float32)
  core = (convert * np.exp(rng.normal(1.0, 0.5, BATCH))).astype(np.float32)
  return y, core


def _task_losses(out: ModelOutput, y: jax.Array, core: jax.Array, head: str) -> jax.Array:
  """Per-task losses ``[T + 1]``: BCE of each binary task, then the core loss."""
  probs = jnp.clip(out.probs, 1e-7, 1.0 - 1e-7)
  bce = -jnp.mean(y * jnp.log(probs) + (1.0 - y) * jnp.log1p(-probs), axis=0)
  if head == 'ziln':
    core_loss = losses.ziln_loss(out.core, core)
  else:
    core_loss = jnp.mean(jnp.square(out.core[:, 0] - jnp.log1p(core)))
  return jnp.concatenate([bce, core_loss[None]])


# Cheap XLA CPU compilation: these graphs are tiny, compile time dominates the test.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.lru_cache(maxsize=None)
def _run(case: str) -> dict[str, np.ndarray | bool]:
  """Everything the tests check for one case, from a single compiled function.

  ``train_losses[s]`` and ``train_out[s]`` are the loss and outputs (train mode) of the
  parameters after ``s`` Adam steps, ``s = 0..STEPS``; ``probe`` is the trained
  model's eval-mode output on fresh random embeddings; ``isolation[t, u]`` is
  ``max |d loss_t / d embs[u]|`` at initialization with K distinct copies of the embedding.
  """
  model = CASES[case][1]()
  head = model.cfg.head
  num_tasks = SPEC.num_tasks
  index = jnp.arange(BATCH, dtype=jnp.int32)
  y, core = (jnp.asarray(a) for a in _batch())
  tx = optax.adam(1e-2)

  def apply(params, embs, key, train):
    return model.apply({'params': params}, embs, train=train, tau=1.0,
                       example_index=index, rngs={'gumbel': key})

  def task_losses(model_params, embs, key):
    out = apply(model_params, embs, key, True)
    return _task_losses(out, y, core, head), out

  def step(carry, key):
    params, opt_state = carry

    def loss_fn(p):
      per_task, out = task_losses(p['model'], (p['emb'],) * num_tasks, key)
      return jnp.sum(per_task), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (loss, out)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def everything(key):
    init_key, emb_key, probe_key, noise_key = jax.random.split(key, 4)
    emb = jax.random.normal(emb_key, (BATCH, FIELDS, DIM))
    variables = model.init({'params': init_key, 'gumbel': noise_key}, (emb,) * num_tasks,
                           train=True, tau=1.0, example_index=index)
    params = {'model': variables['params'], 'emb': emb}
    copies = tuple(emb + 0.0 for _ in range(num_tasks))
    jacobian = jax.jacrev(lambda embs: task_losses(params['model'], embs, noise_key)[0])(copies)
    isolation = jnp.stack([jnp.max(jnp.abs(g), axis=(1, 2, 3)) for g in jacobian], axis=1)
    (trained, _), (train_losses, train_out) = jax.lax.scan(
        step, (params, tx.init(params)), jax.random.split(noise_key, STEPS + 1))
    probe = (jax.random.normal(probe_key, (BATCH, FIELDS, DIM)),) * num_tasks
    return {
        'train_losses': train_losses,
        'train_out': train_out,
        'probe': apply(trained['model'], probe, noise_key, False),
        'isolation': isolation,
    }

  results = jax.device_get(everything(jax.random.key(0)))
  results['isolated_towers'] = isolated_towers(model)
  results['core_out_dim'] = model.cfg.core_out_dim
  return results


def test_registry_has_every_baseline():
  assert set(BASELINES) | {'htlnet'} <= set(MODELS)


@pytest.mark.parametrize('case', CASES)
def test_output_shapes_and_ranges(case):
  results = _run(case)
  outputs = {'probe': results['probe'], 'train_out': results['train_out']}
  for key, out in outputs.items():
    assert isinstance(out, ModelOutput), key
    lead = out.probs.shape[:-2]  # (STEPS + 1,) for the stacked training outputs.
    assert out.probs.shape == lead + (BATCH, SPEC.num_binary), key
    assert out.core.shape == lead + (BATCH, results['core_out_dim']), key
    assert out.probs.dtype == np.float32 and out.core.dtype == np.float32, key
    assert np.all(np.isfinite(out.core)), key
    assert np.all((out.probs >= 0.0) & (out.probs <= 1.0)), key


@pytest.mark.parametrize('case', CASES)
def test_loss_decreases_on_fixed_batch(case):
  losses_per_step = _run(case)['train_losses']
  assert losses_per_step.shape == (STEPS + 1,)
  assert np.all(np.isfinite(losses_per_step))
  before, after = float(losses_per_step[0]), float(losses_per_step[-1])
  assert after < before - 0.2 * abs(before), (before, after)


@pytest.mark.parametrize('case', CASES)
def test_isolated_towers_claim_matches_gradients(case):
  results = _run(case)
  grads = results['isolation']
  assert grads.shape == (SPEC.num_tasks, SPEC.num_tasks)
  off_diagonal = grads[~np.eye(SPEC.num_tasks, dtype=bool)]
  if results['isolated_towers']:
    assert np.all(off_diagonal == 0.0), grads
    assert np.all(np.diag(grads) > 0.0), grads
  else:
    # A model that shares anything across tasks must not claim isolation.
    assert np.any(off_diagonal > 0.0), grads


@pytest.mark.parametrize('name', MONOTONE)
def test_chain_probabilities_are_monotone(name):
  results = _run(name)
  for key in ('probe', 'train_out'):
    probs = results[key].probs
    assert np.all(np.diff(probs, axis=-1) <= 0.0), key

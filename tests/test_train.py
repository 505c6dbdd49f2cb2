"""End-to-end training: determinism, resume, 1 vs 2 devices, temperature, NaN handling,
GPU determinism settings (no change on CPU).

All runs use one tiny HTLNet config (``conftest.TINY_OVERRIDES``) on the embedded KuaiRand
sample, so they share compiled steps. The 2-device run and the CLI smoke run are
subprocesses of ``experiments.main`` (``XLA_FLAGS`` must be set before JAX starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_ARG, cli_overrides, row_adam_state, tiny_config
from htl_jax.data import load_dataset
from htl_jax.losses import CoreTransform
from htl_jax.errors import NonFiniteError
from htl_jax.train import feed as feed_lib
from htl_jax.train import hooks
from htl_jax.train import loop as loop_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.state import init_state, make_setup


def _latest_state(config, workdir):
  """The latest checkpointed TrainState of a finished run."""
  data = load_dataset(config, config.cache_dir)
  setup = make_setup(config, data.spec, CoreTransform.fit(config.core_transform,
                                                          data.train.core))
  ckpt = Checkpoints(workdir, 'min')
  state, loop = ckpt.restore_latest(init_state(setup, config))
  ckpt.close()
  return state, loop


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# Two fake CPU devices, also on a machine whose default backend is a GPU.
_TWO_CPU_DEVICES = {'JAX_PLATFORMS': 'cpu',
                    'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


def _run_main(workdir, cache_dir, extra_env=None, extra_flags=()):
  env = {**os.environ, **(extra_env or {})}
  cmd = [sys.executable, '-m', 'experiments.main',
         f'--config=configs/kuairand.py:{TINY_ARG}', f'--workdir={workdir}',
         *cli_overrides(cache_dir), *extra_flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, cache_dir):
  """8 uninterrupted steps; every test below compares against it."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  config = tiny_config(cache_dir)
  result = loop_lib.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_outputs_written(straight_run):
  config, workdir, result = straight_run
  with open(os.path.join(workdir, 'metrics.json')) as f:
    saved = json.load(f)
  assert set(saved['test']) == {'click', 'long_view', 'watch_time'}
  assert set(saved['test']['click']) == {'auc', 'logloss', 'gauc'}       # KuaiRand: users
  assert set(saved['test']['watch_time']) == {'nrmse', 'nmae', 'spearman', 'gini', 'xauc'}
  assert saved['test'] == result['test']
  assert saved['stop'] == 'cap' and saved['steps'] == 8      # patience 5 never ran out
  assert saved['final_tau'] == pytest.approx(2.5)           # 10 halved at steps 3 and 6
  assert saved['selection'] == {'rule': 'core', 'metric': 'nrmse',
                                'best_value': saved['valid']['watch_time']['nrmse']}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['step'] for line in lines] == [4, 8]
  grad = lines[-1]['grad']
  assert set(grad) == {'click', 'long_view', 'watch_time'}
  assert grad['watch_time']['cos_core'] == pytest.approx(1.0, abs=1e-5)
  assert all(np.isfinite(g['norm']) and g['norm'] > 0 for g in grad.values())
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model'] == 'htlnet'


def test_same_seed_same_run_whichever_feed(straight_run, tmp_path):
  """The straight run kept its split on the device (feed='auto' -> 'device'); gathering
  the batches on the host gives the same run, parameters included."""
  config, workdir, result = straight_run
  data = load_dataset(config, config.cache_dir)
  assert feed_lib.resolve_feed(config, data.train) == 'device'
  host = tiny_config(config.cache_dir, feed='host')
  again = loop_lib.train_and_evaluate(host, str(tmp_path))
  assert again['test'] == result['test']
  assert again['valid'] == result['valid']
  _assert_trees_equal(_latest_state(config, workdir)[0], _latest_state(host, str(tmp_path))[0])


def test_feed_auto_leaves_large_splits_on_the_host(straight_run, monkeypatch):
  config, _, _ = straight_run
  train = load_dataset(config, config.cache_dir).train
  size = train.x.nbytes + train.y.nbytes + train.core.nbytes
  monkeypatch.setattr(feed_lib, 'RESIDENT_SPLIT_LIMIT', size - 1)
  assert feed_lib.resolve_feed(config, train) == 'host'
  assert feed_lib.resolve_feed(tiny_config(config.cache_dir, feed='device'), train) == 'device'


def test_resume_gives_the_same_run(straight_run, tmp_path):
  config, workdir, result = straight_run
  half = tiny_config(config.cache_dir, max_steps=4)
  loop_lib.train_and_evaluate(half, str(tmp_path))
  resumed = loop_lib.train_and_evaluate(tiny_config(config.cache_dir), str(tmp_path))
  assert resumed['test'] == result['test']
  state_a, loop_a = _latest_state(config, workdir)
  state_b, loop_b = _latest_state(config, str(tmp_path))
  _assert_trees_equal(state_a, state_b)
  # The loop's bookkeeping is the same; only the measured training time is wall-clock.
  assert loop_a.pop('train_seconds') > 0 and loop_b.pop('train_seconds') > 0
  assert loop_a == loop_b
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [4, 8]


def _steps(workdir, kind: str) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints', kind)
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _best_state(config, workdir):
  like = _latest_state(config, workdir)[0]
  ckpt = Checkpoints(workdir, 'min')
  state, _ = ckpt.restore_best(like)
  ckpt.close()
  return state


def test_checkpoint_seconds_writes_once_at_the_end_and_changes_nothing(straight_run, tmp_path):
  """The straight run writes at every evaluation (smoke: checkpoint_seconds=0); with
  checkpoint_seconds longer than the run, orbax's policy writes the first periodic save
  (step 2) and no other until the end, the best state waits for that last one, and the
  run, its checkpoints and its resume are the same."""
  config, workdir, result = straight_run
  spaced = tiny_config(config.cache_dir, checkpoint_seconds=3600.0, checkpoint_every=2)
  again = loop_lib.train_and_evaluate(spaced, str(tmp_path))
  assert (again['test'], again['valid'], again['best_step']) == (
      result['test'], result['valid'], result['best_step'])
  assert _steps(workdir, 'latest') == [4, 8]
  assert _steps(tmp_path, 'latest') == [2, 8]
  assert _steps(tmp_path, 'best') == [result['best_step']]
  _assert_trees_equal(_latest_state(config, workdir)[0], _latest_state(spaced, str(tmp_path))[0])
  _assert_trees_equal(_best_state(config, workdir), _best_state(spaced, str(tmp_path)))
  assert loop_lib.train_and_evaluate(spaced, str(tmp_path))['test'] == result['test']


def test_a_waiting_best_state_is_written_before_the_next_latest(straight_run, tmp_path):
  config, workdir, _ = straight_run
  state, loop = _latest_state(config, workdir)
  ckpt = Checkpoints(str(tmp_path), 'min', min_seconds=3600.0)
  assert ckpt.due(2)                                 # nothing on disk yet
  ckpt.save_latest(2, state, loop)
  assert not ckpt.due(4)                             # not an hour since
  ckpt.save_best(4, state, loop, 0.5)
  assert _steps(tmp_path, 'best') == []
  assert ckpt.restore_best(state)[0] is state       # the final evaluation reads it from memory
  ckpt.save_latest(6, state, loop)                   # e.g. on SIGTERM: both, best first
  assert (_steps(tmp_path, 'best'), _steps(tmp_path, 'latest')) == ([4], [2, 6])
  ckpt.close()


def test_temperature_survives_checkpoint(straight_run):
  config, workdir, _ = straight_run
  state, _ = _latest_state(config, workdir)
  # 8 steps with a decay every 3: tau0 * 0.5^2.
  assert (config.tau0, config.tau_decay, config.tau_decay_steps) == (10.0, 0.5, 3)
  assert int(state.step) == 8
  assert float(state.tau) == pytest.approx(2.5)


def _nan_after_step_4(real_drain):
  def drain(self, on_non_finite):
    if self.pending and self.pending[-1][0].last > 4:
      self.pending = [(d, {**m, 'finite': np.zeros_like(np.asarray(m['finite']))})
                      for d, m in self.pending]
    return real_drain(self, on_non_finite)
  return drain


def test_non_finite_loss_stops_and_keeps_checkpoint(straight_run, tmp_path):
  """Steps 1-4 finite and checkpointed, then a non-finite step: the run stops with the
  step-4 checkpoint intact."""
  config, _, _ = straight_run
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hooks.Progress, 'drain', _nan_after_step_4(hooks.Progress.drain))
    with pytest.raises(NonFiniteError, match='non-finite loss or gradient at step 5'):
      loop_lib.train_and_evaluate(tiny_config(config.cache_dir), str(tmp_path))
  state, _ = _latest_state(config, str(tmp_path))
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_non_finite_loss_keeps_a_best_state_that_waited_in_memory(straight_run, tmp_path):
  """Steps 1-4 finite (the first periodic save at step 2; step 4's best state waits in
  memory: checkpoint_seconds), then the loop sees a non-finite step: it stops, and the
  waiting best state is on disk."""
  config, _, _ = straight_run
  explodes_late = tiny_config(config.cache_dir, checkpoint_seconds=3600.0, checkpoint_every=2)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hooks.Progress, 'drain', _nan_after_step_4(hooks.Progress.drain))
    with pytest.raises(NonFiniteError, match='non-finite'):
      loop_lib.train_and_evaluate(explodes_late, str(tmp_path))
  assert _steps(tmp_path, 'best') == [4] and _steps(tmp_path, 'latest') == [2]


def test_two_devices_match_one_device(straight_run, tmp_path):
  """Same global batch on 2 fake CPU devices: same parameters after 8 steps."""
  config, workdir, result = straight_run
  done = _run_main(str(tmp_path), config.cache_dir,
                   _TWO_CPU_DEVICES)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '2 device(s)' in done.stderr
  state_1, _ = _latest_state(config, workdir)
  state_2, _ = _latest_state(config, str(tmp_path))
  _assert_trees_equal(state_1.params, state_2.params, rtol=2e-4, atol=2e-6)
  assert float(state_1.tau) == float(state_2.tau)
  with open(os.path.join(tmp_path, 'metrics.json')) as f:
    two = json.load(f)
  for task, values in result['test'].items():
    for name, value in values.items():
      assert two['test'][task][name] == pytest.approx(value, rel=1e-3, abs=1e-4)


def test_gpu_determinism_changes_nothing_on_cpu(straight_run, tmp_path):
  """The command sets XLA's deterministic-ops flag and 'highest' matmul precision
  (config.gpu_determinism, default True); on CPU its run is the in-process run, which has
  neither, bit for bit."""
  config, workdir, result = straight_run
  done = _run_main(str(tmp_path), config.cache_dir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'GPU determinism' not in done.stderr        # a line for GPU runs only
  with open(os.path.join(tmp_path, 'metrics.json')) as f:
    saved = json.load(f)
  assert saved['test'] == result['test'] and saved['valid'] == result['valid']
  _assert_trees_equal(_latest_state(config, workdir)[0], _latest_state(config, str(tmp_path))[0])


# ----------------------------------------------------------------------------- lazy_adam


@pytest.fixture(scope='module')
def lazy_run(tmp_path_factory, cache_dir):
  """8 uninterrupted steps with the row-wise embedding optimizer."""
  workdir = str(tmp_path_factory.mktemp('lazy'))
  config = tiny_config(cache_dir, embedding_optimizer='lazy_adam')
  result = loop_lib.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_lazy_adam_resume_gives_the_same_run(lazy_run, tmp_path):
  """Table, moments, per-row counts and the id scratch survive the checkpoint exactly."""
  config, workdir, result = lazy_run
  half = tiny_config(config.cache_dir, embedding_optimizer='lazy_adam', max_steps=4)
  loop_lib.train_and_evaluate(half, str(tmp_path))
  resumed = loop_lib.train_and_evaluate(config, str(tmp_path))
  assert resumed['test'] == result['test']
  state_a, _ = _latest_state(config, workdir)
  state_b, _ = _latest_state(config, str(tmp_path))
  _assert_trees_equal(state_a, state_b)
  counts = np.asarray(row_adam_state(state_a).count)
  assert 0 < counts.max() <= 8 and (counts == 0).any()     # rows not in a batch: no update


def test_lazy_adam_two_devices_match_one_device(lazy_run, tmp_path):
  config, workdir, _ = lazy_run
  done = _run_main(str(tmp_path), config.cache_dir,
                   _TWO_CPU_DEVICES,
                   ['--config.embedding_optimizer=lazy_adam'])
  assert done.returncode == 0, done.stderr[-3000:]
  assert '2 device(s)' in done.stderr
  state_1, _ = _latest_state(config, workdir)
  state_2, _ = _latest_state(config, str(tmp_path))
  _assert_trees_equal(state_1.params, state_2.params, rtol=2e-4, atol=2e-6)
  table_1, table_2 = row_adam_state(state_1), row_adam_state(state_2)
  np.testing.assert_array_equal(table_1.count, table_2.count)
  _assert_trees_equal((table_1.mu, table_1.nu), (table_2.mu, table_2.nu), rtol=2e-4,
                      atol=1e-9)
  np.testing.assert_array_equal(state_1.id_scratch, state_2.id_scratch)

"""The training loop's time to a table (docs/benchmarks.md) and what it records (section 10).

- several steps per dispatch give the same run, bit for bit, as one step per dispatch;
- a second run of the same shapes compiles nothing (seeds and hyperparameters differ);
- memory maps stay flat across many runs in one process, also when runs of many shapes
  come and go (the kept programs are bounded);
- Fig. 5's diagnostics average every step of an evaluation window, with where Eq. 16
  fired and Eq. 17's factor;
- one model-selection metric: a ZILN-head run keeps the checkpoint of its best Gini;
- the host allocator is tuned for XLA:CPU's scratch only when the backend is the CPU.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from htl_jax.runtime import allocator
from htl_jax.train import feed as feed_lib
from htl_jax.train import loop as loop_lib
from htl_jax import run_files
from htl_jax.train import step as step_lib

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _compiles.append(name) if name == _COMPILE_EVENT else None)


def _lines(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, run_files.METRICS_LOG)) as f:
    return [json.loads(line) for line in f]


def _memory_maps() -> int:
  with open('/proc/self/maps') as f:
    return sum(1 for _ in f)


# ----------------------------------------------------------------------------- dispatches


def test_schedule_fills_the_gaps_between_boundaries():
  config = tiny_config('', log_every=5, eval_every=10, checkpoint_every=10)
  got = [(d.first, d.num_steps, d.diagnosed)
         for d in feed_lib.schedule(config, 0, 23, 12, 4, diagnose_at_eval_only=True)]
  # 12 steps an epoch; evaluations (alone, diagnosed) at 10, 20 and the last step, 23.
  assert got == [(0, 4, False), (4, 1, False), (5, 4, False), (9, 1, True),
                 (10, 2, False), (12, 3, False), (15, 4, False), (19, 1, True),
                 (20, 2, False), (22, 1, True)]
  every = list(feed_lib.schedule(config, 3, 10, 12, 16, diagnose_at_eval_only=False))
  assert [(d.first, d.last) for d in every] == [(3, 5), (5, 10)]
  assert all(d.diagnosed for d in every)


@pytest.mark.parametrize('feed', ['device', 'host'])
def test_steps_per_dispatch_do_not_change_the_run(cache_dir, tmp_path, feed):
  """16 steps as dispatches of 8 (and of 1): the same metrics and parameters."""
  runs = {}
  for per_dispatch in (8, 1):
    config = tiny_config(cache_dir, max_steps=16, eval_every=8, log_every=8,
                         checkpoint_every=8, steps_per_dispatch=per_dispatch, feed=feed)
    workdir = str(tmp_path / str(per_dispatch))
    runs[per_dispatch] = (loop_lib.train_and_evaluate(config, workdir), _lines(workdir))
  (a, lines_a), (b, lines_b) = runs[8], runs[1]
  assert a['test'] == b['test'] and a['valid'] == b['valid']
  for x, y in zip(lines_a, lines_b):
    assert x['valid'] == y['valid'] and x['grad'] == y['grad']


# ----------------------------------------------------------------------------- compiles


def test_a_second_run_of_the_same_shapes_compiles_nothing(cache_dir, tmp_path):
  loop_lib.train_and_evaluate(tiny_config(cache_dir, seed=5), str(tmp_path / 'first'))
  before = len(_compiles)
  other = tiny_config(cache_dir, seed=6, learning_rate=2e-3, l2=1e-4, alpha=0.5,
                      gamma=0.3, clip=100.0, tau_decay_steps=5, tau0=5.0)
  loop_lib.train_and_evaluate(other, str(tmp_path / 'second'))
  assert len(_compiles) == before


def test_memory_is_flat_across_runs_of_many_shapes(cache_dir, tmp_path, monkeypatch):
  """Three setups in turn, at most two kept: a third clears JAX's caches."""
  monkeypatch.setattr(step_lib, 'MAX_KEPT_SETUPS', 2)
  shapes = [{'embed_dim': 4}, {'embed_dim': 5}, {'embed_dim': 6}]
  maps = []
  for i in range(12):
    config = tiny_config(cache_dir, seed=i, max_steps=4, **shapes[i % 3])
    loop_lib.train_and_evaluate(config, str(tmp_path / str(i)))
    maps.append(_memory_maps())
  assert len(step_lib._SEEN) <= 2
  # Every other run clears (one setup's programs, then two): like with like, no growth.
  assert max(maps[-4:]) < 1.15 * max(maps[2:6]), maps


@pytest.mark.parametrize('platform, tuned', [('cpu', True), ('gpu', False)])
def test_host_allocator_is_tuned_on_cpu_only(monkeypatch, platform, tuned):
  """The commands tune it (runtime.allocator.tune_for_cpu); training never does."""
  calls = []
  monkeypatch.setattr(allocator.jax, 'default_backend', lambda: platform)
  monkeypatch.setattr(allocator, 'keep_scratch_memory', lambda: calls.append(1) or True)
  assert allocator.tune_for_cpu() == tuned
  assert calls == ([1] if tuned else [])


def test_training_leaves_the_process_alone(cache_dir, tmp_path, monkeypatch):
  """No allocator call and no signal handler from the library: the commands set those."""
  import signal  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(allocator, 'keep_scratch_memory', lambda: pytest.fail('allocator'))
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  loop_lib.train_and_evaluate(tiny_config(cache_dir, max_steps=4), str(tmp_path))
  assert {s: signal.getsignal(s) for s in before} == before


# ----------------------------------------------------------------------------- records


def test_diagnostics_average_every_step_of_the_window(cache_dir, tmp_path):
  """HTLNet (Algorithm 1): every step counts; without a process only the evaluation's
  step, unless grad_diagnostics='every_step'."""
  workdir = str(tmp_path / 'htl')
  loop_lib.train_and_evaluate(tiny_config(cache_dir), workdir)
  for line in _lines(workdir):
    assert line['grad_steps'] == 4
    click = line['grad']['click']
    assert 0.0 <= click['eq16_share'] <= 1.0 and click['eq17_factor'] > 0
    assert line['grad']['watch_time']['eq17_factor'] == pytest.approx(1.0)
  for mode, steps in (('eval', 1), ('every_step', 4)):
    workdir = str(tmp_path / mode)
    loop_lib.train_and_evaluate(
        tiny_config(cache_dir, grad_process='none', grad_diagnostics=mode), workdir)
    for line in _lines(workdir):
      assert line['grad_steps'] == steps
      assert 'eq16_share' not in line['grad']['click']
      assert line['grad']['click']['norm'] == line['grad']['click']['norm_processed']


def test_ziln_runs_keep_the_checkpoint_of_their_best_gini(cache_dir, tmp_path):
  workdir = str(tmp_path / 'ziln')
  config = tiny_config(cache_dir, head='ziln', max_steps=16, patience=10)
  result = loop_lib.train_and_evaluate(config, workdir)
  gini = {line['step']: line['valid']['watch_time']['gini'] for line in _lines(workdir)}
  assert len(gini) == 4
  assert result['best_step'] == max(gini, key=gini.get)
  assert np.isfinite(result['valid']['watch_time']['gini'])

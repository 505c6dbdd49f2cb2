"""Benchmarks of docs/benchmarks.md, reported as ratios measured in one run.

    python tools/bench.py --quick --json     # one JSON object on stdout
    python tools/bench.py                     # every model, more steps, a table

Step times are windows of steps dispatched back to back (as the training loop runs them),
at batch 2048 on random KuaiRand-sized inputs (45 fields, d = 10, towers [128, 64, 32]).
Configurations are timed in interleaved rounds, one window each per round, so that load
from other processes hits all of them alike; a ratio is the median over rounds of the two
configurations' window times in the same round, and ``step_ms`` / ``examples_per_s`` are
medians over rounds. Only the ratios are meaningful across machines. Like
``train_and_evaluate``, the bench keeps XLA's per-step scratch memory mapped on CPU
(``htl_jax.runtime.allocator``). Keys:

- ``grad_process_overhead``: HTLNet step time with ``grad_process='htl'`` / ``'none'``,
  4e4-row vocabulary (goal <= 1.25);
- ``grad_process_overhead_1e6``: the same with a 1e6-row user-id vocabulary (goal <= 1.3);
- ``htlnet_vs_shared_bottom``: HTLNet (htl) / Shared-Bottom (none) (goal <= 1.5);
- ``htlnet_vs_shared_bottom_flops``: the same ratio of XLA's FLOP counts per step
  (``gflop_per_step``): with the paper's sizes HTLNet does ~2x Shared-Bottom's work, so this is
  the floor of the step-time ratio when both run at the same FLOP rate;
- ``fast_path_speedup``: HTLNet's per-task gradients by vmap over cotangents / by one
  backward pass over per-tower copies;
- ``examples_per_s``: per configuration (goal: HTLNet >= 50k on 2 cores);
- ``prep_rows_per_s``, ``prep_seconds``, ``prep_peak_rss_mb``: preprocessing a generated
  1.2M-row KuaiRand-format log (goal <= 15 s), in a subprocess so its peak memory is its own;
- ``metrics_1m_seconds``: all six metrics of two binary tasks and the core on 1M
  predictions (goal <= 2 s);
- ``end_to_end_vs_step``: per model (HTLNet htl, Shared-Bottom none), the training
  examples/s of ``train_and_evaluate`` on the same generated 1.2M-row KuaiRand-format log at
  batch 2048 (windows of steps between evaluations: batches fed as ``config.feed`` says,
  the loop's bookkeeping, no evaluation, checkpoint or compile) / the pure step's
  examples/s of the same model on the log's spec, the two timed in alternation
  (goal >= 0.97);
- ``end_to_end_vs_step_one_epoch``: the same for a fresh one-epoch run with the boundaries
  docs/data.md gives for data of this size (evaluations and checkpoints every 500 steps, a
  log line every 100; its ``train_seconds``: every step from the first, the programs
  compiled before it) against the pure step timed right after (goal >= 0.97);
- ``run_overhead`` (``--run_overhead``): the wall time of the README's main command in a
  fresh process (warm compilation cache) / its steps' compute time (the pure step of the
  same model and batch, times the run's steps); the goal <= 1.5;
- ``table3_seconds`` (``--table3_seeds N``): the wall time of ``htl-reproduce
  --experiment=table3 --seeds=N`` on the sample, twice in a row (cold, then warm cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from htl_jax.configs.base import get_base_config
from htl_jax import metrics as metrics_lib
from htl_jax.spec import HybridSpec
from htl_jax.models import MODELS, model_class
from htl_jax.losses import CoreTransform
from htl_jax.runtime import allocator
from htl_jax.train import parallel
from htl_jax.train import step as step_lib
from htl_jax.train.state import init_state, make_setup

NUM_FIELDS = 45


def make_spec(user_vocab: int) -> HybridSpec:
  """45 fields: a user id, a video id and 43 small fields (4e4 rows with 20k users)."""
  sizes = (user_vocab, 8000) + (279,) * (NUM_FIELDS - 2)
  return HybridSpec(tuple(f'f{i}' for i in range(NUM_FIELDS)), sizes,
                    ('click', 'long_view'), 'watch_time')


def make_batch(spec: HybridSpec, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  # Zipf-like ids, so ids repeat within a batch as in real logs.
  x = np.stack([np.minimum(rng.zipf(1.3, batch_size), v - 1) for v in spec.vocab_sizes], 1)
  click = rng.random(batch_size) < 0.18
  long_view = click & (rng.random(batch_size) < 0.5)
  core = np.where(click, rng.lognormal(1.5, 1.0, batch_size), 0.0)
  return {'x': x.astype(np.int32), 'y': np.stack([click, long_view], 1).astype(np.float32),
          'core': core.astype(np.float32), 'index': np.arange(batch_size, dtype=np.int32),
          'weight': np.ones(batch_size, np.float32)}


class Runner:
  """One configuration's compiled train step, its state and a batch."""

  def __init__(self, spec: HybridSpec, batch_size: int, grad_path: str | None = None,
               **overrides):
    config = get_base_config()
    config.batch_size = batch_size
    for key, value in overrides.items():
      config[key] = value
    setup = make_setup(config, spec, CoreTransform('standardize', 2.0, 5.0))
    if grad_path is not None:
      setup = dataclasses.replace(setup, grad_path=grad_path)
    self.setup = setup
    # The pure step: one train step per call, without Fig. 5's diagnostics.
    self.step = parallel.pmap_program(functools.partial(step_lib.train_step, setup), donate=0)
    # Built by one compiled program per device: a 1e8-row table and its moments are
    # written once, with no host copy and no temporaries.
    self.state = parallel.pmap_program(lambda _: init_state(setup, config))(
        np.zeros(parallel.device_count()))
    self.batch = parallel.put_sharded(parallel.shard(make_batch(spec, batch_size)))
    self.times: list[float] = []

  def run(self, steps: int, record: bool = True) -> None:
    """Dispatch ``steps`` steps back to back, as the training loop does, then wait.

    The recorded step time is the window's time over ``steps``: host dispatch of step i+1
    overlaps step i's compute, as in ``train_and_evaluate``, which never blocks per step.
    """
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    if record:
      self.times.append((time.perf_counter() - start) / steps)

  def gflops(self) -> float:
    """XLA's FLOP count of the timed train step (forward, backward, optimizer), in GFLOP:
    the loop's step between evaluations, without Fig. 5's diagnostics."""
    cost = self.step.lower(self.state, self.batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost['flops']) / 1e9

  @property
  def median(self) -> float:
    return float(np.median(self.times))


def step_configs(quick: bool) -> dict[str, tuple[HybridSpec, str | None, dict]]:
  """``name -> (spec, grad_path, config overrides)`` of every timed configuration."""
  small, large = make_spec(20000), make_spec(1_000_000 - 12000 - 8000)
  huge = make_spec(10_000_000 - 12000 - 8000)
  lazy = {'embedding_optimizer': 'lazy_adam'}
  configs = {
      'htlnet/htl': (small, None, {'model': 'htlnet', 'grad_process': 'htl'}),
      'htlnet/none': (small, None, {'model': 'htlnet', 'grad_process': 'none'}),
      'htlnet/htl/general_path': (small, 'general', {'model': 'htlnet',
                                                     'grad_process': 'htl'}),
      'shared_bottom/none': (small, None, {'model': 'shared_bottom', 'grad_process': 'none'}),
      'htlnet/htl/1e6': (large, None, {'model': 'htlnet', 'grad_process': 'htl'}),
      'htlnet/none/1e6': (large, None, {'model': 'htlnet', 'grad_process': 'none'}),
      'htlnet/htl/lazy': (small, None, {'model': 'htlnet', 'grad_process': 'htl', **lazy}),
      'htlnet/htl/lazy/1e7': (huge, None, {'model': 'htlnet', 'grad_process': 'htl',
                                           **lazy}),
      'shared_bottom/none/lazy': (small, None, {'model': 'shared_bottom',
                                                'grad_process': 'none', **lazy}),
      'shared_bottom/none/lazy/1e7': (huge, None, {'model': 'shared_bottom',
                                                   'grad_process': 'none', **lazy}),
  }
  if not quick:                 # every model with its default process, as the paper runs it
    for name in MODELS:
      overrides = {'model': name, 'grad_process': 'auto'}
      if name == 'ziln':
        overrides['head'] = 'ziln'
      configs.setdefault(f'{name}/{model_class(name).default_grad_process}',
                         (small, None, overrides))
    configs['mmoe/metabalance'] = (small, None, {'model': 'mmoe',
                                                 'grad_process': 'metabalance'})
  return configs


def bench_steps(quick: bool, batch_size: int) -> dict:
  runners = {}
  for key, (spec, path, overrides) in step_configs(quick).items():
    runners[key] = Runner(spec, batch_size, path, **overrides)
    runners[key].run(3, record=False)              # compile and warm up
  rounds, per_round = (12, 5) if quick else (16, 10)
  for _ in range(rounds):                          # interleaved, so load hits all alike
    for runner in runners.values():
      runner.run(per_round)
  med = {k: r.median for k, r in runners.items()}
  gflops = {k: r.gflops() for k, r in runners.items()}

  def ratio(a: str, b: str) -> float:
    """Median over rounds of a's window time / b's in the same round (load drifts)."""
    return float(np.median(np.divide(runners[a].times, runners[b].times)))

  return {
      'grad_process_overhead': ratio('htlnet/htl', 'htlnet/none'),
      'grad_process_overhead_1e6': ratio('htlnet/htl/1e6', 'htlnet/none/1e6'),
      'htlnet_vs_shared_bottom': ratio('htlnet/htl', 'shared_bottom/none'),
      'htlnet_vs_shared_bottom_flops': gflops['htlnet/htl'] / gflops['shared_bottom/none'],
      'gflop_per_step': gflops,
      'fast_path_speedup': ratio('htlnet/htl/general_path', 'htlnet/htl'),
      'vocab_scaling_1e7': {
          'htlnet/htl': ratio('htlnet/htl/lazy/1e7', 'htlnet/htl/lazy'),
          'shared_bottom/none': ratio('shared_bottom/none/lazy/1e7',
                                      'shared_bottom/none/lazy')},
      'lazy_vs_dense_adam': {
          'htlnet/htl': ratio('htlnet/htl/lazy', 'htlnet/htl'),
          'shared_bottom/none': ratio('shared_bottom/none/lazy', 'shared_bottom/none')},
      'examples_per_s': {k: batch_size / v for k, v in med.items()},
      'gflop_per_s': {k: gflops[k] / v for k, v in med.items()},
      'step_ms': {k: 1e3 * v for k, v in med.items()},
  }


_PREP_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from htl_jax.configs.kuairand import get_config
from htl_jax.data import load_dataset
config = get_config()
config.data_dir = {data_dir!r}
start = time.perf_counter()
data = load_dataset(config, None)
seconds = time.perf_counter() - start
rows = len(data.train) + len(data.valid) + len(data.test)
print(json.dumps({{'rows': rows, 'seconds': seconds}}))
"""


def make_log(rows: int, out: str) -> None:
  """Writes a generated ``rows``-row KuaiRand-format log (KuaiRand-Pure's users, videos)."""
  subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'make_kuairand_sample.py'),
                  '--rows', str(rows), '--users', '27285', '--videos', '7583',
                  '--out', out], check=True, capture_output=True)


def bench_prep(log_dir: str) -> dict:
  """Preprocess the generated log in ``log_dir``, in a child process."""
  child = subprocess.run([sys.executable, '-c', _PREP_CHILD.format(repo=REPO,
                                                                   data_dir=log_dir)],
                         check=True, capture_output=True, text=True)
  out = json.loads(child.stdout.strip().splitlines()[-1])
  peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return {'prep_rows': out['rows'], 'prep_seconds': out['seconds'],
          'prep_rows_per_s': out['rows'] / out['seconds'], 'prep_peak_rss_mb': peak_kb / 1024}


def _log_config(log_dir: str, cache_dir: str, batch_size: int, **overrides):
  from htl_jax.configs.kuairand import get_config  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.data_dir, config.cache_dir, config.batch_size = log_dir, cache_dir, batch_size
  for key, value in overrides.items():
    config[key] = value
  return config


def bench_end_to_end(log_dir: str, batch_size: int, window: int = 100, rounds: int = 8
                     ) -> dict:
  """``end_to_end_vs_step``: ``train_and_evaluate``'s training examples/s / the pure step's.

  The run evaluates (and checkpoints) every ``window`` steps, ``rounds + 1`` times; each
  ``metrics.jsonl`` line after the first times the ``window`` steps since the previous
  evaluation (batches fed as ``config.feed`` says, logging, finiteness checks; not the
  evaluation, the checkpoint or the compile). Right after each evaluation (the loop's
  ``on_eval``, outside its timed window) the pure step (:class:`Runner`: the same model on
  the log's spec) is timed for ``window`` steps, so the two alternate round by round and load
  drift hits both. The ratio is the median of the loop's windows over the median of the
  pure step's.
  """
  from htl_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from htl_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  result = {'end_to_end_vs_step': {}, 'end_to_end_examples_per_s': {}}
  with tempfile.TemporaryDirectory() as tmp:
    for key, overrides in (('htlnet/htl', {'model': 'htlnet', 'grad_process': 'htl'}),
                           ('shared_bottom/none', {'model': 'shared_bottom',
                                                   'grad_process': 'none'})):
      config = _log_config(log_dir, os.path.join(tmp, 'cache'), batch_size,
                           eval_every=window, max_steps=(rounds + 1) * window,
                           log_every=window, checkpoint_every=window, **overrides)
      runner = Runner(load_dataset(config, config.cache_dir).spec, batch_size, **overrides)
      runner.run(3, record=False)
      workdir = os.path.join(tmp, key.replace('/', '_'))
      train_and_evaluate(config, workdir, on_eval=lambda step, valid: runner.run(window))
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        loop_rates = [json.loads(line)['examples_per_s'] for line in f][1:]
      end_to_end = float(np.median(loop_rates))
      result['end_to_end_examples_per_s'][key] = end_to_end
      result['end_to_end_vs_step'][key] = end_to_end * runner.median / batch_size
  return result


def bench_one_epoch(log_dir: str, batch_size: int) -> dict:
  """``end_to_end_vs_step_one_epoch``: a fresh one-epoch run (its ``train_seconds``) against
  the pure step of the same model, timed right after for as many steps."""
  from htl_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  from htl_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  result = {'end_to_end_vs_step_one_epoch': {}}
  with tempfile.TemporaryDirectory() as tmp:
    for key, overrides in (('htlnet/htl', {'model': 'htlnet', 'grad_process': 'htl'}),
                           ('shared_bottom/none', {'model': 'shared_bottom',
                                                   'grad_process': 'none'})):
      # The cadence docs/data.md gives for KuaiRand-Pure-sized data (the base config's), not
      # the embedded sample's evaluation every 50 steps.
      config = _log_config(log_dir, os.path.join(tmp, 'cache'), batch_size, num_epochs=1,
                           patience=100, eval_every=500, checkpoint_every=500,
                           log_every=100, **overrides)
      run = train_and_evaluate(config, os.path.join(tmp, key.replace('/', '_')))
      runner = Runner(load_dataset(config, config.cache_dir).spec, batch_size, **overrides)
      runner.run(3, record=False)
      runner.run(run['steps'])
      loop_rate = run['steps'] * batch_size / run['train_seconds']
      result['end_to_end_vs_step_one_epoch'][key] = loop_rate * runner.median / batch_size
  return result


def bench_run_overhead(repeats: int = 3) -> dict:
  """``run_overhead``: the README's main command in a fresh process (warm compilation
  cache) over its steps' compute time (module docstring)."""
  from htl_jax.configs.kuairand import get_config  # pylint: disable=g-import-not-at-top
  from htl_jax.data import default_cache_dir, load_dataset  # pylint: disable=g-import-not-at-top
  walls = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(repeats + 1):                     # the first run warms the caches
      workdir = os.path.join(tmp, str(i))
      start = time.perf_counter()
      subprocess.run([sys.executable, '-m', 'experiments.main', '--config=kuairand',
                      f'--workdir={workdir}'], cwd=REPO, check=True, capture_output=True)
      walls.append(time.perf_counter() - start)
      with open(os.path.join(workdir, 'metrics.json')) as f:
        steps = json.load(f)['steps']
  config = get_config()
  runner = Runner(load_dataset(config, default_cache_dir()).spec, config.batch_size,
                  model=config.model, grad_process='auto')
  runner.run(3, record=False)
  for _ in range(5):
    runner.run(50)
  wall = float(np.median(walls[1:]))
  return {'run_overhead': wall / (steps * runner.median), 'run_wall_seconds': wall,
          'run_steps': steps, 'run_step_ms': 1e3 * runner.median}


def bench_table3(seeds: int) -> dict:
  """``table3_seconds``: ``htl-reproduce --experiment=table3`` on the sample, cold, warm."""
  seconds = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(2):
      start = time.perf_counter()
      subprocess.run([sys.executable, '-m', 'experiments.reproduce', '--experiment=table3',
                      '--config=kuairand', f'--seeds={seeds}',
                      f'--workdir={os.path.join(tmp, str(i))}'],
                     cwd=REPO, check=True, capture_output=True)
      seconds.append(time.perf_counter() - start)
  return {'table3_seeds': seeds, 'table3_seconds': {'first': seconds[0],
                                                    'again': seconds[1]}}


def bench_metrics(n: int = 1_000_000) -> dict:
  """Seconds for ``evaluate_tasks`` on ``n`` rows with ties (rounded predictions)."""
  rng = np.random.default_rng(0)
  y = (rng.random((n, 2)) < [0.18, 0.09]).astype(np.float32)
  probs = np.round(rng.random((n, 2)), 3)
  core = rng.lognormal(1.0, 1.0, n) * y[:, 0]
  start = time.perf_counter()
  metrics_lib.evaluate_tasks(y, probs, core, np.round(core + rng.random(n), 2),
                             ('click', 'long_view', 'watch_time'))
  return {'metrics_1m_seconds': time.perf_counter() - start}


def bench_huge_vocab(rows: int, batch_size: int, steps: int = 20) -> dict:
  """HTLNet (htl) with ``lazy_adam`` at a ``rows``-row user vocabulary: examples/s, peak RSS.

  1e8 rows of d = 10 are 12 GB of table and Adam moments (plus 0.8 GB of per-row counts and
  id scratch): run it alone, on a machine with that much free memory.
  """
  spec = make_spec(rows - 8000 - 279 * (NUM_FIELDS - 2))
  runner = Runner(spec, batch_size, model='htlnet', grad_process='htl',
                  embedding_optimizer='lazy_adam')
  runner.run(3, record=False)
  for _ in range(steps // 5):
    runner.run(5)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {'huge_vocab_rows': spec.total_vocab, 'huge_vocab_examples_per_s':
          batch_size / runner.median, 'huge_vocab_peak_rss_gb': peak_kb / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--quick', action='store_true', help='fewer models and steps')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--batch_size', type=int, default=2048)
  parser.add_argument('--prep_rows', type=int, default=1_200_000)
  parser.add_argument('--skip_prep', action='store_true')
  parser.add_argument('--skip_end_to_end', action='store_true')
  parser.add_argument('--only_end_to_end', action='store_true',
                      help='only the end_to_end_vs_step key')
  parser.add_argument('--huge_vocab', type=int, default=0,
                      help='only time HTLNet + lazy_adam at this many rows (e.g. 100000000)')
  parser.add_argument('--default_malloc', action='store_true',
                      help="leave glibc's malloc thresholds alone (to measure their effect)")
  parser.add_argument('--run_overhead', action='store_true',
                      help='only run_overhead (a fresh-process run over its steps)')
  parser.add_argument('--table3_seeds', type=int, default=0,
                      help='only time htl-reproduce --experiment=table3 with this many seeds')
  args = parser.parse_args()
  tuned = (not args.default_malloc and parallel.platform() == 'cpu'
           and allocator.keep_scratch_memory())
  result = {'devices': parallel.device_count(), 'batch_size': args.batch_size,
            'backend': jax.default_backend(), 'malloc_tuned': tuned}
  if args.only_end_to_end:
    with tempfile.TemporaryDirectory() as log_dir:
      make_log(args.prep_rows, log_dir)
      result.update(bench_end_to_end(log_dir, args.batch_size))
      result.update(bench_one_epoch(log_dir, args.batch_size))
    print(json.dumps(result))
    return
  if args.run_overhead or args.table3_seeds:
    result.update(bench_run_overhead() if args.run_overhead else {})
    result.update(bench_table3(args.table3_seeds) if args.table3_seeds else {})
    print(json.dumps(result))
    return
  if args.huge_vocab:
    result.update(bench_huge_vocab(args.huge_vocab, args.batch_size))
    print(json.dumps(result))
    return
  if not (args.skip_prep and args.skip_end_to_end):
    with tempfile.TemporaryDirectory() as log_dir:
      make_log(args.prep_rows, log_dir)
      if not args.skip_prep:
        result.update(bench_prep(log_dir))
      if not args.skip_end_to_end:
        result.update(bench_end_to_end(log_dir, args.batch_size))
        result.update(bench_one_epoch(log_dir, args.batch_size))
  result.update(bench_metrics())
  result.update(bench_steps(args.quick, args.batch_size))
  if args.json:
    print(json.dumps(result))
    return
  for key, value in result.items():
    if isinstance(value, dict):
      for sub, v in value.items():
        print(f'{key:>28s}  {sub:<28s} {v:12.2f}')
    else:
      print(f'{key:>28s}  {value}')


if __name__ == '__main__':
  main()

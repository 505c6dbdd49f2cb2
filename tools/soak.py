"""Many short runs in one process, as a reproduction or a tuning study runs them: memory
maps, resident memory and compilations along the way.

    python tools/soak.py --runs 200 --json

Each run is a smoke-sized ``train_and_evaluate`` on the embedded sample; runs cycle through
``--shapes`` embedding sizes (new shapes compile, equal shapes reuse the compiled programs)
and every run has its own seed, learning rate and Algorithm 1 weights. A process that leaked
per run (the kernel allows 65,530 memory maps) would die after a few hundred runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import logging  # pylint: disable=g-import-not-at-top
import jax

from htl_jax.configs import kuairand
from htl_jax.train.loop import train_and_evaluate

_compiles: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _compiles.append(secs)
    if name == '/jax/core/compile/backend_compile_duration' else None)


def _maps() -> int:
  with open('/proc/self/maps') as f:
    return sum(1 for _ in f)


def _rss_mb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--runs', type=int, default=200)
  parser.add_argument('--shapes', type=int, default=3, help='embedding sizes cycled through')
  parser.add_argument('--every', type=int, default=25, help='report every this many runs')
  parser.add_argument('--checkpoint_seconds', type=float, default=60.0,
                      help="the runs' checkpoint_seconds: 60 as in a study (two saves a run), "
                           '0 to save at every evaluation as smoke runs do')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  report, start = [], time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.runs):
      config = kuairand.get_config('smoke=True')
      config.cache_dir = os.path.join(tmp, 'cache')
      config.checkpoint_seconds = args.checkpoint_seconds
      config.seed, config.embed_dim = i, 4 + i % args.shapes
      config.learning_rate, config.alpha, config.gamma = 1e-3 * (1 + i % 7), 0.1, 0.5
      train_and_evaluate(config, os.path.join(tmp, 'run'))
      shutil.rmtree(os.path.join(tmp, 'run'))
      if (i + 1) % args.every == 0 or i == 0:
        report.append({'runs': i + 1, 'memory_maps': _maps(), 'rss_mb': round(_rss_mb()),
                       'compiles': len(_compiles),
                       'seconds': round(time.perf_counter() - start, 1)})
        if not args.json:
          print(report[-1], flush=True)
  if args.json:
    print(json.dumps({'soak': report}))


if __name__ == '__main__':
  main()

"""Throughput and peak memory of ``experiments.predict`` on a large generated tabular file.

    python tools/bench_predict.py --rows=10000000 --dir=/tmp/bench_predict

1. generates ``train.csv`` (``--train_rows`` rows) and ``score.csv`` (``--rows`` rows, no
   labels) with an id column, three categorical fields (one with ``--users`` ids) and two
   numeric fields; generation is chunked, so it needs little memory;
2. trains a short HTLNet run on ``train.csv`` (paper sizes: towers (128, 64, 32), d = 10);
3. runs ``python -m experiments.predict`` on ``score.csv`` in a subprocess and reports its
   wall time (process start and compile included), rows/s and peak RSS (``ru_maxrss`` of
   that process alone), as one JSON line.

Files that already exist are reused (delete ``--dir`` to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import polars as pl

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHANNELS = np.array(['web', 'app', 'mail', 'ads', 'shop'])


def _chunk(rng: np.random.Generator, start: int, n: int, users: int, labels: bool
           ) -> pl.DataFrame:
  """``n`` rows: ids from ``start``; click -> buy -> amount when ``labels``."""
  user = rng.integers(0, users, n)
  item = rng.integers(0, 5000, n)
  price = np.round(rng.lognormal(2.0, 0.7, n), 2)
  frame = {'row_id': np.arange(start, start + n), 'user': user, 'item': item,
           'channel': _CHANNELS[rng.integers(0, 5, n)], 'price': price,
           'age': rng.integers(18, 80, n)}
  if labels:
    score = 0.3 * np.sin(user) + 0.3 * np.cos(item) - 0.3 * np.log(price)
    click = rng.random(n) < 1 / (1 + np.exp(-(score - 0.8)))
    buy = click & (rng.random(n) < 1 / (1 + np.exp(-score)))
    frame.update(click=click.astype(np.int8), buy=buy.astype(np.int8),
                 amount=np.round(buy * price * rng.lognormal(0, 0.5, n), 2))
  return pl.DataFrame(frame)


def generate(path: str, rows: int, users: int, labels: bool, seed: int) -> None:
  """Writes ``rows`` generated rows to the CSV ``path``, one million at a time."""
  if os.path.exists(path):
    return
  rng = np.random.default_rng(seed)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    for start in range(0, rows, 1_000_000):
      _chunk(rng, start, min(1_000_000, rows - start), users, labels).write_csv(
          f, include_header=start == 0)
  os.replace(tmp, path)


# Runs its arguments as a child and prints the child's peak RSS (kB), so that the figure
# is the scoring process's own, not the training run's started by this script.
_PEAK_RSS = ('import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, '
             'stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); '
             'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')


def _run(args: list[str]) -> tuple[float, float]:
  """Runs ``python ARGS`` in the repository; returns (seconds, peak RSS in MiB)."""
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-c', _PEAK_RSS, sys.executable, *args],
                          cwd=_REPO, check=True, capture_output=True, text=True)
  return time.perf_counter() - start, int(result.stdout.split()[-1]) / 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', type=int, default=10_000_000)
  parser.add_argument('--train_rows', type=int, default=200_000)
  parser.add_argument('--users', type=int, default=100_000)
  parser.add_argument('--chunk_rows', type=int, default=1 << 18)
  parser.add_argument('--dir', default='/tmp/htl_bench_predict')
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  train, score = (os.path.join(args.dir, n) for n in ('train.csv', 'score.csv'))
  generate(train, args.train_rows, args.users, labels=True, seed=0)
  generate(score, args.rows, args.users, labels=False, seed=1)
  workdir = os.path.join(args.dir, 'run')
  if not os.path.exists(os.path.join(workdir, 'metrics.json')):
    _run(['-m', 'experiments.main', '--config=configs/tabular.py', f'--workdir={workdir}',
          f'--config.data.path={train}', '--config.data.categorical=user,item,channel',
          '--config.data.numeric=price,age', '--config.data.tasks=click,buy',
          '--config.data.core=amount', '--config.data.passthrough=row_id',
          '--config.max_steps=200', '--config.eval_every=100', '--config.cache_dir=' +
          os.path.join(args.dir, 'cache')])
  out = os.path.join(args.dir, 'predictions.parquet')
  seconds, peak_mb = _run(['-m', 'experiments.predict', f'--workdir={workdir}',
                           f'--data={score}', f'--out={out}', f'--chunk_rows={args.chunk_rows}'])
  written = pl.scan_parquet(out).select(pl.len()).collect().item()
  print(json.dumps({'rows': written, 'seconds': round(seconds, 1),
                    'rows_per_s': round(written / seconds), 'peak_rss_mb': round(peak_mb),
                    'chunk_rows': args.chunk_rows, 'score_csv_mb': round(
                        os.path.getsize(score) / 2**20)}))


if __name__ == '__main__':
  main()

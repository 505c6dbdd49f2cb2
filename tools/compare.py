"""Train several models (and seeds) on one config and print a table of test metrics.

    python tools/compare.py --config=configs/hillstrom.py --models=htlnet,shared_bottom,dnn \\
        --seeds=0,1,2 --workdir=runs/compare_hillstrom

Each (model, seed) trains with ``train_and_evaluate`` in ``<workdir>/<model>/seed<k>`` (so an
interrupted comparison resumes); the table gives the mean and standard deviation over seeds
of every test metric, and the median training examples/s. ``--set NAME=VALUE`` (repeatable)
overrides config fields for every run, e.g. ``--set num_epochs=5``. With ``--json`` it prints
one JSON object instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import logging  # pylint: disable=g-import-not-at-top

from configs import common
from htl_jax.train.loop import train_and_evaluate


def load_config(path: str):
  """``configs/x.py[:arg]`` -> ConfigDict, as ``--config`` of ``experiments.main`` does."""
  path, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('compare_config', os.path.join(REPO, path)
                                                if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def run_one(config_path: str, model: str, seed: int, overrides: list[str], workdir: str):
  config = load_config(config_path)
  config.model, config.seed = model, seed
  common.apply_args(config, ','.join(overrides) if overrides else None)
  result = train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    speeds = [json.loads(line)['examples_per_s'] for line in f if line.strip()]
  return result['test'], float(np.median(speeds)) if speeds else float('nan')


def summarize(results: dict) -> dict:
  """{model: [(test, speed) per seed]} -> {model: {task: {metric: (mean, std)}, speed}}."""
  table = {}
  for model, runs in results.items():
    tests = [t for t, _ in runs]
    table[model] = {
        task: {m: (float(np.mean([t[task][m] for t in tests])),
                   float(np.std([t[task][m] for t in tests]))) for m in tests[0][task]}
        for task in tests[0]}
    table[model]['examples_per_s'] = float(np.median([s for _, s in runs]))
  return table


def markdown(table: dict) -> str:
  models = list(table)
  tasks = [t for t in table[models[0]] if t != 'examples_per_s']
  cols = [(t, m) for t in tasks for m in table[models[0]][t]]
  lines = ['| model | ' + ' | '.join(f'{t} {m}' for t, m in cols) + ' | examples/s |',
           '|---' * (len(cols) + 2) + '|']
  for model in models:
    cells = [f'{table[model][t][m][0]:.4f} ± {table[model][t][m][1]:.4f}' for t, m in cols]
    lines.append(f'| {model} | ' + ' | '.join(cells) +
                 f' | {table[model]["examples_per_s"]:.0f} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  parser.add_argument('--models', default='htlnet,shared_bottom,dnn')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--set', action='append', default=[], help='NAME=VALUE override')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  results = {}
  for model in args.models.split(','):
    for seed in map(int, args.seeds.split(',')):
      workdir = os.path.join(args.workdir, model, f'seed{seed}')
      results.setdefault(model, []).append(run_one(args.config, model, seed, args.set,
                                                   workdir))
      print(f'done: {model} seed {seed}', file=sys.stderr, flush=True)
  table = summarize(results)
  print(json.dumps(table) if args.json else markdown(table))


if __name__ == '__main__':
  main()

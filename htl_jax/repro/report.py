"""An experiment's results as the paper reports them: ``results.csv`` and ``table.md``.

``results.csv`` has one row per run, split, task and metric (variant, seed, split, task,
metric, value, best_step, train_seconds_per_epoch). ``table.md`` gives, per variant and test
metric, the mean ± std over seeds, the best variant in **bold** and the second <u>underlined</u>
(direction from :data:`htl_jax.metrics.LOWER_IS_BETTER`), and a ``*`` on the experiment's own
method where it differs from the best baseline with p <= 0.05 in a two-sample t-test
(``scipy.stats.ttest_ind``), as in the paper's Table 2. Undefined metrics (``null``) are
left out of means and tests.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Optional

import numpy as np
from scipy import stats

from htl_jax import metrics as metrics_lib
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro.runner import parse_cell, run_dir

SIGNIFICANCE = 0.05
COLUMNS = ('variant', 'seed', 'split', 'task', 'metric', 'value', 'best_step',
           'train_seconds_per_epoch')


def rows(results: dict[str, dict]) -> list[dict[str, Any]]:
  """``{cell: metrics.json dict}`` -> the rows of ``results.csv``."""
  out = []
  for cell, result in results.items():
    variant, seed = parse_cell(cell)
    epochs = result.get('epochs') or 0
    per_epoch = result.get('train_seconds', 0.0) / epochs if epochs else None
    for split in ('valid', 'test'):
      for task, values in result[split].items():
        for metric, value in values.items():
          out.append({'variant': variant, 'seed': seed, 'split': split, 'task': task,
                      'metric': metric, 'value': value, 'best_step': result.get('best_step'),
                      'train_seconds_per_epoch': per_epoch})
  return out


def write_csv(path: str, table: list[dict[str, Any]]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table:
      writer.writerow({k: '' if row[k] is None else row[k] for k in COLUMNS})
  os.replace(tmp, path)


def values_by_variant(table: list[dict[str, Any]], task: str, metric: str,
                      split: str = 'test') -> dict[str, list[float]]:
  """``{variant: [value per seed]}`` of one task's metric (undefined values dropped)."""
  out: dict[str, list[float]] = {}
  for row in table:
    if (row['split'], row['task'], row['metric']) == (split, task, metric):
      out.setdefault(row['variant'], [])
      if row['value'] is not None and math.isfinite(row['value']):
        out[row['variant']].append(float(row['value']))
  return out


def ranked(means: dict[str, float], metric: str) -> list[str]:
  """Variants from best to worst on ``metric``."""
  lower = metric in metrics_lib.LOWER_IS_BETTER
  return sorted(means, key=lambda v: means[v] if lower else -means[v])


def significance(values: dict[str, list[float]], metric: str, ours: str,
                 baselines: tuple[str, ...]) -> Optional[tuple[float, bool, str]]:
  """(p-value, ours is better, the best baseline) of ``ours`` against the best baseline,
  or None.

  The p-value is the two-sample t-test's (``scipy.stats.ttest_ind``); the table stars
  ``ours`` only where it is better AND p <= 0.05.
  """
  candidates = {v: np.mean(values[v]) for v in baselines if len(values.get(v, [])) >= 2}
  if len(values.get(ours, [])) < 2 or not candidates:
    return None
  best = ranked(candidates, metric)[0]
  a, b = np.asarray(values[ours]), np.asarray(values[best])
  better = ranked({ours: float(a.mean()), best: float(b.mean())}, metric)[0] == ours
  return _pvalue(a, b), better and a.mean() != b.mean(), best


def _pvalue(a: np.ndarray, b: np.ndarray) -> float:
  if np.ptp(a) == 0 and np.ptp(b) == 0:
    return 0.0 if a[0] != b[0] else 1.0
  return float(stats.ttest_ind(a, b).pvalue)


def _cell(mean: float, std: float, rank: int, star: bool) -> str:
  text = f'{mean:.4f} ± {std:.4f}' + ('*' if star else '')
  if rank == 0:
    return f'**{text}**'
  if rank == 1:
    return f'<u>{text}</u>'
  return text


def markdown(table: list[dict[str, Any]], experiment: experiments_lib.Experiment,
             variants: list[str]) -> str:
  """The experiment's ``table.md``: variants as rows, test metrics of every task as columns."""
  columns = []
  for row in table:
    key = (row['task'], row['metric'])
    if row['split'] == 'test' and key not in columns:
      columns.append(key)
  header = '| variant | ' + ' | '.join(f'{t} {m}' for t, m in columns) + ' |'
  lines = [f'## {experiment.title}', '', header, '|---' * (len(columns) + 1) + '|']
  cells: dict[str, list[str]] = {v: [] for v in variants}
  notes = []
  for task, metric in columns:
    values = values_by_variant(table, task, metric)
    means = {v: float(np.mean(x)) for v, x in values.items() if x and v in cells}
    order = ranked(means, metric)
    test = (significance(values, metric, experiment.ours, experiment.baselines)
            if experiment.ours else None)
    if test is not None:
      relation = 'better than' if test[1] else 'not better than'
      notes.append(f'{task} {metric}: p = {test[0]:.3g} ({experiment.ours} {relation} '
                   f'{test[2]})')
    for variant in variants:
      x = values.get(variant, [])
      if not x:
        cells[variant].append('n/a')
        continue
      star = (variant == experiment.ours and test is not None and test[1]
              and test[0] <= SIGNIFICANCE)
      std = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0    # the sample std
      cells[variant].append(_cell(float(np.mean(x)), std, order.index(variant), star))
  for variant in variants:
    lines.append(f'| {variant} | ' + ' | '.join(cells[variant]) + ' |')
  seeds = sorted({row['seed'] for row in table})
  lines += ['', f'Test split; mean ± sample std (ddof = 1) over {len(seeds)} seed(s); best '
            '**bold**, second <u>underlined</u>.']
  if experiment.ours:
    lines.append(f'`*`: {experiment.ours} is better than the best baseline with p <= '
                 f'{SIGNIFICANCE} (two-sample t-test). p-values: ' + '; '.join(notes))
  return '\n'.join(lines) + '\n'


def tuned_section(tuned: dict[str, dict[str, Any]]) -> str:
  """The overrides every variant started from (its tuning study's best configuration)."""
  if not any(tuned.values()):
    return ''
  lines = ['', 'Tuned configurations (each variant\'s study over Table 6; the variant\'s own '
           'overrides apply on top):', '']
  for variant, overrides in tuned.items():
    values = ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}'
                       for k, v in sorted(overrides.items()))
    lines.append(f'- {variant}: {values or "the defaults of the config (no tuned study)"}')
  return '\n'.join(lines) + '\n'


def write_report(workdir: str, results: dict[str, dict],
                 experiment: experiments_lib.Experiment, variants: list[str],
                 tuned: Optional[dict[str, dict[str, Any]]] = None) -> str:
  """Writes ``results.csv`` and ``table.md`` into ``workdir``; returns the markdown."""
  table = rows(results)
  write_csv(os.path.join(workdir, 'results.csv'), table)
  text = markdown(table, experiment, variants) + tuned_section(tuned or {})
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(text)
  return text


def dataset_table(data, title: str) -> str:
  """Table 1: rows, positive rates and core statistics of each split of ``data``."""
  spec = data.spec
  header = ['split', 'rows'] + [f'{t} rate' for t in spec.binary_tasks] + [
      f'{spec.core_task} mean', f'{spec.core_task} std', f'{spec.core_task} zeros']
  lines = [f'## {title}', '', '| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
  for name in ('train', 'valid', 'test'):
    split = getattr(data, name)
    rates = [f'{100 * float(np.mean(split.y[:, t])):.2f}%' for t in range(spec.num_binary)]
    core = np.asarray(split.core, np.float64)
    lines.append('| ' + ' | '.join([name, str(len(split))] + rates + [
        f'{core.mean():.3f}', f'{core.std():.3f}', f'{100 * np.mean(core == 0):.1f}%']) + ' |')
  lines += ['', f'{spec.num_fields} fields, {spec.total_vocab} ids in the embedding table '
            '(vocabularies built on train; id 0 = OOV).']
  return '\n'.join(lines) + '\n'


def draw_figure(figure: str, workdir: str, results: dict[str, dict]) -> str:
  """Draws ``figure`` ('fig5' | 'fig7' | 'fig8') from the runs in ``workdir``; its path."""
  from htl_jax.repro import figures  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, f'{figure}.png')
  cells = [parse_cell(c) for c in results]
  if figure == 'fig5':
    curves = {}
    for variant, seed in cells:
      if seed == min(s for v, s in cells if v == variant):
        curves[variant] = _gradient_curves(run_dir(workdir, variant, seed))
    figures.fig5(curves, path)
  elif figure == 'fig7':
    per_epoch: dict[str, list[float]] = {}
    for cell, result in results.items():
      if result.get('epochs'):
        per_epoch.setdefault(parse_cell(cell)[0], []).append(
            result['train_seconds'] / result['epochs'])
    figures.fig7(per_epoch, path)
  elif figure == 'fig8':
    table = rows(results)
    grid = {}
    alphas, gammas = experiments_lib.FIG8_ALPHAS, experiments_lib.FIG8_GAMMAS
    core = list(next(iter(results.values()))['test'])[-1]
    for metric in ('nrmse', 'nmae'):
      values = values_by_variant(table, core, metric)
      grid[metric] = np.array([[np.mean(values[k]) if values.get(k) else np.nan
                                for k in (f'alpha={a:g},gamma={g:g}' for g in gammas)]
                               for a in alphas])
    figures.fig8(grid, alphas, gammas, path)
  else:
    raise ValueError(f'unknown figure {figure!r}')
  return path


def _gradient_curves(directory: str) -> dict[str, dict[str, list[float]]]:
  """Per task, Fig. 5's series from a run's ``metrics.jsonl``: the step of each evaluation
  and the window means of its ``grad`` record (``norm_processed``, ``eq16_share``, ...)."""
  import json  # pylint: disable=g-import-not-at-top
  curves: dict[str, dict[str, list[float]]] = {}
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      for task, grad in record.get('grad', {}).items():
        series = curves.setdefault(task, {'step': []})
        series['step'].append(record['step'])
        for name, value in grad.items():
          series.setdefault(name, []).append(value)
  return curves

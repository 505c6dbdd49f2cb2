"""The paper's figures from an experiment's runs, as PNG files (matplotlib, ``repro`` extra).

:func:`draw` picks the figure of an experiment (``htl_jax/repro/experiments.py``):

- ``fig4``: attention fusion (IFU) against concatenation: per test metric, the mean over
  seeds with ± 1 sample std error bars, each panel saying whether lower or higher is better.
- ``fig5``: per-task gradient magnitude on the shared parameters ``theta_s`` over training,
  without and with the gradient process: each task's norm AFTER the process (its term of
  the combined gradient; without a process the raw norm), every point the mean over an
  evaluation window's steps, the line the mean over seeds and the band ± 1 std; below,
  where Algorithm 1 ran, the share of steps where Eq. 16 fired and the mean Eq. 17 factor.
- ``fig7``: mean training seconds per epoch per variant, error bars ± 1 sample std over
  seeds, with the machine named.
- ``fig8``: a heatmap per task over the projection relax factor alpha x gamma (binary tasks:
  AUC; the core: NRMSE and NMAE), each cell the test mean over seeds, the colour range at
  least four times the typical seed std (so noise does not look like signal), the text
  colour chosen for contrast, and each title saying which direction is better.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Sequence

import numpy as np

from htl_jax.metrics import LOWER_IS_BETTER
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro.experiments import parse_cell, run_dir


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def direction(metric: str) -> str:
  return 'lower is better' if metric in LOWER_IS_BETTER else 'higher is better'


def machine_name() -> str:
  """The CPU model (or platform) and core count, for Fig. 7's caption."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} cores'


def draw(figure: str, workdir: str, results: dict[str, dict],
         table: list[dict[str, Any]]) -> str:
  """Draws ``figure`` into ``<workdir>/<figure>.png`` from the runs; returns the path."""
  path = os.path.join(workdir, f'{figure}.png')
  variants = list(dict.fromkeys(parse_cell(c)[0] for c in results))
  if figure == 'fig4':
    fig4(table, variants, path)
  elif figure == 'fig5':
    fig5({v: [gradient_curves(run_dir(workdir, *parse_cell(c))) for c in results
              if parse_cell(c)[0] == v] for v in variants}, path)
  elif figure == 'fig7':
    per_epoch: dict[str, list[float]] = {}
    for cell, result in results.items():
      if result.get('epochs'):
        per_epoch.setdefault(parse_cell(cell)[0], []).append(
            result['train_seconds'] / result['epochs'])
    fig7(per_epoch, path)
  elif figure == 'fig8':
    fig8(table, experiments_lib.FIG8_ALPHAS, experiments_lib.FIG8_GAMMAS, path)
  else:
    raise ValueError(f'unknown figure {figure!r}')
  return path


def _test_values(table: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list]]:
  """``{(task, metric): {variant: [test value per seed]}}`` (undefined values dropped)."""
  out: dict[tuple[str, str], dict[str, list]] = {}
  for row in table:
    if row['split'] == 'test' and row['value'] is not None and row['task'] != 'all':
      out.setdefault((row['task'], row['metric']), {}).setdefault(
          row['variant'], []).append(float(row['value']))
  return out


def fig4(table: list[dict[str, Any]], variants: Sequence[str], path: str) -> None:
  """One panel per test metric: a bar per variant, mean ± 1 sample std over seeds."""
  plt = _pyplot()
  values = _test_values(table)
  keys = list(values)
  cols = min(4, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    per = values[key]
    means = [float(np.mean(per.get(v, [np.nan]))) for v in variants]
    stds = [float(np.std(per[v], ddof=1)) if len(per.get(v, [])) > 1 else 0.0
            for v in variants]
    ax.bar(variants, means, yerr=stds, capsize=4, color=[f'C{i}' for i in range(len(variants))])
    finite = [m for m in means if np.isfinite(m)]
    if finite:
      spread = max(max(finite) - min(finite), max(stds) * 2, 1e-6)
      ax.set_ylim(min(finite) - 2 * spread, max(finite) + 2 * spread)
    ax.set_title(f'{key[0]} {key[1]}\n({direction(key[1])})', fontsize=9)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  fig.suptitle('Fig. 4: attention fusion (IFU) vs concatenation; bars: test mean over '
               'seeds, error bars: ± 1 sample std', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def gradient_curves(directory: str) -> dict[str, dict[str, list[float]]]:
  """Per task, Fig. 5's series from a run's ``metrics.jsonl``: the step of each evaluation
  and the window means of its ``grad`` record (:class:`htl_jax.optim.TaskDiagnostics`)."""
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


def _over_seeds(runs: list[dict], task: str, name: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps, mean and std over seeds of one series (a seed that stopped early leaves the
  later points to the others)."""
  by_step: dict[int, list[float]] = {}
  for curves in runs:
    series = curves.get(task, {})
    for step, value in zip(series.get('step', []), series.get(name, [])):
      by_step.setdefault(step, []).append(value)
  steps = np.asarray(sorted(by_step))
  mean = np.asarray([np.mean(by_step[s]) for s in steps])
  std = np.asarray([np.std(by_step[s]) for s in steps])
  return steps, mean, std


def fig5(runs_by_panel: dict[str, list[dict[str, dict[str, list[float]]]]], path: str) -> None:
  """``{panel: [per seed: {task: {'step', 'norm_processed', ...}}]}`` -> the figure."""
  plt = _pyplot()
  panels = list(runs_by_panel)
  fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 6.6), squeeze=False,
                           sharey='row', sharex='col')
  for col, panel in enumerate(panels):
    runs = runs_by_panel[panel]
    tasks = list(runs[0]) if runs else []
    top, bottom = axes[0][col], axes[1][col]
    for i, task in enumerate(tasks):
      color = f'C{i}'                    # a task keeps its color in every panel
      steps, mean, std = _over_seeds(runs, task, 'norm_processed')
      top.plot(steps, mean, marker='o', markersize=3, color=color, label=task)
      top.fill_between(steps, np.maximum(mean - std, mean * 1e-3), mean + std, color=color,
                       alpha=0.2)
      if task != tasks[-1] and any('eq16_share' in r.get(task, {}) for r in runs):
        for name, style in (('eq16_share', '-'), ('eq17_factor', '--')):
          steps, mean, _ = _over_seeds(runs, task, name)
          label = 'Eq. 16 share of steps' if name == 'eq16_share' else 'mean Eq. 17 factor'
          bottom.plot(steps, mean, linestyle=style, marker='o', markersize=3, color=color,
                      label=f'{task}: {label}')
    top.set_yscale('log')
    top.set_title(f'{panel} ({len(runs)} seed(s))')
    top.grid(True, alpha=0.3)
    bottom.set_xlabel('step')
    bottom.grid(True, alpha=0.3)
    if not bottom.lines:
      bottom.text(0.5, 0.5, 'no Algorithm 1 in this run', ha='center', va='center',
                  transform=bottom.transAxes)
    else:
      bottom.legend(fontsize=7)
  axes[0][0].set_ylabel('||G_t|| on theta_s after the process\n(window mean; line: mean over '
                        'seeds, band: ± 1 std)', fontsize=8)
  axes[1][0].set_ylabel('Eq. 16 share / Eq. 17 factor\n(mean over seeds)', fontsize=8)
  axes[0][-1].legend()
  fig.suptitle('Fig. 5: per-task gradient magnitude on the shared parameters')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fig7(seconds_per_epoch: dict[str, list[float]], path: str, machine: str = '') -> None:
  """Bars of the mean training seconds per epoch of each variant, ± 1 sample std."""
  plt = _pyplot()
  names = list(seconds_per_epoch)
  means = [float(np.mean(seconds_per_epoch[n])) for n in names]
  stds = [float(np.std(seconds_per_epoch[n], ddof=1)) if len(seconds_per_epoch[n]) > 1
          else 0.0 for n in names]
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4.0))
  ax.bar(names, means, yerr=stds, capsize=4, color='tab:blue', alpha=0.8)
  ax.set_ylabel('training seconds per epoch')
  ax.set_title(f'Fig. 7: training time per epoch (bars: mean over seeds; error bars: ± 1 '
               f'sample std; evaluation excluded)\n{machine or machine_name()}', fontsize=9)
  ax.tick_params(axis='x', rotation=45)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fig8_panels(table: list[dict[str, Any]]) -> list[tuple[str, str]]:
  """Binary tasks' AUC, then the core's NRMSE and NMAE (the order of the table)."""
  keys = list(_test_values(table))
  tasks = list(dict.fromkeys(t for t, _ in keys))
  core = tasks[-1] if tasks else ''
  return ([(t, 'auc') for t in tasks[:-1] if (t, 'auc') in keys]
          + [(core, m) for m in ('nrmse', 'nmae') if (core, m) in keys])


def fig8(table: list[dict[str, Any]], alphas: Sequence[float], gammas: Sequence[float],
         path: str) -> None:
  """One annotated heatmap per panel of :func:`_fig8_panels` over alpha x gamma."""
  plt = _pyplot()
  values = _test_values(table)
  panels = _fig8_panels(table)
  fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
  for ax, (task, metric) in zip(axes[0], panels):
    per = values[(task, metric)]
    name = lambda a, g: experiments_lib.fig8_variant(a, g)  # noqa: E731
    grid = np.array([[np.mean(per[name(a, g)]) if per.get(name(a, g)) else np.nan
                      for g in gammas] for a in alphas])
    stds = [np.std(v, ddof=1) for v in per.values() if len(v) > 1]
    center = float(np.nanmean(grid))
    half = max(float(np.nanmax(grid) - np.nanmin(grid)) / 2, 2 * float(np.median(stds))
               if stds else 0.0, 1e-6)
    cmap = 'viridis_r' if metric in LOWER_IS_BETTER else 'viridis'   # better is brighter
    image = ax.imshow(grid, cmap=cmap, aspect='auto', vmin=center - half, vmax=center + half)
    ax.set_xticks(range(len(gammas)), [f'{g:g}' for g in gammas])
    ax.set_yticks(range(len(alphas)), [f'{a:g}' for a in alphas])
    ax.set_xlabel('gamma (Eq. 17)')
    ax.set_ylabel('alpha (Eq. 16)')
    ax.set_title(f'{task} {metric.upper()} ({direction(metric)})', fontsize=10)
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        if np.isfinite(grid[i, j]):
          shade = image.cmap(image.norm(grid[i, j]))
          light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
          ax.text(j, i, f'{grid[i, j]:.4f}', ha='center', va='center', fontsize=7,
                  color='black' if light else 'white')
    fig.colorbar(image, ax=ax)
  fig.suptitle('Fig. 8: projection relax factor alpha x magnitude weight gamma (test mean over '
               'seeds; colour range >= 4 x the median seed std)', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

"""The paper's figures from an experiment's runs, as PNG files (matplotlib, ``repro`` extra).

- :func:`fig5`: per-task gradient magnitude on the shared parameters over training, without
  and with the gradient process (from each run's ``metrics.jsonl`` ``grad`` records: the
  processed norm, which without a process is the raw one).
- :func:`fig7`: mean training time per epoch per variant, with the machine named.
- :func:`fig8`: NRMSE and NMAE heatmaps over the projection relax factor alpha x gamma.
"""

from __future__ import annotations

import os
import platform
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


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


def fig5(curves: dict[str, dict[str, dict[str, Sequence[float]]]], path: str) -> None:
  """``{panel: {task: {'step': [...], 'norm_processed': [...], ...}}}`` -> per run, the
  per-task gradient norms on the shared parameters after the process (log scale; each point
  the mean over an evaluation window's steps), and below, where Algorithm 1 ran, the share
  of steps where Eq. 16 fired and the mean Eq. 17 factor of each binary task."""
  plt = _pyplot()
  fig, axes = plt.subplots(2, len(curves), figsize=(5 * len(curves), 6.4), squeeze=False,
                           sharey='row', sharex='col')
  for col, (panel, tasks) in enumerate(curves.items()):
    top, bottom = axes[0][col], axes[1][col]
    for i, (task, values) in enumerate(tasks.items()):
      color = f'C{i}'                    # a task keeps its color in every panel
      top.plot(values['step'], values['norm_processed'], marker='o', markersize=3,
               color=color, label=task)
      if 'eq16_share' in values and task != list(tasks)[-1]:
        bottom.plot(values['step'], values['eq16_share'], marker='o', markersize=3,
                    color=color, label=f'{task}: Eq. 16 share')
        bottom.plot(values['step'], values['eq17_factor'], marker='s', markersize=3,
                    color=color, linestyle='--', label=f'{task}: Eq. 17 factor')
    top.set_yscale('log')
    top.set_title(panel)
    top.grid(True, alpha=0.3)
    bottom.set_xlabel('step')
    bottom.grid(True, alpha=0.3)
    if not bottom.lines:
      bottom.text(0.5, 0.5, 'no Algorithm 1 in this run', ha='center', va='center',
                  transform=bottom.transAxes)
    else:
      bottom.legend(fontsize=7)
  axes[0][0].set_ylabel('gradient norm on theta_s\n(window mean)')
  axes[1][0].set_ylabel('Eq. 16 share / Eq. 17 factor')
  axes[0][-1].legend()
  fig.suptitle('Fig. 5: per-task gradient magnitude')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fig7(seconds_per_epoch: dict[str, list[float]], path: str, machine: str = '') -> None:
  """Bars of the mean (± std) training seconds per epoch of each variant."""
  plt = _pyplot()
  names = list(seconds_per_epoch)
  means = [float(np.mean(seconds_per_epoch[n])) for n in names]
  stds = [float(np.std(seconds_per_epoch[n], ddof=1)) if len(seconds_per_epoch[n]) > 1
          else 0.0 for n in names]
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 3.8))
  ax.bar(names, means, yerr=stds, color='tab:blue', alpha=0.8)
  ax.set_ylabel('training seconds per epoch')
  ax.set_title(f'Fig. 7: training time per epoch\n{machine or machine_name()}', fontsize=9)
  ax.tick_params(axis='x', rotation=45)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fig8(grid: dict[str, np.ndarray], alphas: Sequence[float], gammas: Sequence[float],
         path: str) -> None:
  """``{metric: [len(alphas), len(gammas)] means}`` -> one annotated heatmap per metric."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(grid), figsize=(5.2 * len(grid), 4.2), squeeze=False)
  for ax, (metric, values) in zip(axes[0], grid.items()):
    image = ax.imshow(values, cmap='viridis_r', aspect='auto')
    ax.set_xticks(range(len(gammas)), [f'{g:g}' for g in gammas])
    ax.set_yticks(range(len(alphas)), [f'{a:g}' for a in alphas])
    ax.set_xlabel('gamma (Eq. 17)')
    ax.set_ylabel('alpha (Eq. 16)')
    ax.set_title(metric.upper())
    for i in range(values.shape[0]):
      for j in range(values.shape[1]):
        if np.isfinite(values[i, j]):
          ax.text(j, i, f'{values[i, j]:.3f}', ha='center', va='center', fontsize=7,
                  color='white')
    fig.colorbar(image, ax=ax)
  fig.suptitle('Fig. 8: projection relax factor x magnitude weight')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

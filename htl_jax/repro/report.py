"""An experiment's results as the paper reports them: ``results.csv`` and the table.

``results.csv`` has one row per run, split, task and metric (variant, seed, split, task,
metric, value, best_step, train_seconds_per_epoch, stop); where a reference run exists
(``selection='delta_m'``, or ``config.selection_reference`` set), every run also gets a row
``task='all', metric='delta_m'``: its Delta_m against the reference's mean on that split
(:func:`htl_jax.selection.delta_m`).

The table (test split) gives, per variant and metric, the mean ± the sample std over seeds
("n/a" for one seed), the best variant in bold and the second in italics (Markdown) or
underlined (LaTeX), direction from :data:`htl_jax.metrics.LOWER_IS_BETTER`, and a ``*`` on
the experiment's own method where it is better than the best baseline with p <= 0.05 in a
two-sample t-test (``scipy.stats.ttest_ind``), as in the paper's Table 2. Undefined metrics
(``null``) are left out of means and tests. It is written three ways: ``table.md`` (plain
Markdown, with the selection rule, the runs that ended at the step cap, the p-values and
the tuned configurations), ``table.tex`` (a booktabs ``tabular`` to ``\\input``) and
``table.csv`` (wide: one row per variant, a mean and a std column per metric).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Optional

import numpy as np
from scipy import stats

from htl_jax import metrics as metrics_lib
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro.experiments import parse_cell
from htl_jax.selection import DELTA_M, delta_m, read_reference, selection
from htl_jax.run_files import write_text

SIGNIFICANCE = 0.05
COLUMNS = ('variant', 'seed', 'split', 'task', 'metric', 'value', 'best_step',
           'train_seconds_per_epoch', 'stop')
ALL_TASKS = 'all'


@dataclasses.dataclass(frozen=True)
class ReportContext:
  """What the table says besides the runs: the rule, the reference, the tuned values."""

  config: Any = None
  tuned: Optional[dict[str, dict[str, Any]]] = None
  tuned_dir: str = ''

  @property
  def reference(self) -> Optional[dict[str, Any]]:
    path = str(self.config.selection_reference) if self.config is not None else ''
    return read_reference(path) if path else None


def rows(results: dict[str, dict], reference: Optional[dict[str, Any]] = None
         ) -> list[dict[str, Any]]:
  """``{cell: metrics.json dict}`` -> the rows of ``results.csv`` (module docstring)."""
  out = []
  for cell, result in results.items():
    variant, seed = parse_cell(cell)
    epochs = result.get('epochs') or 0
    common = {'variant': variant, 'seed': seed, 'best_step': result.get('best_step'),
              'train_seconds_per_epoch': (result.get('train_seconds', 0.0) / epochs
                                          if epochs else None),
              'stop': result.get('stop', '')}
    for split in ('valid', 'test'):
      for task, values in result[split].items():
        for metric, value in values.items():
          out.append({**common, 'split': split, 'task': task, 'metric': metric,
                      'value': value})
      if reference is not None:
        out.append({**common, 'split': split, 'task': ALL_TASKS, 'metric': DELTA_M,
                    'value': delta_m(result[split], reference[split])})
  return out


def write_csv(path: str, table: list[dict[str, Any]]) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator='\n')
  writer.writeheader()
  for row in table:
    writer.writerow({k: '' if row.get(k) is None else row[k] for k in COLUMNS})
  write_text(path, buffer.getvalue())


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


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Cell:
  """One variant's entry of one column."""

  mean: Optional[float]
  std: Optional[float]          # None: one seed
  rank: int                     # 0 best, 1 second, ...
  star: bool

  def text(self, star: str = '*', pm: str = '±', digits: int = 4) -> str:
    """``mean ± std`` (``n/a`` for a std of one seed), then ``star`` where significant."""
    if self.mean is None:
      return 'n/a'
    std = 'n/a' if self.std is None else f'{self.std:.{digits}f}'
    return f'{self.mean:.{digits}f} {pm} {std}' + (star if self.star else '')


@dataclasses.dataclass(frozen=True)
class Table:
  """The test table of an experiment: columns ``(task, metric)``, a cell per variant."""

  columns: list[tuple[str, str]]
  cells: dict[str, list[Cell]]
  notes: list[str]
  seeds: int

  @staticmethod
  def column_name(task: str, metric: str) -> str:
    return 'Delta_m' if metric == DELTA_M else f'{task} {metric}'


def build_table(table: list[dict[str, Any]], experiment: experiments_lib.Experiment,
                variants: list[str]) -> Table:
  """Means, stds, ranks and stars of every test column (module docstring)."""
  columns: list[tuple[str, str]] = []
  for row in table:
    key = (row['task'], row['metric'])
    if row['split'] == 'test' and key not in columns:
      columns.append(key)
  columns.sort(key=lambda c: c[1] == DELTA_M)           # Delta_m last
  cells: dict[str, list[Cell]] = {v: [] for v in variants}
  notes = []
  for task, metric in columns:
    values = values_by_variant(table, task, metric)
    means = {v: float(np.mean(x)) for v, x in values.items() if x and v in cells}
    order = ranked(means, metric)
    test = (significance(values, metric, experiment.ours, experiment.baselines)
            if experiment.ours else None)
    if test is not None:
      relation = 'better than' if test[1] else 'not better than'
      notes.append(f'{Table.column_name(task, metric)}: p = {test[0]:.3g} '
                   f'({experiment.ours} {relation} {test[2]})')
    for variant in variants:
      x = values.get(variant, [])
      star = (variant == experiment.ours and test is not None and test[1]
              and test[0] <= SIGNIFICANCE)
      cells[variant].append(Cell(
          float(np.mean(x)) if x else None,
          float(np.std(x, ddof=1)) if len(x) > 1 else None,       # the sample std
          order.index(variant) if variant in order else len(order), star))
  return Table(columns, cells, notes, len({row['seed'] for row in table}))


def markdown(built: Table, experiment: experiments_lib.Experiment) -> str:
  """The table in plain Markdown: best **bold**, second _italic_ (no HTML)."""
  marks = {0: '**', 1: '_'}
  header = '| variant | ' + ' | '.join(Table.column_name(*c) for c in built.columns) + ' |'
  lines = [f'## {experiment.title}', '', header, '|---' * (len(built.columns) + 1) + '|']
  for variant, cells in built.cells.items():
    texts = []
    for c in cells:
      mark = marks.get(c.rank, '') if c.mean is not None else ''
      texts.append(mark + c.text(star='\\*') + mark)
    lines.append(f'| {variant} | ' + ' | '.join(texts) + ' |')
  lines += ['', f'Test split; mean ± sample std (ddof = 1) over {built.seeds} seed(s) '
            '("n/a": one seed); best **bold**, second _italic_.']
  if experiment.ours:
    lines.append(f'`*`: {experiment.ours} is better than the best baseline with p <= '
                 f'{SIGNIFICANCE} (two-sample t-test). p-values: ' + '; '.join(built.notes))
  return '\n'.join(lines) + '\n'


_LATEX_ESCAPES = {'&': r'\&', '%': r'\%', '$': r'\$', '#': r'\#', '_': r'\_', '{': r'\{',
                  '}': r'\}', '~': r'\textasciitilde{}', '^': r'\textasciicircum{}',
                  '\\': r'\textbackslash{}'}


def latex_escape(text: str) -> str:
  return ''.join(_LATEX_ESCAPES.get(c, c) for c in str(text))


def latex(built: Table, experiment: experiments_lib.Experiment) -> str:
  """The table as a booktabs ``tabular`` (``\\usepackage{booktabs}``): best bold, second
  underlined, ``$\\pm$`` between mean and std."""
  def cell(c: Cell) -> str:
    if c.mean is None:
      return 'n/a'
    text = c.text(star='$^{*}$', pm='$\\pm$')
    return {0: f'\\textbf{{{text}}}', 1: f'\\underline{{{text}}}'}.get(c.rank, text)

  names = [latex_escape(Table.column_name(*c)) for c in built.columns]
  lines = [f'% {latex_escape(experiment.title)}: test split, mean $\\pm$ sample std over '
           f'{built.seeds} seed(s); best bold, second underlined',
           '\\begin{tabular}{l' + 'c' * len(names) + '}', '\\toprule',
           'Variant & ' + ' & '.join(names) + ' \\\\', '\\midrule']
  for variant, cells in built.cells.items():
    lines.append(latex_escape(variant) + ' & ' + ' & '.join(cell(c) for c in cells) + ' \\\\')
  lines += ['\\bottomrule', '\\end{tabular}']
  return '\n'.join(lines) + '\n'


def wide_csv(built: Table) -> str:
  """One row per variant, ``<column> mean`` and ``<column> std`` per column."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  names = [Table.column_name(*c) for c in built.columns]
  writer.writerow(['variant'] + [f'{n} {k}' for n in names for k in ('mean', 'std')])
  for variant, cells in built.cells.items():
    writer.writerow([variant] + [('' if v is None else v) for c in cells
                                 for v in (c.mean, c.std)])
  return buffer.getvalue()


# ----------------------------------------------------------------------------- around it


def rule_section(context: ReportContext, table: list[dict[str, Any]]) -> str:
  """The selection rule, the reference, and the runs that ended at the step cap."""
  lines = ['']
  if context.config is not None:
    lines.append(f'Model selection: {selection(context.config).describe()}.')
  reference = context.reference
  if reference is not None:
    lines.append(f'Delta_m: against the reference run ({reference["model"]} at the '
                 f'dataset\'s defaults over seeds {reference["seeds"]}), in %, higher is '
                 'better.')
  runs = {(r['variant'], r['seed']): r['stop'] for r in table}
  at_cap = sum(1 for stop in runs.values() if stop == 'cap')
  lines.append(f'Budgets: {at_cap} of {len(runs)} runs ended at the step cap, the others '
               'by early stopping.' + _tuning_budget(context.tuned_dir))
  return '\n'.join(lines) + '\n'


def _tuning_budget(tuned_dir: str) -> str:
  """The tuning studies' runs at the cap (their best.json files), as a sentence tail."""
  if not tuned_dir or not os.path.isdir(tuned_dir):
    return ''
  runs = cap = 0
  for name in sorted(os.listdir(tuned_dir)):
    path = os.path.join(tuned_dir, name, 'best.json')
    if os.path.exists(path):
      with open(path) as f:
        best = json.load(f)
      runs, cap = runs + int(best.get('runs', 0)), cap + int(best.get('runs_at_cap', 0))
  return f' Tuning: {cap} of {runs} finished runs ended at the cap.' if runs else ''


def tuned_section(tuned: dict[str, dict[str, Any]], tuned_dir: str = '') -> str:
  """The overrides every variant started from (its tuning studies' best configuration);
  with studies in ``tuned_dir``, a variant whose study finished no trial says so."""
  if not tuned_dir and not any(tuned.values()):
    return ''
  lines = ['', 'Tuned configurations (each variant\'s studies over Table 6; the variant\'s '
           'own overrides apply on top):', '']
  for variant, overrides in tuned.items():
    values = ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}'
                       for k, v in sorted(overrides.items()))
    lines.append(f'- {variant}: {values or _untuned(tuned_dir)}')
  return '\n'.join(lines) + '\n'


def _untuned(tuned_dir: str) -> str:
  if tuned_dir:
    return ('the defaults of the config: its study has no completed trial (see its '
            'trials.csv for why)')
  return 'the defaults of the config (no tuned study)'


def write_report(workdir: str, results: dict[str, dict],
                 experiment: experiments_lib.Experiment, variants: list[str],
                 context: ReportContext = ReportContext()) -> str:
  """Writes ``results.csv``, ``table.md``, ``table.tex`` and ``table.csv``; returns the
  Markdown."""
  table = rows(results, context.reference)
  write_csv(os.path.join(workdir, 'results.csv'), table)
  built = build_table(table, experiment, variants)
  text = (markdown(built, experiment) + rule_section(context, table)
          + tuned_section(context.tuned or {}, context.tuned_dir))
  write_text(os.path.join(workdir, 'table.md'), text)
  write_text(os.path.join(workdir, 'table.tex'), latex(built, experiment))
  write_text(os.path.join(workdir, 'table.csv'), wide_csv(built))
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
  """Draws ``figure`` ('fig4' | 'fig5' | 'fig7' | 'fig8') from the runs; its path."""
  from htl_jax.repro import figures  # pylint: disable=g-import-not-at-top
  return figures.draw(figure, workdir, results, rows(results))

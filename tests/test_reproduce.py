"""The reproduction suite (htl_jax.repro, experiments.reproduce): data, report, runs.

Experiments are data that the trainer accepts; the report's bold / underline / star follow
known p-values; figures are real PNGs; several processes on one storage (SQLite, and a real
PostgreSQL server where one is installed) run every cell exactly once; a suite killed
mid-way and started again finishes every run once, with the results of an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from scipy import stats

from htl_jax.configs import kuairand
from htl_jax.configs.base import get_base_config
from htl_jax.errors import PreemptedError
from htl_jax.repro import experiments as experiments_lib
from htl_jax import selection
from htl_jax.repro import figures, report, runner
from htl_jax import run_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('name', sorted(experiments_lib.EXPERIMENTS))
def test_every_variant_is_a_valid_config(name):
  experiment = experiments_lib.EXPERIMENTS[name]
  keys = set(get_base_config().keys())
  for variant, overrides in experiment.variants.items():
    assert set(overrides) <= keys, (variant, set(overrides) - keys)
    runner.cell_config(kuairand.get_config(), overrides, seed=3)   # check_config passes
  for variant in (experiment.ours, *experiment.baselines):
    assert variant is None or variant in experiment.variants
  assert experiment.trains == (name != 'table1')


def _result(nrmse: float, auc: float, stop: str = 'early_stopping') -> dict:
  return {'valid': {'click': {'auc': auc}, 'y': {'nrmse': nrmse}},
          'test': {'click': {'auc': auc}, 'y': {'nrmse': nrmse, 'gini': None}},
          'best_step': 10, 'steps': 20, 'epochs': 2.0, 'train_seconds': 3.0, 'stop': stop}


def _cells(table: str) -> dict[str, list[str]]:
  rows = {line.split('|')[1].strip(): line for line in table.splitlines()
          if line.startswith('| ') and not line.startswith('| variant')}
  return {v: [c.strip() for c in line.split('|')[2:-1]] for v, line in rows.items()}


def test_report_marks_best_second_and_significance():
  nrmse = {'HTLNet': [0.80, 0.81, 0.79], 'w/o Architecture': [0.90, 0.92, 0.88],
           'w/o Optimization': [0.95, 0.96, 0.94]}
  auc = {'HTLNet': [0.700, 0.720, 0.680], 'w/o Architecture': [0.712, 0.708, 0.710],
         'w/o Optimization': [0.60, 0.61, 0.59]}
  results = {runner.cell_name(v, s): _result(nrmse[v][s], auc[v][s])
             for v in nrmse for s in range(3)}
  experiment = experiments_lib.EXPERIMENTS['table3']
  table = report.rows(results)
  assert len(table) == 9 * 5      # runs x (2 valid + 3 test metrics)
  assert table[0]['train_seconds_per_epoch'] == 1.5
  p_nrmse = stats.ttest_ind(nrmse['HTLNet'], nrmse['w/o Architecture']).pvalue
  p_auc = stats.ttest_ind(auc['HTLNet'], auc['w/o Architecture']).pvalue
  assert p_nrmse < 0.05 < p_auc
  test = report.significance(report.values_by_variant(table, 'y', 'nrmse'), 'nrmse',
                             'HTLNet', experiment.baselines)
  assert test[0] == pytest.approx(p_nrmse) and test[1]
  built = report.build_table(table, experiment, list(nrmse))
  cells = _cells(report.markdown(built, experiment))
  # Columns: click auc, y nrmse, y gini (all undefined -> n/a). Plain Markdown, no HTML.
  assert cells['HTLNet'][1] == '**0.8000 ± 0.0100\\***'   # best, significant; sample std
  assert cells['w/o Architecture'][1].startswith('_0.9000')   # second
  assert cells['HTLNet'][0].startswith('_0.7000') and '*' not in cells['HTLNet'][0]
  assert cells['w/o Architecture'][0].startswith('**0.7100')
  assert cells['HTLNet'][2] == 'n/a'
  assert '<u>' not in report.markdown(built, experiment)
  tex = report.latex(built, experiment)
  assert '\\textbf{0.8000 $\\pm$ 0.0100$^{*}$}' in tex and '\\underline{0.9000' in tex
  assert 'w/o Architecture' in tex and '\\toprule' in tex and '\\bottomrule' in tex
  wide = list(csv.reader(report.wide_csv(built).splitlines()))
  assert wide[0][:3] == ['variant', 'click auc mean', 'click auc std']
  assert float(wide[1][3]) == pytest.approx(0.8) and float(wide[1][4]) == pytest.approx(0.01)


def _booktabs_grammar(tex: str) -> None:
  """What pdflatex + booktabs need of a table body: one column spec for every cell of every
  row, the three rules in order, and no unescaped special character in a cell."""
  lines = [line for line in tex.splitlines() if line and not line.startswith('%')]
  spec = re.match(r'\\begin\{tabular\}\{([lcr]+)\}$', lines[0])
  assert spec and lines[-1] == '\\end{tabular}', lines[:1] + lines[-1:]
  assert [ln for ln in lines if ln.endswith('rule')] == ['\\toprule', '\\midrule',
                                                         '\\bottomrule']
  for row in (ln for ln in lines[1:-1] if not ln.endswith('rule')):
    assert row.endswith(' \\\\') and row.count(' & ') == len(spec.group(1)) - 1, row
    assert not re.search(r'(?<!\\)[_#%&]', row.replace(' & ', ' ')), row


def test_table_tex_compiles_with_booktabs(tmp_path):
  """table.tex is a booktabs tabular: checked against its grammar here, and compiled with
  pdflatex where TeX is installed."""
  nrmse = {'HTLNet': [0.80, 0.81], 'w/o Architecture': [0.90, 0.92]}
  results = {runner.cell_name(v, s): _result(nrmse[v][s], 0.7) for v in nrmse for s in (0, 1)}
  experiment = experiments_lib.EXPERIMENTS['table3']
  tex = report.latex(report.build_table(report.rows(results), experiment, list(nrmse)),
                     experiment)
  _booktabs_grammar(tex)
  if shutil.which('pdflatex') is None:
    return
  (tmp_path / 'table.tex').write_text(tex)
  (tmp_path / 'doc.tex').write_text(
      '\\documentclass{article}\\usepackage{booktabs}\\begin{document}\\tiny\n'
      '\\input{table.tex}\n\\end{document}\n')
  done = subprocess.run(['pdflatex', '-interaction=nonstopmode', '-halt-on-error', 'doc.tex'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout[-2000:]
  assert (tmp_path / 'doc.pdf').stat().st_size > 0


def test_one_seed_shows_na_for_its_std():
  results = {runner.cell_name(v, 0): _result(0.8 + i / 10, 0.7) for i, v in
             enumerate(('HTLNet', 'w/o Architecture'))}
  experiment = experiments_lib.EXPERIMENTS['table3']
  built = report.build_table(report.rows(results), experiment, ['HTLNet', 'w/o Architecture'])
  assert _cells(report.markdown(built, experiment))['HTLNet'][1] == '**0.8000 ± n/a**'
  assert '0.8000 $\\pm$ n/a' in report.latex(built, experiment)


def test_worse_but_significant_gets_no_star():
  values = {'HTLNet': [0.5, 0.51, 0.49], 'SB': [0.7, 0.71, 0.69]}
  p, better, best = report.significance(values, 'auc', 'HTLNet', ('SB',))
  assert p < 0.05 and not better and best == 'SB'


def test_smoke_table_names_the_rule_the_delta_m_and_the_runs_at_the_cap(tmp_path):
  """table.md of a reproduction: the rule, Delta_m against the reference, runs at the cap."""
  reference = str(tmp_path / 'reference.json')
  ref = {'click': {'auc': 0.7}, 'y': {'nrmse': 0.9}}
  run_files.write_json(reference, selection.reference_record(
      [{'valid': ref, 'test': ref}], 'dnn', [0, 1], {}))
  config = kuairand.get_config()
  config.selection, config.selection_reference = 'delta_m', reference
  results = {runner.cell_name(v, s): _result(0.85, 0.77, 'cap' if v == 'SB' and s else
                                             'early_stopping')
             for v in ('HTLNet', 'SB') for s in range(2)}
  experiment = experiments_lib.EXPERIMENTS['table2']
  text = report.write_report(str(tmp_path), results, experiment, ['HTLNet', 'SB'],
                             report.ReportContext(config=config))
  assert 'selection=delta_m' in text and 'dnn at the dataset' in text
  assert 'Budgets: 1 of 4 runs ended at the step cap' in text
  # Delta_m: click auc +10 %, y nrmse +5.6 % (lower is better) -> mean 7.78 %
  assert _cells(text)['HTLNet'][-1].startswith('**7.7778 ± 0.0000')
  assert text.splitlines()[2].split('|')[-2].strip() == 'Delta_m'
  for name in ('table.md', 'table.tex', 'table.csv', 'results.csv'):
    assert (tmp_path / name).exists(), name


def test_figures_are_pngs(tmp_path):
  steps = [10, 20, 30]
  with_process = {'step': steps, 'norm_processed': [3.0, 2.0, 2.5],
                  'eq16_share': [0.2, 0.4, 0.1], 'eq17_factor': [1.5, 1.8, 1.2]}
  core = {'step': steps, 'norm_processed': [9.0, 8.0, 7.0], 'eq16_share': [0, 0, 0],
          'eq17_factor': [1, 1, 1]}
  figures.fig5({'without': [{'click': {'step': steps, 'norm_processed': [1.0, 0.5, 0.2]},
                             'y': {'step': steps, 'norm_processed': [9.0, 8.0, 7.0]}}],
                'with': [{'click': with_process, 'y': core},
                         {'click': {**with_process, 'step': [10, 20]}, 'y': core}]},
               str(tmp_path / 'fig5.png'))
  figures.fig7({'DNN': [1.0, 1.2], 'HTLNet': [2.0, 2.2]}, str(tmp_path / 'fig7.png'))
  cells = {}
  for i, a in enumerate(experiments_lib.FIG8_ALPHAS):
    for j, g in enumerate(experiments_lib.FIG8_GAMMAS):
      for seed in range(2):
        cells[runner.cell_name(experiments_lib.fig8_variant(a, g), seed)] = _result(
            0.9 + (i * 6 + j) / 360, 0.7 + seed / 100)
  figures.fig8(report.rows(cells), experiments_lib.FIG8_ALPHAS, experiments_lib.FIG8_GAMMAS,
               str(tmp_path / 'fig8.png'))
  four = {runner.cell_name(v, s): _result(0.9 + s / 100, 0.7) for v in ('attention', 'concat')
          for s in range(3)}
  figures.fig4(report.rows(four), ['attention', 'concat'], str(tmp_path / 'fig4.png'))
  for name in ('fig4', 'fig5', 'fig7', 'fig8'):
    data = (tmp_path / f'{name}.png').read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, name


def test_fig8_variants_can_be_chosen_on_the_command_line():
  """No comma in a variant name: ``--variants`` (a list flag) splits on commas."""
  experiment = experiments_lib.EXPERIMENTS['fig8']
  assert not any(',' in v for v in experiment.variants)
  name = experiments_lib.fig8_variant(1e-3, 1.0)
  assert experiments_lib.select_variants(experiment, [name]) == {
      name: {'model': 'htlnet', 'alpha': 1e-3, 'gamma': 1.0}}


_WORKER = textwrap.dedent('''
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    from htl_jax.configs import kuairand
    from htl_jax.repro import runner

    def fake_cell(config, run_dir):
      with open({log!r}, 'a') as f:
        f.write(f'{{config.model}} {{config.grad_process}} {{config.seed}} {{os.getpid()}}\\n')
      time.sleep(0.3)
      os.makedirs(run_dir, exist_ok=True)
      result = {{'valid': {{'y': {{'nrmse': 1.0}}}}, 'test': {{'y': {{'nrmse': 1.0}}}}}}
      with open(os.path.join(run_dir, 'metrics.json'), 'w') as f:
        json.dump(result, f)
      return result

    runner.run_experiment(kuairand.get_config(), 'table3', 3, {workdir!r},
                          storage={storage!r}, variants=['HTLNet', 'w/o Architecture'],
                          run_cell=fake_cell)
''')


def _two_workers(tmp_path, storage: str) -> list[str]:
  log, workdir = str(tmp_path / 'calls.log'), str(tmp_path / 'suite')
  script = _WORKER.format(repo=REPO, log=log, workdir=workdir, storage=storage)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'HTL_JAX_HEARTBEAT_SECONDS': '1'}
  workers = [subprocess.Popen([sys.executable, '-c', script], env=env, cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for worker in workers:
    _, err = worker.communicate(timeout=240)
    assert worker.returncode == 0, err[-3000:]
  with open(log) as f:
    return f.read().split('\n')[:-1]


def _assert_each_cell_once(calls: list[str]) -> None:
  cells = [tuple(line.split()[:3]) for line in calls]
  assert sorted(cells) == sorted({(m, g, str(s)) for m, g in [('htlnet', 'auto'),
                                                             ('shared_bottom', 'htl')]
                                  for s in range(3)})


def test_two_processes_share_a_sqlite_study(tmp_path):
  calls = _two_workers(tmp_path, '')
  _assert_each_cell_once(calls)
  assert os.path.exists(tmp_path / 'suite' / 'optuna.db')


def test_two_processes_share_a_postgres_study(tmp_path, postgres_url):  # noqa: F811
  _assert_each_cell_once(_two_workers(tmp_path, postgres_url))


def _suite(workdir: str) -> list[str]:
  return [sys.executable, '-m', 'experiments.reproduce', '--experiment=table3',
          '--variants=HTLNet', '--seeds=2', f'--workdir={workdir}',
          '--config=configs/kuairand.py:smoke=True,data.max_rows=2000,max_steps=12,'
          'eval_every=6,checkpoint_every=3,batch_size=128,hidden_dims=(16,8)']


def _csv_without_times(path) -> list[dict]:
  with open(path) as f:
    return sorted(({k: v for k, v in row.items() if k != 'train_seconds_per_epoch'}
                   for row in csv.DictReader(f)), key=lambda r: tuple(r.values()))


def test_killed_suite_resumes_and_matches_an_uninterrupted_one(tmp_path, cache_dir):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'HTL_JAX_HEARTBEAT_SECONDS': '1'}
  flags = [f'--config.cache_dir={cache_dir}']
  killed, straight = str(tmp_path / 'killed'), str(tmp_path / 'straight')
  process = subprocess.Popen(_suite(killed) + flags, env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(killed, 'HTLNet', 'seed0', 'metrics.json')
  deadline = time.monotonic() + 480
  while not os.path.exists(first) and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  for workdir in (killed, straight):
    done = subprocess.run(_suite(workdir) + flags, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()           # progress lines, then the summary
    assert lines[-1].startswith('table3: 2 of 2 runs in the table'), lines
    assert lines[-1].endswith(os.path.join(workdir, 'table.md')), lines
    with open(os.path.join(workdir, 'table.md')) as f:
      assert '## Table 3' in f.read()
  assert _csv_without_times(os.path.join(killed, 'results.csv')) == _csv_without_times(
      os.path.join(straight, 'results.csv'))
  url = f'sqlite:///{killed}/optuna.db'
  names = optuna.get_all_study_names(url)
  assert sorted(n.split(':')[0] for n in names) == ['reference', 'reproduce']   # delta_m
  study = optuna.load_study(study_name=next(n for n in names if n.startswith('reproduce:')),
                            storage=url)
  complete = [t.user_attrs['cell'] for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE]
  assert sorted(complete) == ['HTLNet|seed0', 'HTLNet|seed1']     # each run finished once
  for seed in (0, 1):
    with open(os.path.join(killed, 'HTLNet', f'seed{seed}', 'metrics.jsonl')) as f:
      steps = [json.loads(line)['step'] for line in f]
    assert steps == [6, 12]                                        # no step logged twice


def test_trial_killed_before_its_first_heartbeat_is_retried(tmp_path, monkeypatch):
  """A process killed after taking a trial but before its first heartbeat leaves a RUNNING
  trial without any heartbeat, which Optuna alone never fails: it must still be retried."""
  from htl_jax.repro import storage as storage_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(storage_lib.HEARTBEAT_ENV, '1')
  storage = storage_lib.open_storage(storage_lib.storage_url(str(tmp_path)))
  study = runner.open_cell_study('orphan', storage, ['HTLNet|seed0'])
  with pytest.warns(UserWarning, match='Heartbeat'):
    orphan = study.ask()               # RUNNING, and no heartbeat thread ever starts
  states = lambda: [t.state.name for t in study.get_trials()]  # noqa: E731
  storage_lib.fail_stale_trials(study)
  assert states() == ['RUNNING']       # young: it may still be starting
  deadline = time.monotonic() + 30
  while states()[0] == 'RUNNING' and time.monotonic() < deadline:
    time.sleep(0.5)
    storage_lib.fail_stale_trials(study)
  assert states() == ['FAIL', 'WAITING']
  retry = study.get_trials()[1]
  assert retry.user_attrs['cell'] == 'HTLNet|seed0'
  assert orphan.number == 0


def test_a_preempted_cell_is_retried_at_once(tmp_path):
  """A cell whose run was preempted (exit 75) is a FAIL trial with a WAITING retry of the
  same cell, so the next worker (or the same command again) runs it without waiting for a
  heartbeat to go stale."""
  workdir = str(tmp_path / 'suite')
  calls = []

  def cell(config, run_dir):
    calls.append((config.model, config.seed))
    if len(calls) == 2:
      raise PreemptedError('SIGTERM: stopped after step 4')
    os.makedirs(run_dir, exist_ok=True)
    result = {'valid': {'y': {'nrmse': 1.0}}, 'test': {'y': {'nrmse': 1.0}}}
    with open(os.path.join(run_dir, 'metrics.json'), 'w') as f:
      json.dump(result, f)
    return result

  def run():
    return runner.run_experiment(kuairand.get_config(), 'table3', 2, workdir,
                                 variants=['HTLNet'], run_cell=cell)

  with pytest.raises(PreemptedError):
    run()
  storage = optuna.storages.RDBStorage(f'sqlite:///{workdir}/optuna.db')
  study = optuna.load_study(study_name='reproduce:table3:kuairand:sample', storage=storage)
  states = [(t.state.name, t.user_attrs['cell']) for t in study.trials]
  assert states == [('COMPLETE', 'HTLNet|seed0'), ('FAIL', 'HTLNet|seed1'),
                    ('WAITING', 'HTLNet|seed1')]
  assert len(run()) == 2
  assert calls == [('htlnet', 0), ('htlnet', 1), ('htlnet', 1)]


def test_a_cell_keeps_its_tuning_trials_schedule():
  """Seeds of a tuned batch size evaluate after the same numbers of examples as its trials."""
  from htl_jax.repro import tuning  # pylint: disable=g-import-not-at-top
  base = kuairand.get_config()
  tuned = {'batch_size': 2048, 'learning_rate': 0.005}
  cell = runner.cell_config(base, {'model': 'mmoe'}, seed=3, tuned=tuned)
  trial = tuning.trial_plan(base, tuned).config
  for key in ('batch_size', 'eval_every', 'checkpoint_every', 'log_every', 'max_steps'):
    assert cell[key] == trial[key], key
  assert cell.eval_every == round(base.eval_every * base.batch_size / 2048) < base.eval_every


def test_a_variant_whose_study_finished_no_trial_says_it_ran_at_the_defaults():
  """A study whose trials were all pruned (e.g. every batch larger than the split) leaves
  its variant at the config's defaults: table.md says so instead of staying silent."""
  text = report.tuned_section({'DNN': {}, 'HTLNet': {'gamma': 1.0}}, tuned_dir='runs/tune')
  assert '- DNN: the defaults of the config: its study has no completed trial' in text
  assert '- HTLNet: gamma=1' in text
  assert report.tuned_section({'DNN': {}}) == ''        # no tuning asked: nothing to say


def test_a_command_with_fewer_variants_leaves_the_others_cells_to_them(tmp_path):
  """Two commands share one study with different --variants: each runs its own cells and
  puts the other's back (they were pruned, so the other command's table missed them)."""
  workdir, calls = str(tmp_path / 'suite'), []

  def cell(config, run_dir):
    calls.append((config.grad_process, config.seed))
    os.makedirs(run_dir, exist_ok=True)
    result = {'valid': {'y': {'nrmse': 1.0}}, 'test': {'y': {'nrmse': 1.0}}}
    with open(os.path.join(run_dir, 'metrics.json'), 'w') as f:
      json.dump(result, f)
    return result

  from htl_jax.repro import storage as storage_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir)
  storage = storage_lib.open_storage(storage_lib.storage_url(workdir))
  name = 'reproduce:table3:kuairand:sample'
  wide = ['HTLNet|seed0', 'w/o Optimization|seed0']
  runner.open_cell_study(name, storage, wide)           # the wider command enqueued first
  narrow = runner.run_experiment(kuairand.get_config(), 'table3', 1, workdir,
                                 variants=['w/o Optimization'], run_cell=cell)
  assert list(narrow) == ['w/o Optimization|seed0'] and calls == [('none', 0)]
  study = optuna.load_study(study_name=name, storage=storage)
  waiting = [t.user_attrs['cell'] for t in study.trials if t.state.name == 'WAITING']
  assert waiting == ['HTLNet|seed0']                    # put back, not lost
  both = runner.run_experiment(kuairand.get_config(), 'table3', 1, workdir,
                               variants=['HTLNet', 'w/o Optimization'], run_cell=cell)
  assert sorted(both) == wide and calls == [('none', 0), ('auto', 0)]


def test_a_cell_that_only_was_pruned_is_waiting_again(tmp_path):
  from htl_jax.repro import storage as storage_lib  # pylint: disable=g-import-not-at-top
  storage = storage_lib.open_storage(storage_lib.storage_url(str(tmp_path)))
  study = runner.open_cell_study('cells', storage, ['HTLNet|seed0'])
  with pytest.warns(UserWarning, match='Heartbeat'):
    taken = study.ask()
  study.tell(taken, state=optuna.trial.TrialState.PRUNED)
  runner.open_cell_study('cells', storage, ['HTLNet|seed0'])
  assert [t.state.name for t in study.trials] == ['PRUNED', 'WAITING']

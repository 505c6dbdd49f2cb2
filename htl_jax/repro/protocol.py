"""One experiment of the paper, end to end, by the paper's protocol: tune, then seed.

:func:`reproduce` (``htl-reproduce``, docs/design.md section 10):

0. **The selection rule** (``selection``, default ``delta_m``): the same for every model,
   named in ``table.md``. Under ``delta_m`` the reference run (DNN at the dataset's
   defaults, :mod:`htl_jax.repro.reference`) runs first, once per study set, and every run
   of the reproduction selects against it.
1. **Tune** (``tune_trials > 0``): one Optuna study per tuning study of the experiment's
   variants (:func:`plan_studies`: each model's variant its own; HTLNet's ablations start
   from HTLNet's, and a method's own knob that HTLNet lacks, MetaBalance's relax factor, is
   tuned in a small study of its own on top; with ``tune_ablations`` every variant gets a
   full study over the subspace it has), over Table 6 (:mod:`htl_jax.repro.table6`), every
   trial ``trial_seeds`` seeds (:mod:`htl_jax.repro.seeds`), with pruning on their mean, in
   ``<tuned_dir>/<study>/`` and the same storage as the runs, so it resumes after a kill and
   several machines share it. A study that already has its trials is not redone.
2. **Seed**: every variant, seeds ``0..N-1``, from its studies' best configuration with its
   own overrides applied on top (an ablation's switch, Fig. 8's alpha and gamma). Seeds vary
   the model only; the split is the same for every run (``split_seed``).
3. **Report**: ``results.csv``, ``table.md`` / ``table.tex`` / ``table.csv`` (with the rule,
   each variant's test Delta_m against the reference, the runs at the step cap and the tuned
   values of every study), ``tuned.json`` (variant -> the overrides it started from) and the
   experiment's figure.

``tuned_dir`` also reads studies run separately: a folder of ``htl-tune`` workdirs, one per
study (``<tuned_dir>/<study>/best.json``) or per model (``<tuned_dir>/<model>/best.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Optional, Sequence

from absl import logging

from htl_jax.data import default_cache_dir, load_dataset
from htl_jax.errors import ConfigError
from htl_jax.repro import experiments as experiments_lib
from htl_jax.repro import lockstep, report
from htl_jax.repro.progress import Progress, duration
from htl_jax.repro.table6 import searched
from htl_jax.selection import RULES
from htl_jax import run_files
from htl_jax.train.checks import check_config

TUNED = 'tuned.json'


@dataclasses.dataclass(frozen=True)
class ReproduceOptions:
  """``htl-reproduce``'s flags beyond the experiment, its seeds and its workdir.

  Attributes:
    storage: an Optuna RDB URL shared by several machines ('' = ``<workdir>/optuna.db``).
    variants: a subset of the experiment's variants (all when empty).
    tuned_dir: where the tuning studies live ('' = ``<workdir>/tune`` when tuning here,
      else no tuned values: every variant from the config's defaults).
    tune_trials: finished trials of every study before the seeds run (0 = no tuning).
    trial_seeds: seeds of every tuning trial (its value is their mean).
    selection: the rule of every run ('delta_m' or 'core', :mod:`htl_jax.selection`).
    tune_ablations: every variant its own full study (not HTLNet's configuration).
    progress: the runs done of all, and the lines that say so (none by default).
  """

  storage: str = ''
  variants: Sequence[str] = ()
  tuned_dir: str = ''
  tune_trials: int = 0
  trial_seeds: int = 3
  selection: str = 'delta_m'
  tune_ablations: bool = False
  progress: Progress = dataclasses.field(default_factory=Progress)


@dataclasses.dataclass(frozen=True)
class StudyPlan:
  """One tuning study of a reproduction.

  Attributes:
    slug: its folder and name (:func:`htl_jax.repro.experiments.study_slug`).
    overrides: the config overrides of its base.
    after: the study whose best configuration this one starts from ('' = the defaults).
    params: the names it searches (empty: every hyperparameter its config has).
  """

  slug: str
  overrides: dict[str, Any]
  after: str = ''
  params: tuple[str, ...] = ()


def _with(config, overrides: dict[str, Any]):
  out = copy.deepcopy(config)
  for key, value in overrides.items():
    experiments_lib.assign(out, key, value)
  return out


def plan_studies(config, experiment: experiments_lib.Experiment, variants: Sequence[str],
                 tune_ablations: bool = False
                 ) -> tuple[dict[str, StudyPlan], dict[str, list[str]]]:
  """The studies of ``variants`` and, per variant, the studies its configuration comes from
  (in order: a later one's best values win)."""
  plans: dict[str, StudyPlan] = {}
  chains: dict[str, list[str]] = {}
  for variant in variants:
    own = dict(experiment.variants[variant])
    base = own if tune_ablations else experiment.study(variant)
    slug = experiments_lib.study_slug(base)
    plans.setdefault(slug, StudyPlan(slug, base))
    chains[variant] = [slug]
    if base == own:
      continue
    has = set(searched(_with(config, base)))
    extra = tuple(n for n in searched(_with(config, own)) if n not in has)
    if extra:             # the method's own knob, tuned on top of the study it starts from
      knob = experiments_lib.study_slug(own)
      plans.setdefault(knob, StudyPlan(knob, own, after=slug, params=extra))
      chains[variant].append(knob)
  return plans, chains


def _best_overrides(tuned_dir: str, slug: str, model: str) -> Optional[dict[str, Any]]:
  """The best configuration of study ``slug`` in ``tuned_dir`` (None if it has none yet)."""
  for path in (os.path.join(tuned_dir, slug, 'best.json'),
               os.path.join(tuned_dir, model, 'best.json'),
               os.path.join(tuned_dir, 'best.json')):
    if os.path.exists(path):
      with open(path) as f:
        best = json.load(f)
      if best.get('model', model) == model:
        return dict(best.get('overrides', {}))
  return None


def tuned_values(tuned_dir: str, plans: dict[str, StudyPlan],
                 chains: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
  """Per variant, the tuned overrides it starts from ({} where its studies have none)."""
  out = {}
  for variant, chain in chains.items():
    values: dict[str, Any] = {}
    for slug in (chain if tuned_dir else ()):
      values.update(_best_overrides(tuned_dir, slug, plans[slug].overrides.get('model', ''))
                    or {})
    out[variant] = values
  return out


def tune_studies(config, plans: dict[str, StudyPlan], tuned_dir: str, storage_url: str,
                 options: ReproduceOptions) -> None:
  """Step 1: every study reaches ``tune_trials`` finished trials (a knob study after the
  study it starts from)."""
  from htl_jax.repro import storage as storage_lib, tuning  # pylint: disable=g-import-not-at-top
  opened = None if lockstep.is_follower() else storage_lib.open_storage(storage_url)
  for slug, plan in plans.items():
    base = config
    if plan.after:
      after = plans[plan.after]
      base = _with(config, _best_overrides(tuned_dir, plan.after,
                                           after.overrides.get('model', '')) or {})
    base = _with(base, plan.overrides)
    summary = tuning.run_study(
        base, os.path.join(tuned_dir, slug), opened,
        tuning.StudyOptions(n_trials=options.tune_trials, trial_seeds=options.trial_seeds,
                            study_name=f'tune:{experiments_lib.dataset_tag(config)}:{slug}',
                            params=plan.params, progress=options.progress))
    if not lockstep.is_follower():
      logging.info('tuned %s: %s', slug, json.dumps(summary['counts']))


def _reference_runs(config, workdir: str, tuned_dir: str, options: ReproduceOptions) -> int:
  """How many runs :func:`_reference` will train (for the progress total)."""
  from htl_jax.repro import reference  # pylint: disable=g-import-not-at-top
  if options.tune_trials == 0 and (reference.find(tuned_dir) or reference.find(workdir)):
    return 0
  return reference.runs_needed(config, tuned_dir or workdir, options.trial_seeds)


def _reference(config, workdir: str, tuned_dir: str, storage_url: str,
               options: ReproduceOptions) -> str:
  """Step 0 under ``delta_m``: the study set's reference.json (made where it is missing)."""
  from htl_jax.repro import reference  # pylint: disable=g-import-not-at-top
  if config.selection_reference:
    return str(config.selection_reference)
  if options.tune_trials == 0:
    found = reference.find(tuned_dir) or reference.find(workdir)
    if found:
      return found
  directory = tuned_dir or workdir
  return reference.ensure(config, directory, storage_url, options.trial_seeds,
                          options.progress)


def reproduce(config, experiment_name: str, seeds: int, workdir: str,
              options: ReproduceOptions = ReproduceOptions()) -> str:
  """Runs the experiment by the paper's protocol (module docstring); returns ``table.md``.

  Args:
    config: the dataset config (every run's base).
    experiment_name: a key of :data:`htl_jax.repro.experiments.EXPERIMENTS`.
    seeds: seeds ``0 .. seeds-1`` of every variant; 0 = tune only (``tuned.json``, no runs).
    workdir: run dirs, the SQLite storage by default, the tuning studies by default
      (``<workdir>/tune``) and the report.
    options: :class:`ReproduceOptions`.

  Returns:
    ``table.md``'s text ('' in the non-primary processes of a multi-process worker).
  """
  experiment = experiments_lib.get_experiment(experiment_name)
  check_config(config)
  if options.selection not in RULES:
    raise ConfigError(f'--selection={options.selection!r} is not one of {list(RULES)}')
  if experiment.trains and seeds == 0 and options.tune_trials == 0:
    raise ConfigError('--seeds=0 only tunes, and --tune_trials=0 tunes nothing: give '
                      '--seeds >= 1, or --tune_trials >= 1 to tune only')
  if options.tuned_dir and not options.tune_trials and not os.path.isdir(options.tuned_dir):
    raise ConfigError(f'--tuned={options.tuned_dir}: no such directory (the tune/ folder of '
                      'a reproduction, or a folder of htl-tune workdirs)')
  chosen = list(experiments_lib.select_variants(experiment, list(options.variants)))
  if not lockstep.is_follower():
    run_files.claim(workdir, run_files.REPRODUCTION, {
        'experiment': experiment_name, 'selection': options.selection,
        'data': experiments_lib.dataset_tag(config)})
  if not experiment.trains:
    if lockstep.is_follower():
      return ''
    data = load_dataset(config, config.cache_dir or default_cache_dir())
    text = report.dataset_table(data, f'{experiment.title} ({experiments_lib.dataset_tag(config)})')
    run_files.write_text(os.path.join(workdir, 'table.md'), text)
    options.progress.summary(f'{experiment_name}: {os.path.join(workdir, "table.md")}')
    return text
  # Optuna's modules: imported only once something trains (table1 needs none).
  from htl_jax.repro import runner  # pylint: disable=g-import-not-at-top
  from htl_jax.repro import storage as storage_lib  # pylint: disable=g-import-not-at-top
  storage_url = storage_lib.storage_url(workdir, options.storage)
  tuned_dir = options.tuned_dir or (os.path.join(workdir, 'tune') if options.tune_trials
                                    else '')
  config = copy.deepcopy(config)
  config.selection = options.selection
  plans, chains = plan_studies(config, experiment, chosen, options.tune_ablations)
  options.progress.add(_reference_runs(config, workdir, tuned_dir, options)
                       + len(plans) * options.tune_trials * options.trial_seeds
                       + len(chosen) * seeds)
  if options.selection == 'delta_m':
    config.selection_reference = _reference(config, workdir, tuned_dir, storage_url, options)
  if options.tune_trials > 0:
    tune_studies(config, plans, tuned_dir, storage_url, options)
  tuned = tuned_values(tuned_dir, plans, chains)
  if seeds == 0:                  # tuning only
    if not lockstep.is_follower():
      run_files.write_json(os.path.join(workdir, TUNED), tuned)
      options.progress.summary(f'{experiment_name}: tuned only; '
                               f'{os.path.join(workdir, TUNED)}')
    return ''
  results = runner.run_experiment(config, experiment_name, seeds, workdir,
                                  storage=options.storage, variants=chosen, tuned=tuned,
                                  progress=options.progress)
  if lockstep.is_follower():
    return ''
  run_files.write_json(os.path.join(workdir, TUNED), tuned)
  text = report.write_report(workdir, results, experiment, chosen, report.ReportContext(
      config=config, tuned=tuned, tuned_dir=tuned_dir))
  outputs = [os.path.join(workdir, 'table.md')]
  if experiment.figure:
    path = report.draw_figure(experiment.figure, workdir, results)
    text += f'\nFigure: {path}\n'
    outputs.append(path)
  options.progress.summary(
      f'{experiment_name}: {len(results)} of {len(chosen) * seeds} runs in the table, '
      f'{duration(options.progress.clock() - options.progress.started_at)}; '
      + ', '.join(outputs))
  return text

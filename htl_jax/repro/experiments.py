"""Every experiment of the paper as data: named variants, each a set of config overrides.

Tang et al., "Touch the Core", RecSys 2024 (arXiv 2403.17442), Section 5 and Appendix C;
docs/design.md. Adding an experiment is adding an entry to :data:`EXPERIMENTS`. A variant's
overrides are applied on top of the dataset config (and of a model's tuned hyperparameters,
see ``experiments.reproduce --tuned``); the seed is set per run.

``ours`` names the variant whose difference from the best ``baselines`` variant is tested for
significance (the ``*`` of Table 2); ``figure`` names the figure an experiment draws.

The protocol is tune, then seed (docs/design.md): every variant starts from the best
configuration of a tuning study over Table 6, named by the study's overrides
(:meth:`Experiment.study`): a model's variant by its own, and HTLNet's ablations by
HTLNet's (``tuned_as``: they start from HTLNet's tuned configuration with their switch
applied).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from htl_jax.errors import ConfigError

Overrides = dict[str, Any]

# Fig. 8's axes: alpha and gamma both over {1e-5, 1e-4, ..., 1} (6 x 6, docs/design.md).
FIG8_ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FIG8_GAMMAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One table or figure: ordered variants, and what is compared with what."""

  title: str
  variants: dict[str, Overrides]
  ours: Optional[str] = None
  baselines: tuple[str, ...] = ()
  figure: Optional[str] = None        # 'fig4' | 'fig5' | 'fig7' | 'fig8'
  trains: bool = True                 # table1 only describes the data
  tuned_as: dict[str, Overrides] = dataclasses.field(default_factory=dict)

  def study(self, variant: str) -> Overrides:
    """The overrides naming the tuning study whose best configuration ``variant`` starts
    from: ``tuned_as[variant]``, else the variant's own."""
    return dict(self.tuned_as.get(variant, self.variants[variant]))


HTLNET = {'model': 'htlnet'}


def _as_htlnet(variants: dict[str, Overrides]) -> dict[str, Overrides]:
  """Every variant tuned as HTLNet: an ablation starts from HTLNet's tuned configuration."""
  return {name: HTLNET for name in variants}

TABLE2_BASELINES = {
    'DNN': {'model': 'dnn'},
    'SB': {'model': 'shared_bottom'},
    'MMoE': {'model': 'mmoe'},
    'PLE': {'model': 'ple'},
    'AdaTT': {'model': 'adatt'},
    'ESMM': {'model': 'esmm'},
    'AITM': {'model': 'aitm'},
    'MB': {'model': 'shared_bottom', 'grad_process': 'metabalance'},
}

TABLE3 = {'HTLNet': HTLNET,
          'w/o Architecture': {'model': 'shared_bottom', 'grad_process': 'htl'},
          'w/o Optimization': {'model': 'htlnet', 'grad_process': 'none'}}
TABLE4 = {'HTLNet': HTLNET,
          'w/o representation': {'model': 'htlnet', 'use_representation': False},
          'w/o label embedding': {'model': 'htlnet', 'use_label_embedding': False}}
FIG4 = {'attention': {'model': 'htlnet', 'fusion': 'attention'},
        'concat': {'model': 'htlnet', 'fusion': 'concat'}}
TABLE5 = {'HTLNet': HTLNET,
          'w/o stop_gradient': {'model': 'htlnet', 'stop_gradient': False},
          'w/o conflict': {'model': 'htlnet', 'grad_conflict': False},
          'w/o magnitude': {'model': 'htlnet', 'grad_magnitude': False},
          'HTLNet-Gradient-Surgery': {'model': 'htlnet', 'grad_process': 'pcgrad'},
          'HTLNet-MetaBalance': {'model': 'htlnet', 'grad_process': 'metabalance'}}
# Fig. 5's curves average every step of an evaluation window (the paper: "average ... over
# all mini-batch iterations"), so the run without a process takes its per-task gradients at
# every step too.
FIG5 = {'without gradient process': {'model': 'htlnet', 'grad_process': 'none',
                                     'grad_diagnostics': 'every_step'},
        'with gradient process': HTLNET}


def fig8_variant(alpha: float, gamma: float) -> str:
  """Fig. 8's variant name of one cell of the grid (no comma: ``--variants`` splits on it)."""
  return f'alpha={alpha:g}/gamma={gamma:g}'


FIG8 = {fig8_variant(a, g): {'model': 'htlnet', 'alpha': a, 'gamma': g}
        for a in FIG8_ALPHAS for g in FIG8_GAMMAS}

EXPERIMENTS: dict[str, Experiment] = {
    'table1': Experiment('Table 1: dataset statistics', {}, trains=False),
    'table2': Experiment(
        'Table 2: HTLNet against the baselines',
        {**TABLE2_BASELINES, 'HTLNet': HTLNET,
         # Our extra columns: TAFE (Tao et al. 2023) and the pairwise loss (Durmus et al. 2024).
         'TAFE': {'model': 'tafe'},
         'HTLNet+pairwise': {'model': 'htlnet', 'lambda_pair': 0.1}},
        ours='HTLNet', baselines=tuple(TABLE2_BASELINES) + ('TAFE',), figure='fig7',
        tuned_as={'HTLNet+pairwise': HTLNET}),
    'table3': Experiment(
        'Table 3: architecture and optimization', TABLE3, ours='HTLNet',
        baselines=('w/o Architecture', 'w/o Optimization'), tuned_as=_as_htlnet(TABLE3)),
    'table4': Experiment(
        'Table 4: transferred representation and label embedding', TABLE4, ours='HTLNet',
        baselines=('w/o representation', 'w/o label embedding'), tuned_as=_as_htlnet(TABLE4)),
    'fig4': Experiment(
        'Fig. 4: attention fusion (IFU) against concatenation', FIG4, ours='attention',
        baselines=('concat',), figure='fig4', tuned_as=_as_htlnet(FIG4)),
    'table5': Experiment(
        'Table 5: the gradient process', TABLE5, ours='HTLNet',
        baselines=tuple(v for v in TABLE5 if v != 'HTLNet'), tuned_as=_as_htlnet(TABLE5)),
    'table7': Experiment(
        'Table 7: single-task ZILN against HTLNet with a ZILN head',
        {'ZILN': {'model': 'ziln', 'head': 'ziln'},
         'HTLNet-ZILN': {'model': 'htlnet', 'head': 'ziln'}},
        ours='HTLNet-ZILN', baselines=('ZILN',)),
    'fig5': Experiment(
        'Fig. 5: per-task gradient magnitude on the shared embedding', FIG5, figure='fig5',
        tuned_as=_as_htlnet(FIG5)),
    'fig7': Experiment(
        'Fig. 7: training time per epoch',
        {**TABLE2_BASELINES, 'HTLNet': HTLNET}, figure='fig7'),
    'fig8': Experiment(
        'Fig. 8: projection relax factor alpha x magnitude weight gamma', FIG8,
        figure='fig8', tuned_as=_as_htlnet(FIG8)),
}


def study_slug(overrides: Overrides) -> str:
  """A tuning study's name from its overrides: the model, then the other fields
  (``htlnet``, ``shared_bottom.grad_process=metabalance``)."""
  rest = [f'{k}={v}' for k, v in sorted(overrides.items()) if k != 'model']
  return slug('.'.join([str(overrides.get('model', 'default')), *rest]))


def get_experiment(name: str) -> Experiment:
  """The experiment called ``name``; unknown names list the known ones."""
  if name not in EXPERIMENTS:
    raise ConfigError(f'unknown experiment {name!r} (--experiment); known: '
                      f'{", ".join(EXPERIMENTS)}')
  return EXPERIMENTS[name]


def select_variants(experiment: Experiment, names: list[str]) -> dict[str, Overrides]:
  """The experiment's variants, or the ``names`` among them (unknown names raise)."""
  if not names:
    return dict(experiment.variants)
  unknown = [n for n in names if n not in experiment.variants]
  if unknown:
    raise ConfigError(f'unknown variant(s) {", ".join(map(repr, unknown))} (--variants); '
                      f'this experiment has: {", ".join(experiment.variants)}')
  return {n: experiment.variants[n] for n in names}


def slug(variant: str) -> str:
  """A directory name for ``variant`` (letters, digits, ``._=-``)."""
  keep = [c if c.isalnum() or c in '._=-' else '_' for c in variant]
  return ''.join(keep).strip('_') or 'variant'


# ----------------------------------------------------------------------------- cells


def cell_name(variant: str, seed: int) -> str:
  return f'{variant}|seed{seed}'


def parse_cell(cell: str) -> tuple[str, int]:
  variant, _, seed = cell.rpartition('|seed')
  return variant, int(seed)


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, slug(variant), f'seed{seed}')


def assign(config, key: str, value: Any) -> None:
  """``config[key] = value``, converted to the field's type (ints given for floats, ...)."""
  current = config[key]
  if isinstance(current, bool) or not isinstance(current, (int, float, tuple)):
    config[key] = value
  elif isinstance(current, float):
    config[key] = float(value)
  elif isinstance(current, int):
    config[key] = int(value)
  else:
    config[key] = tuple(value)


def dataset_tag(config) -> str:
  """Which data a study is about, for its name (one storage may hold several datasets)."""
  source = config.data.path or config.data_dir or 'sample'
  return f'{config.dataset}:{os.path.basename(os.path.normpath(source))}'

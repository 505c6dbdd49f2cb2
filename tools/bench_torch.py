"""htl-jax's train step side by side with torch-rechub 0.9's same models, in one run.

    pip install torch torch-rechub==0.9.0 pandas     # optional; only this tool imports them
    python tools/bench_torch.py --json

Every model runs at ``tools/bench.py``'s shapes (batch 2048, 45 fields of d = 10 from a
4e4-row vocabulary, hidden layers [128, 64, 32]) in both frameworks. The torch twins are
torch-rechub's own classes (``SharedBottom``, ``MMOE``, ``PLE``, ``ESMM``, ``AITM`` and its
``MetaBalance`` optimizer) with torch-rechub's training step (``MTLTrainer``: forward, the
per-task losses, their mean, backward, ``torch.optim.Adam`` with its default weight decay;
with MetaBalance, one backward per task through ``MetaBalance.step`` then the shared and
task optimizers), on ``--threads`` threads (2: this machine's cores). Where torch-rechub's
constructor cannot express our architecture, its own classes are put together to match it:

- PLE: the second extraction level is torch-rechub's ``CGC`` with experts of width 64 on
  the first level's 128-d outputs (torch-rechub's ``PLE`` gives every level the same
  expert dims), and the towers read 64-d inputs;
- ESMM: one more torch-rechub ``MLP`` tower for the core task (torch-rechub's ESMM has the
  two binary towers only); its loss is the mean of the CTR, CTCVR and core losses;
- AITM: the core task is the third task of the chain.

torch-rechub's MLPs put a BatchNorm after every linear layer; ours have none. The twins run as
shipped ("torch"), with every BatchNorm replaced by the identity ("torch_nobn", the same computation
as ours), and as shipped on one thread ("torch_1thread": on a loaded machine OpenMP's barriers make
two threads slower than one). ``speedup_vs_fastest_twin`` compares each round's htl-jax window with
the fastest of the three twins' windows. The matmul FLOPs of a forward pass are counted in both
frameworks (``torch.utils.flop_counter`` / the ``dot_general``s of the JAX model) and must agree
within 2%.

Timing as in ``tools/bench.py``: windows of steps, all configurations interleaved round by
round; a speedup is the median over rounds of the torch window time over the htl-jax window
time of the same round. The two frameworks run in two worker processes that this one drives
window by window, so only one of them computes at a time: in one process, XLA's and
OpenMP's worker threads spin-wait for each other's cores and torch ran up to 20x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tools'))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

import bench  # tools/bench.py
from htl_jax.runtime import allocator

try:
  import torch
  from torch import nn
  from torch.utils.flop_counter import FlopCounterMode
  from torch_rechub.basic.features import SparseFeature
  from torch_rechub.basic.layers import MLP
  from torch_rechub.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom
  from torch_rechub.models.multi_task.ple import CGC
  from torch_rechub.utils.mtl import MetaBalance, shared_task_layers
except ImportError as error:  # pragma: no cover - optional dependency
  sys.exit(f'error: tools/bench_torch.py needs torch and torch-rechub ({error}); '
           'pip install -e ".[bench_torch]" (without a GPU, first: pip install torch '
           '--index-url https://download.pytorch.org/whl/cpu)')

TASK_TYPES = ['classification', 'classification', 'regression']
# name -> (our model, our gradient process)
MODELS = {
    'shared_bottom': ('shared_bottom', 'none'),
    'mmoe': ('mmoe', 'none'),
    'ple': ('ple', 'none'),
    'esmm': ('esmm', 'none'),
    'aitm': ('aitm', 'none'),
    'mmoe/metabalance': ('mmoe', 'metabalance'),
}


class ESMMWithCore(ESMM):
  """torch-rechub's ESMM plus a core tower (its own MLP) on the same input."""

  def __init__(self, user_features, item_features, tower_params):
    super().__init__(user_features, item_features, tower_params, tower_params)
    self.tower_core = MLP(self.tower_dims, **tower_params)

  def forward(self, x):
    batch = x[self.user_features[0].name].shape[0]
    user = self.embedding(x, self.user_features, squeeze_dim=False).reshape(batch, -1)
    item = self.embedding(x, self.item_features, squeeze_dim=False).reshape(batch, -1)
    tower_in = torch.cat((user, item), dim=1)
    ctr = torch.sigmoid(self.tower_ctr(tower_in))
    ctcvr = ctr * torch.sigmoid(self.tower_cvr(tower_in))
    return torch.cat([ctr, ctcvr, self.tower_core(tower_in)], dim=1)


def torch_model(name: str, spec) -> nn.Module:
  """torch-rechub's twin of our ``name`` at the paper's sizes."""
  features = [SparseFeature(f, v, embed_dim=10) for f, v in zip(spec.fields, spec.vocab_sizes)]
  towers = [{'dims': [32]}] * 3
  if name == 'shared_bottom':
    return SharedBottom(features, TASK_TYPES, {'dims': [128, 64]}, towers)
  if name in ('mmoe', 'mmoe/metabalance'):
    return MMOE(features, TASK_TYPES, 4, {'dims': [128, 64]}, towers)
  if name == 'ple':
    model = PLE(features, TASK_TYPES, 2, 1, 4, {'dims': [128]}, towers)
    # Level 2: experts of width 64 reading the 128-d outputs of level 1, no shared gate
    # (CGC(cur_level=1, n_level=1) takes input_dims as given and is a last level).
    model.cgc_layers[1] = CGC(1, 1, 3, 1, 4, 128, {'dims': [64]})
    model.towers = nn.ModuleList(MLP(64, **t) for t in towers)
    return model
  if name == 'esmm':
    return ESMMWithCore(features[:1], features[1:], {'dims': [128, 64, 32]})
  if name == 'aitm':
    return AITM(features, 3, {'dims': [128, 64, 32]}, [{'dims': []}] * 3)
  raise ValueError(name)


def without_batchnorm(model: nn.Module) -> nn.Module:
  """Every BatchNorm1d replaced by the identity (our MLPs have none)."""
  for module in list(model.modules()):
    for child_name, child in module.named_children():
      if isinstance(child, nn.BatchNorm1d):
        setattr(module, child_name, nn.Identity())
  return model


class TorchRunner:
  """One torch-rechub model, its optimizer(s) and a batch, stepped as MTLTrainer does."""

  def __init__(self, name: str, spec, batch: dict[str, np.ndarray], batchnorm: bool,
               threads: int):
    torch.manual_seed(0)
    self.threads = threads
    self.name = name
    self.model = torch_model(name, spec)
    if not batchnorm:
      self.model = without_batchnorm(self.model)
    self.model.train()
    self.x = {f: torch.as_tensor(batch['x'][:, i], dtype=torch.long)
              for i, f in enumerate(spec.fields)}
    core = (batch['core'] - batch['core'].mean()) / batch['core'].std()
    self.y = torch.as_tensor(np.concatenate([batch['y'], core[:, None]], 1))
    self.losses = [nn.BCELoss(), nn.BCELoss(), nn.MSELoss()]
    params = {'lr': 1e-3, 'weight_decay': 1e-5}         # MTLTrainer's defaults
    if name == 'mmoe/metabalance':
      shared, task = shared_task_layers(self.model)
      self.meta = MetaBalance(shared)
      self.optimizers = [torch.optim.Adam(shared, **params), torch.optim.Adam(task, **params)]
    else:
      self.meta = None
      self.optimizers = [torch.optim.Adam(self.model.parameters(), **params)]
    self.times: list[float] = []

  def _loss_list(self):
    pred = self.model(self.x)          # ESMM's columns: CTR, CTCVR and the core
    return [self.losses[i](pred[:, i], self.y[:, i]) for i in range(3)]

  def step(self) -> None:
    for optimizer in self.optimizers:
      optimizer.zero_grad()
    losses = self._loss_list()
    if self.meta is not None:
      self.meta.step(losses)
    else:
      (sum(losses) / len(losses)).backward()
    for optimizer in self.optimizers:
      optimizer.step()

  def run(self, steps: int, record: bool = True) -> None:
    torch.set_num_threads(self.threads)
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    if record:
      self.times.append((time.perf_counter() - start) / steps)

  def forward_matmul_gflop(self) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
      self.model(self.x)
    return counter.get_total_flops() / 1e9


def jax_forward_matmul_gflop(runner: bench.Runner) -> float:
  """FLOPs of the ``dot_general``s in our model's forward pass, in GFLOP."""
  setup, state = runner.setup, jax.tree.map(lambda v: v[0], runner.state)
  batch = jax.tree.map(lambda v: v[0], runner.batch)
  ids = batch["x"] + np.asarray(setup.layout.offsets)[None, :]
  embs = state.params['embedding']['table'][ids]

  def forward(params, embs):
    return setup.model.apply({'params': params}, (embs,) * setup.spec.num_tasks,
                             train=True, tau=1.0, example_index=batch['index'],
                             rngs={'gumbel': jax.random.PRNGKey(0)})

  jaxpr = jax.make_jaxpr(forward)(state.params['model'], embs)
  return _dot_flops(jaxpr.jaxpr) / 1e9


def _dot_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in contract])
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          total += _dot_flops(inner if hasattr(inner, 'eqns') else inner.jaxpr)
        elif hasattr(sub, 'eqns'):
          total += _dot_flops(sub)
  return total


def _jax_worker(names: list[str], batch_size: int) -> tuple[dict, dict]:
  spec = bench.make_spec(20000)
  runners, info = {}, {}
  for name in names:
    model, process = MODELS[name]
    runner = bench.Runner(spec, batch_size, None, model=model, grad_process=process)
    runner.run(3, record=False)                      # compile and warm up
    runners[name] = runner
    info[name] = {'forward_matmul_gflop': jax_forward_matmul_gflop(runner),
                  'step_gflop': runner.gflops()}
  return runners, info


# Torch variants: (kind, BatchNorm as shipped, threads or None for --threads).
TORCH_KINDS = (('torch', True, None), ('torch_nobn', False, None), ('torch_1thread', True, 1))


def _torch_worker(names: list[str], batch_size: int, threads: int) -> tuple[dict, dict]:
  spec = bench.make_spec(20000)
  batch = bench.make_batch(spec, batch_size)
  runners, info = {}, {}
  for name in names:
    for kind, batchnorm, kind_threads in TORCH_KINDS:
      runner = TorchRunner(name, spec, batch, batchnorm, kind_threads or threads)
      runner.run(3, record=False)
      runners[f'{name}|{kind}'] = runner
    info[name] = {'forward_matmul_gflop': runners[f'{name}|torch'].forward_matmul_gflop()}
  return runners, info


def worker(kind: str, names: list[str], args) -> None:
  """Serve ``run KEY STEPS`` lines on stdin with the window's seconds per step."""
  allocator.keep_scratch_memory()
  if kind == 'jax':
    runners, info = _jax_worker(names, args.batch_size)
  else:
    runners, info = _torch_worker(names, args.batch_size, args.threads)
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    _, key, steps = line.split()
    runners[key].run(int(steps))
    print(runners[key].times[-1], flush=True)


class _Worker:
  """A worker subprocess of this script."""

  def __init__(self, kind: str, args):
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={kind}',
           f'--models={args.models}', f'--threads={args.threads}',
           f'--batch_size={args.batch_size}']
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = json.loads(self.proc.stdout.readline())

  def run(self, key: str, steps: int) -> float:
    self.proc.stdin.write(f'run {key} {steps}\n')
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--steps', type=int, default=5, help='steps per window')
  parser.add_argument('--batch_size', type=int, default=2048)
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  names = args.models.split(',')
  if args.worker:
    worker(args.worker, names, args)
    return
  jax_worker, torch_worker = _Worker('jax', args), _Worker('torch', args)
  kinds = tuple(kind for kind, _, _ in TORCH_KINDS)
  times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ('jax',) + kinds}
                                              for n in names}
  for _ in range(args.rounds):
    for name in names:
      times[name]['jax'].append(jax_worker.run(name, args.steps))
      for kind in kinds:
        times[name][kind].append(torch_worker.run(f'{name}|{kind}', args.steps))
  jax_worker.close()
  torch_worker.close()
  result = {'threads': args.threads, 'batch_size': args.batch_size, 'rounds': args.rounds,
            'models': {}}
  for name in names:
    ours = float(np.median(times[name]['jax']))
    row = {'examples_per_s': args.batch_size / ours,
           'gflop_per_s': jax_worker.info[name]['step_gflop'] / ours,
           'forward_matmul_gflop': jax_worker.info[name]['forward_matmul_gflop'],
           'torch_forward_matmul_gflop': torch_worker.info[name]['forward_matmul_gflop']}
    row['matmul_flops_ratio'] = row['torch_forward_matmul_gflop'] / row['forward_matmul_gflop']
    for kind in kinds:
      row[f'{kind}_examples_per_s'] = args.batch_size / float(np.median(times[name][kind]))
      row[f'speedup_vs_{kind}'] = float(np.median(np.divide(times[name][kind],
                                                             times[name]['jax'])))
    fastest_twin = np.min([times[name][kind] for kind in kinds], axis=0)
    row['speedup_vs_fastest_twin'] = float(np.median(fastest_twin / times[name]['jax']))
    result['models'][name] = row
  if args.json:
    print(json.dumps(result))
    return
  print(f'{args.threads} threads, batch {args.batch_size}, {args.rounds} rounds')
  print(f'{"model":18s} {"ours ex/s":>10s} {"GFLOP/s":>8s} {"torch ex/s":>10s} {"x torch":>8s} '
        f'{"x no-BN":>8s} {"x 1 thr":>8s} {"x best":>8s} {"FLOP ratio":>10s}')
  for name, row in result['models'].items():
    print(f'{name:18s} {row["examples_per_s"]:10.0f} {row["gflop_per_s"]:8.1f} '
          f'{row["torch_examples_per_s"]:10.0f} {row["speedup_vs_torch"]:8.2f} '
          f'{row["speedup_vs_torch_nobn"]:8.2f} {row["speedup_vs_torch_1thread"]:8.2f} '
          f'{row["speedup_vs_fastest_twin"]:8.2f} {row["matmul_flops_ratio"]:10.3f}')


if __name__ == '__main__':
  main()

"""``htl_jax.optim`` stands alone: with only jax, optax and numpy (and what they require)
importable, it imports and runs, and it loads no other module of htl-jax.

The child process sees exactly the distributions ``pip install jax optax numpy`` would
install (their requirements' closure, read from the installed metadata) and a copy of
htl_jax holding only ``__init__.py`` and ``optim/``: flax, polars, orbax, ml_collections
and the rest of htl_jax cannot be imported there.
"""

from __future__ import annotations

from importlib import metadata
import pathlib
import shutil
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

_CHILD = r"""
import sys
import jax, jax.numpy as jnp, optax
import htl_jax.optim as optim
for name in ('flax', 'polars', 'orbax', 'ml_collections', 'htl_jax.train'):
  try:
    __import__(name)
  except ImportError:
    continue
  raise SystemExit(f'{name} is importable: the environment is not minimal')
ours = sorted(m for m in sys.modules if m.startswith('htl_jax'))
assert all(m in ('htl_jax', 'htl_jax.optim') or m.startswith('htl_jax.optim.') for m in ours), ours
grads = {'w': jnp.stack([jnp.ones(3), -jnp.ones(3), 2 * jnp.ones(3)])}
tx = optax.chain(optim.hybrid_grad_balance(num_tasks=3), optax.adam(1e-3))
updates, _ = tx.update(grads, tx.init({'w': jnp.zeros(3)}))
assert updates['w'].shape == (3,)
print('ok', ' '.join(ours))
"""


def _closure(names: list[str]) -> set[str]:
  """The installed distributions ``names`` require, transitively (no extras)."""
  todo, seen = list(names), set()
  while todo:
    name = canonicalize_name(todo.pop())
    if name in seen:
      continue
    try:
      dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
      continue
    seen.add(name)
    for text in dist.requires or []:
      requirement = Requirement(text)
      if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
        todo.append(requirement.name)
  return seen


def _site(tmp_path: pathlib.Path) -> pathlib.Path:
  """A folder with links to the closure's top-level files and a minimal htl_jax."""
  site = tmp_path / 'site'
  site.mkdir()
  for name in _closure(['jax', 'optax', 'numpy']):
    dist = metadata.distribution(name)
    for top in {pathlib.Path(str(f)).parts[0] for f in dist.files or []}:
      source = pathlib.Path(str(dist.locate_file(top)))
      if top != '..' and source.exists() and not (site / top).exists():
        (site / top).symlink_to(source)
  package = site / 'htl_jax'
  package.mkdir()
  shutil.copy(pathlib.Path(REPO) / 'htl_jax' / '__init__.py', package)
  shutil.copytree(pathlib.Path(REPO) / 'htl_jax' / 'optim', package / 'optim')
  return site


def test_optim_runs_with_only_jax_optax_and_numpy(tmp_path):
  site = _site(tmp_path)
  code = f'import sys; sys.path[:0] = [{str(site)!r}]\n' + _CHILD
  done = subprocess.run([sys.executable, '-I', '-S', '-c', code], capture_output=True,
                        text=True, timeout=300, cwd=tmp_path,
                        env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith('ok htl_jax htl_jax.optim'), done.stdout

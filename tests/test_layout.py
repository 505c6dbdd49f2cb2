"""The package's shape (the README's Layout): imports only go down, no file over 500 lines.

Floors, lowest first; a module may import its own floor and the floors below it, never one
above. ``experiments/`` and ``htl_jax`` never import the checkout's top-level ``configs``.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'htl_jax'

FLOORS = (
    ('htl_jax.errors', 'htl_jax.spec', 'htl_jax.metrics'),
    ('htl_jax.optim', 'htl_jax.embedding', 'htl_jax.configs', 'htl_jax.selection'),
    ('htl_jax.models', 'htl_jax.losses', 'htl_jax.data'),
    ('htl_jax.runtime', 'htl_jax.run_files'),
    ('htl_jax.train',),
    ('htl_jax.repro', 'htl_jax.serve'),
    ('htl_jax.cli',),
)


def _floor(module: str) -> int:
  for level, prefixes in enumerate(FLOORS):
    if any(module == p or module.startswith(p + '.') for p in prefixes):
      return level
  raise AssertionError(f'{module} is on no floor of FLOORS')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(), str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def _sources(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.rglob('*.py') if '__pycache__' not in p.parts)


def _known(name: str) -> str | None:
  """The htl_jax module (or package) that an imported name refers to."""
  while name.startswith('htl_jax.'):
    path = ROOT / name.replace('.', os.sep)
    if path.with_suffix('.py').exists() or (path / '__init__.py').exists():
      return name
    name = name.rpartition('.')[0]
  return None


@pytest.mark.parametrize('path', _sources(PACKAGE), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
  module = _module_name(path)
  if module == 'htl_jax':
    return
  level = _floor(module)
  for name in _imports(path):
    assert name != 'configs' and not name.startswith(('configs.', 'experiments')), (
        f'{module} imports {name}')
    target = _known(name)
    if target is not None and target != 'htl_jax':
      assert _floor(target) <= level, f'{module} (floor {level}) imports {target}'


def test_experiments_import_only_the_package():
  for path in _sources(ROOT / 'experiments'):
    for name in _imports(path):
      assert not name.startswith('configs'), f'{path} imports {name}'


@pytest.mark.parametrize('path', _sources(PACKAGE), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_file_over_500_lines(path):
  assert len(path.read_text().splitlines()) <= 500


@pytest.mark.parametrize('module', ['htl_jax.cli.reproduce', 'htl_jax.cli.train',
                                    'htl_jax.cli.predict', 'htl_jax.cli.export',
                                    'htl_jax.cli.check_data'])
def test_commands_without_a_study_do_not_import_optuna(module):
  """A command module, with the report and figures, loads without Optuna (table1 and the
  tables of finished runs need none: it is the `repro` extra's)."""
  code = (f'import sys, {module}\n'
          'import htl_jax.repro.report, htl_jax.repro.figures, htl_jax.repro.protocol\n'
          'print(sorted(m for m in sys.modules if m.split(".")[0] == "optuna"))\n')
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == '[]'

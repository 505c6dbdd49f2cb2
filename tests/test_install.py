"""``pip install`` gives one package, and its commands work from any folder.

The wheel is built from this checkout and installed into a fresh virtual environment, which
borrows the installed dependencies of the running one (a ``.pth`` line: no download, and not
the checkout's own editable ``htl_jax``). The train command then runs from a temporary folder
that has a ``configs`` package of its own, which must not shadow ours (nor ours theirs).
"""

from __future__ import annotations

import glob
import os
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import REPO


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
  """The wheel of this checkout."""
  wheels = tmp_path_factory.mktemp('wheels')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(wheels), REPO], check=True, capture_output=True, text=True)
  (path,) = glob.glob(str(wheels / 'htl_jax-*.whl'))
  return path


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory) -> str:
  """The ``bin`` folder of a fresh environment with the wheel installed."""
  env = tmp_path_factory.mktemp('install') / 'env'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env)], check=True)
  python = env / 'bin' / 'python'
  purelib = subprocess.run([str(python), '-c', 'import sysconfig; '
                            'print(sysconfig.get_paths()["purelib"])'],
                           check=True, capture_output=True, text=True).stdout.strip()
  # The running environment's packages (jax, flax, ...), without processing its .pth files
  # (one of them maps ``htl_jax`` to this checkout).
  ours = {sysconfig.get_paths()['purelib'], *site.getsitepackages()}
  with open(os.path.join(purelib, 'dependencies.pth'), 'w') as f:
    f.write('\n'.join(sorted(p for p in ours if os.path.isdir(p))) + '\n')
  subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install',
                  '--no-deps', '-q', wheel], check=True, capture_output=True, text=True)
  return str(env / 'bin')


def test_the_wheel_holds_one_top_level_package(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  tops = {name.split('/')[0] for name in names
          if not name.split('/')[0].endswith(('.dist-info', '.data'))}
  assert tops == {'htl_jax'}
  assert 'htl_jax/configs/kuairand.py' in names
  assert any(name.startswith('htl_jax/data/sample/kuairand/') and name.endswith('.csv')
             for name in names)


def test_the_train_command_runs_from_a_folder_with_its_own_configs(installed, tmp_path,
                                                                   cache_dir):
  folder = tmp_path / 'project'
  (folder / 'configs').mkdir(parents=True)
  (folder / 'configs' / '__init__.py').write_text('')
  (folder / 'configs' / 'kuairand.py').write_text(
      'raise RuntimeError("the user\'s own configs/kuairand.py was imported")\n')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('PYTHONPATH', None)
  done = subprocess.run(
      [os.path.join(installed, 'htl-train'), '--config=kuairand:smoke=True',
       f'--workdir={tmp_path / "run"}', f'--config.cache_dir={cache_dir}',
       '--compilation_cache=none'],
      cwd=folder, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / 'run' / 'metrics.json').exists()
  where = subprocess.run(
      [os.path.join(installed, 'python'), '-c',
       'import htl_jax, importlib.util; print(htl_jax.__file__); '
       'print(importlib.util.find_spec("configs"))'],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split('\n')
  assert not where[0].startswith(REPO) and 'site-packages' in where[0]
  assert where[1] == 'None'           # no top-level ``configs`` package was installed


@pytest.mark.parametrize('command', ['htl-train', 'htl-reproduce', 'htl-tune', 'htl-predict',
                                     'htl-export', 'htl-check-data'])
def test_every_command_says_what_it_does_and_shows_its_flags(installed, tmp_path, command):
  done = subprocess.run([os.path.join(installed, command), '--help'], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  text = done.stdout
  assert text.lstrip().startswith(f'{command}:'), text[:200]
  assert '``' not in text                           # plain text, not the docstring's RST
  assert '--workdir' in text or '--out' in text or command == 'htl-check-data'
  assert '--config' in text or command in ('htl-predict', 'htl-export')

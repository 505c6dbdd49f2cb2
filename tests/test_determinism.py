"""``set_gpu_determinism``: XLA's deterministic-ops flag and full float32 matmul precision.

The settings are process-wide and XLA reads its flags once, when the backend starts, so each
case runs in a fresh interpreter. On CPU both settings are accepted and change nothing
(``test_train.test_gpu_determinism_changes_nothing_on_cpu`` compares whole runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from htl_jax.data import load_dataset
from htl_jax.losses import CoreTransform
from htl_jax.train.state import make_setup

_CHILD = """
import json, os
import jax
from htl_jax.runtime import determinism

out = {'before': determinism.status()}
out['off'] = determinism.set_gpu_determinism(False)
out['after_off'] = [os.environ['XLA_FLAGS'], determinism.status()]
out['on'] = determinism.set_gpu_determinism(True)
out['after_on'] = [os.environ['XLA_FLAGS'], determinism.status()]
out['devices'] = jax.device_count()           # the backend starts with the flags set
os.environ['XLA_FLAGS'] = ''
out['on_too_late'] = determinism.set_gpu_determinism(True)
print(json.dumps(out))
"""


def _child_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_DEFAULT_MATMUL_PRECISION')}
  return {**env, 'JAX_PLATFORMS': 'cpu', **extra}


def test_flags_are_set_as_asked_before_the_backend_starts():
  flags = '--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=false'
  done = subprocess.run([sys.executable, '-c', _CHILD], cwd=REPO,
                        env=_child_env(XLA_FLAGS=flags), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['before'] == {'deterministic_ops': False, 'matmul_precision': None}
  # False leaves everything as it was.
  assert out['off'] is False
  assert out['after_off'] == [flags, out['before']]
  # True replaces the flag's setting, keeps the others, and the backend accepts them.
  assert out['on'] is True
  assert out['after_on'] == [
      '--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true',
      {'deterministic_ops': True, 'matmul_precision': 'highest'}]
  assert out['devices'] == 2
  # Once the backend runs, a flag that was not there at its start cannot count.
  assert out['on_too_late'] is False
  assert 'applies to the next process only' in done.stderr


@pytest.mark.parametrize('value, line', [('True', 'GPU determinism on'),
                                         ('False', 'GPU determinism off')])
def test_every_command_sets_it_from_the_config(value, line):
  """``htl-check-data`` (any command that loads a config) sets it at its start; on a CPU
  it says so only at ``--verbosity=1`` (a device-specific line)."""
  def check_data(*extra):
    return subprocess.run(
        [sys.executable, '-m', 'htl_jax.cli.check_data', '--compilation_cache=none',
         '--config=kuairand', f'--config.gpu_determinism={value}', *extra],
        cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=300)
  quiet, verbose = check_data(), check_data('--verbosity=1')
  assert quiet.returncode == verbose.returncode == 0, quiet.stderr[-3000:]
  assert line not in quiet.stderr and line in verbose.stderr
  assert 'applies to the next process only' not in verbose.stderr


def test_the_switch_shares_compiled_programs(cache_dir):
  """Not a step-shaping field: runs that differ only in it share one setup."""
  config = tiny_config(cache_dir)
  data = load_dataset(config, cache_dir)
  transform = CoreTransform.fit(config.core_transform, data.train.core)
  fast = tiny_config(cache_dir, gpu_determinism=False)
  assert make_setup(config, data.spec, transform) is make_setup(fast, data.spec, transform)

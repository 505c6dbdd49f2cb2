"""``tools/gpu_check.sh``: a valid, shellcheck-clean script with its documented arguments.

Its steps run on a GPU machine (minutes); ``tools/gpu_check.sh --cpu`` is their dry run on
CPU (about 3 minutes on 2 cores, too long for the suite; run it by hand after changing it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, 'tools', 'gpu_check.sh')


def test_the_script_parses_and_is_executable():
  assert os.access(SCRIPT, os.X_OK)
  subprocess.run(['bash', '-n', SCRIPT], check=True)


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck not installed')
def test_the_script_is_shellcheck_clean():
  done = subprocess.run(['shellcheck', SCRIPT], capture_output=True, text=True)
  assert done.returncode == 0, done.stdout


def test_help_and_a_bad_argument():
  shown = subprocess.run([SCRIPT, '--help'], capture_output=True, text=True, check=True)
  assert '--cpu' in shown.stdout and 'gpu_check.json' in shown.stdout
  bad = subprocess.run([SCRIPT, '--gpu'], capture_output=True, text=True)
  assert bad.returncode == 2 and 'unknown argument --gpu' in bad.stderr


def test_without_a_gpu_it_stops_after_the_devices_step_with_a_summary(tmp_path):
  """GPU mode on a CPU backend: one JSON summary in $OUT saying so, logs beside it, exit 1,
  and the work folder removed."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'OUT': str(tmp_path), 'PYTHON': sys.executable,
         'TMPDIR': str(tmp_path)}
  env.pop('GPU_CHECK_KEEP', None)
  done = subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  with open(tmp_path / 'gpu_check.json') as f:
    summary = json.load(f)
  assert summary['ok'] is False and summary['mode'] == 'gpu'
  assert summary['devices']['backend'] == 'cpu'
  assert list(summary['steps']) == ['devices']
  devices = summary['steps']['devices']
  assert devices['ok'] is False and devices['expected_backend'] == 'gpu'
  assert devices['seconds'] > 0 and 'log_tail' in devices
  assert (tmp_path / 'gpu_check_logs' / 'devices.log').exists()
  assert not list(tmp_path.glob('gpu_check.??????'))

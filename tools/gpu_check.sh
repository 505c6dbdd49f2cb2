#!/usr/bin/env bash
# What a GPU machine must show, in a few minutes, written as ONE JSON summary.
#
#   tools/gpu_check.sh           # NVIDIA GPUs: pip install -e ".[cuda12,test]" (or cuda13)
#   tools/gpu_check.sh --cpu     # dry run of the same steps on CPU (2 fake devices, tiny runs)
#
# Steps, each timed under its own limit (a failed step does not stop the others):
#   devices    the backend and its devices (GPU mode stops here without a GPU backend)
#   tests      the GPU-relevant tests (train, loop, parallel, distributed, export) on the
#              default backend, with the settings the commands use for gpu_determinism in
#              the environment (the in-process runs of the tests go through no command)
#   train_1    the embedded sample (--config=kuairand) on 1 device
#   train_all  the same on all devices (global batch rounded to a multiple of their count)
#   compare    their metrics.json: identical when "all" is 1 device (run-to-run
#              determinism), within rel 1e-3 / abs 1e-4 otherwise (the tests' tolerance)
#   export     htl-export of train_1, then jax.export.deserialize and a call on the GPU,
#              compared with the same call on the CPU
#   bench      tools/bench.py --quick --json (GPU: without the CPU-only preprocessing key,
#              end_to_end_vs_step on a 300k-row log; CPU: the step keys at batch 512)
# Summary: $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json:
#   {"ok": bool, "mode": "gpu"|"cpu", "devices": {...},
#    "steps": {name: {"ok": bool, "rc": int, "seconds": float, "limit": int, ...}}}
# with each failed step's log tail. Exit code 0 when every step passed, 1 otherwise.
# Environment: PYTHON (default python3), GPU_CHECK_WORKERS (pytest -n; default 4 on GPU,
# 2 with --cpu), GPU_CHECK_KEEP=1 keeps the work folder (runs, exports, logs; its path is
# then in the summary). With $OUT set, the steps' logs are copied to $OUT/gpu_check_logs.
set -uo pipefail
export LC_ALL=C

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (only --cpu)" >&2; exit 2 ;;
  esac
done

SUMMARY="${OUT:+$OUT/gpu_check.json}"
SUMMARY="${SUMMARY:-$PWD/gpu_check.json}"
PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Several processes share a GPU (pytest workers, the tests' subprocesses): no process takes
# 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export HTL_JAX_COMPILATION_CACHE="$WORK/xla"

if [ "$MODE" = cpu ]; then
  export JAX_PLATFORMS=cpu
  ALL_FLAGS="--xla_force_host_platform_device_count=2"
  CONFIG="kuairand:smoke=True"
  TESTS=(tests/test_parallel.py tests/test_determinism.py
         tests/test_train.py::test_outputs_written
         tests/test_train.py::test_gpu_determinism_changes_nothing_on_cpu)
  TEST_FILTER="not nothing_matches_this"
  BENCH_ARGS=(--quick --json --skip_prep --skip_end_to_end --batch_size=512)
  LIMITS=(tests=240 train=180 export=120 bench=240)
  WORKERS="${GPU_CHECK_WORKERS:-2}"
else
  ALL_FLAGS=""
  CONFIG="kuairand"
  TESTS=(tests/test_train.py tests/test_loop.py tests/test_parallel.py
         tests/test_distributed.py tests/test_export.py)
  # /proc/self/maps counts are XLA:CPU's; a GPU driver maps memory of its own.
  TEST_FILTER="not memory_is_flat"
  BENCH_ARGS=(--quick --json --skip_prep --prep_rows=300000)
  LIMITS=(tests=150 train=60 export=45 bench=150)
  WORKERS="${GPU_CHECK_WORKERS:-4}"
fi
limit() {  # limit NAME: the step's time limit in seconds
  local entry
  for entry in "${LIMITS[@]}"; do
    if [ "${entry%%=*}" = "$1" ]; then echo "${entry#*=}"; return; fi
  done
}

step() {  # step NAME LIMIT COMMAND...: run it under the limit; log and {"rc", times} in WORK
  local name=$1 seconds=$2 start rc
  shift 2
  start=$EPOCHREALTIME
  echo "gpu_check: $name (limit ${seconds}s)" >&2
  timeout --kill-after=10 "$seconds" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  printf '{"rc": %d, "start": %s, "end": %s, "limit": %d}\n' "$rc" "$start" \
    "$EPOCHREALTIME" "$seconds" >"$WORK/$name.step.json"
  echo "gpu_check: $name rc=$rc" >&2
  return "$rc"
}

summarize() {  # the one JSON summary from WORK, its path on stdout; exit code
  "$PYTHON" - "$WORK" "$MODE" "$SUMMARY" <<'PY'
import glob, json, os, sys
import xml.etree.ElementTree as ET

work, mode, summary_path = sys.argv[1:4]
def load(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default

steps = {}
for path in sorted(glob.glob(os.path.join(work, '*.step.json'))):
  name = os.path.basename(path)[:-len('.step.json')]
  record = load(path, {})
  entry = {'rc': record.get('rc'), 'seconds': round(record['end'] - record['start'], 2),
           'limit': record.get('limit'), 'timed_out': record.get('rc') in (124, 137)}
  entry.update(load(os.path.join(work, f'{name}.detail.json'), {}))
  entry['ok'] = entry['rc'] == 0 and entry.get('ok', True)
  steps[name] = entry
tests = os.path.join(work, 'tests.xml')
if 'tests' in steps and os.path.exists(tests):
  suite = ET.parse(tests).getroot()
  suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
  failed = [f"{case.get('classname')}.{case.get('name')}" for case in suite.iter('testcase')
            if case.find('failure') is not None or case.find('error') is not None]
  steps['tests'].update({k: int(suite.get(k, 0)) for k in
                         ('tests', 'failures', 'errors', 'skipped')}, failed=failed)
for name, entry in steps.items():
  if not entry['ok']:
    try:
      with open(os.path.join(work, f'{name}.log'), errors='replace') as f:
        entry['log_tail'] = f.read()[-3000:]
    except OSError:
      pass
summary = {'ok': bool(steps) and all(s['ok'] for s in steps.values()), 'mode': mode,
           'devices': load(os.path.join(work, 'devices.json'), {}), 'steps': steps}
if os.environ.get('GPU_CHECK_KEEP'):
  summary['work'] = work
os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
with open(summary_path, 'w') as f:
  json.dump(summary, f, indent=1)
print(summary_path)
sys.exit(0 if summary['ok'] else 1)
PY
}

finish() {  # the summary, the logs to $OUT, the work folder removed unless kept
  local rc
  summarize
  rc=$?
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_check_logs" && cp "$WORK"/*.log "$OUT/gpu_check_logs/" 2>/dev/null
  fi
  if [ -z "${GPU_CHECK_KEEP:-}" ]; then rm -rf "$WORK"; fi
  return "$rc"
}

# ----------------------------------------------------------------------------- devices
if [ "$MODE" = cpu ]; then export XLA_FLAGS="$ALL_FLAGS"; fi   # the devices "all" means
step devices 120 "$PYTHON" - "$WORK" "$MODE" <<'PY'
import json, sys
import jax
import htl_jax
work, mode = sys.argv[1:3]
devices = jax.devices()
found = {'backend': jax.default_backend(), 'count': len(devices),
         'kinds': sorted({d.device_kind for d in devices}), 'jax': jax.__version__,
         'htl_jax': htl_jax.__version__}
with open(f'{work}/devices.json', 'w') as f:
  json.dump(found, f)
expected = 'cpu' if mode == 'cpu' else 'gpu'
json.dump({'ok': found['backend'] == expected, 'expected_backend': expected},
          open(f'{work}/devices.detail.json', 'w'))
print(json.dumps(found))
sys.exit(0 if found['backend'] == expected else 1)
PY
DEVICES_OK=$?
if [ "$DEVICES_OK" -ne 0 ] && [ "$MODE" = gpu ]; then
  echo "gpu_check: no GPU backend (devices step's log in the summary); nothing else runs" >&2
  finish
  exit 1
fi
if [ "$MODE" = cpu ]; then unset XLA_FLAGS; fi
NALL=$("$PYTHON" -c "import json; print(json.load(open('$WORK/devices.json'))['count'])")
BATCH=$(( 2048 / NALL * NALL ))
EVAL_BATCH=$(( 8192 / NALL * NALL ))

# ----------------------------------------------------------------------------- tests
# What htl_jax.runtime.determinism sets at a command's start, for the tests' in-process runs.
XLA_FLAGS="--xla_gpu_deterministic_ops=true" JAX_DEFAULT_MATMUL_PRECISION=highest \
  step tests "$(limit tests)" "$PYTHON" -m pytest -q -n "$WORKERS" -p no:cacheprovider \
  --junitxml="$WORK/tests.xml" -k "$TEST_FILTER" "${TESTS[@]}"

# ----------------------------------------------------------------------------- train
TRAIN_FLAGS=("--config=$CONFIG" "--config.batch_size=$BATCH"
             "--config.eval_batch_size=$EVAL_BATCH" "--config.cache_dir=$WORK/data_cache")
if [ "$MODE" = cpu ]; then
  step train_1 "$(limit train)" "$PYTHON" -m htl_jax.cli.train "${TRAIN_FLAGS[@]}" \
    --workdir="$WORK/train_1"
  XLA_FLAGS="$ALL_FLAGS" step train_all "$(limit train)" "$PYTHON" -m htl_jax.cli.train \
    "${TRAIN_FLAGS[@]}" --workdir="$WORK/train_all"
else
  FIRST_GPU="${CUDA_VISIBLE_DEVICES:-0}"
  CUDA_VISIBLE_DEVICES="${FIRST_GPU%%,*}" step train_1 "$(limit train)" "$PYTHON" \
    -m htl_jax.cli.train "${TRAIN_FLAGS[@]}" --workdir="$WORK/train_1"
  step train_all "$(limit train)" "$PYTHON" -m htl_jax.cli.train "${TRAIN_FLAGS[@]}" \
    --workdir="$WORK/train_all"
fi

step compare 60 "$PYTHON" - "$WORK" "$NALL" <<'PY'
import json, math, sys
work, n_all = sys.argv[1], int(sys.argv[2])
def metrics(name):
  with open(f'{work}/{name}/metrics.json') as f:
    return json.load(f)
def log_says(name, text):
  with open(f'{work}/{name}.log', errors='replace') as f:
    return text in f.read()
one, every = metrics('train_1'), metrics('train_all')
worst_rel, worst_abs, worst = 0.0, 0.0, ''
for split in ('valid', 'test'):
  for task, values in one[split].items():
    for name, a in values.items():
      b = every[split][task][name]
      if a is None or b is None:
        if a != b:
          worst_rel, worst = math.inf, f'{split}/{task}/{name}'
        continue
      diff = abs(a - b)
      rel = diff / max(abs(a), 1e-12)
      if diff > 1e-4 and rel > worst_rel:
        worst_rel, worst = rel, f'{split}/{task}/{name}'
      worst_abs = max(worst_abs, diff)
identical = all(one[s] == every[s] for s in ('valid', 'test'))
ok = identical if n_all == 1 else worst_rel <= 1e-3
detail = {'ok': ok, 'devices_all': n_all, 'identical': identical,
          'max_abs_diff': worst_abs, 'max_rel_diff_over_1e-4': worst_rel, 'worst': worst,
          'best_step': [one['best_step'], every['best_step']],
          'train_seconds': [one['train_seconds'], every['train_seconds']],
          'determinism_on': [log_says('train_1', 'GPU determinism on'),
                             log_says('train_all', 'GPU determinism on')],
          'test_1': one['test'], 'test_all': every['test']}
json.dump(detail, open(f'{work}/compare.detail.json', 'w'))
print(json.dumps(detail))
sys.exit(0 if ok else 1)
PY

# ----------------------------------------------------------------------------- export
step export "$(limit export)" "$PYTHON" -m htl_jax.cli.export --workdir="$WORK/train_1" \
  --out="$WORK/exported"
step export_call "$(limit export)" "$PYTHON" - "$WORK" "$MODE" <<'PY'
import json, sys
import jax
from jax import export
import numpy as np
work, mode = sys.argv[1:3]
with open(f'{work}/exported/model.jax_export', 'rb') as f:
  exported = export.deserialize(bytearray(f.read()))
with open(f'{work}/exported/serving.json') as f:
  signature = json.load(f)
rng = np.random.default_rng(0)
ids = np.stack([rng.integers(0, v, 1000) for v in signature['input']['vocab_sizes']],
               axis=1).astype(np.int32)
cpu = jax.devices('cpu')[0]
probs_cpu, core_cpu = jax.device_get(exported.call(jax.device_put(ids, cpu)))
detail = {'platforms': list(exported.platforms), 'rows': len(ids),
          'cpu_finite': bool(np.isfinite(probs_cpu).all() and np.isfinite(core_cpu).all())}
ok = detail['cpu_finite'] and 'cuda' in detail['platforms']
if mode == 'gpu':
  gpu = jax.devices('gpu')[0]
  probs, core = exported.call(jax.device_put(ids, gpu))
  detail['called_on'] = sorted({d.platform for d in probs.devices()})
  probs, core = np.asarray(probs), np.asarray(core)
  # Lowered at JAX's default matmul precision: TF32 on recent NVIDIA GPUs.
  detail['max_abs_diff_probs'] = float(np.abs(probs - probs_cpu).max())
  detail['max_rel_diff_core'] = float(
      (np.abs(core - core_cpu) / np.maximum(np.abs(core_cpu), 1e-3)).max())
  ok = (ok and detail['called_on'] == ['gpu'] and detail['max_abs_diff_probs'] < 1e-2
        and detail['max_rel_diff_core'] < 1e-2)
detail['ok'] = bool(ok)
json.dump(detail, open(f'{work}/export_call.detail.json', 'w'))
print(json.dumps(detail))
sys.exit(0 if ok else 1)
PY

# ----------------------------------------------------------------------------- bench
step bench "$(limit bench)" "$PYTHON" tools/bench.py "${BENCH_ARGS[@]}"
"$PYTHON" - "$WORK" "$MODE" <<'PY'
import json, sys
work, mode = sys.argv[1:3]
try:
  with open(f'{work}/bench.log') as f:
    lines = [line for line in f if line.startswith('{')]
  result = json.loads(lines[-1])
  detail = {'ok': result['backend'] == ('cpu' if mode == 'cpu' else 'gpu'), 'result': result}
except (OSError, IndexError, KeyError, ValueError):
  detail = {'ok': False, 'result': None}
json.dump(detail, open(f'{work}/bench.detail.json', 'w'))
PY

finish

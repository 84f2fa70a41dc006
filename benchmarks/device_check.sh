#!/usr/bin/env bash
# The prepared GPU check: one script, at most 8 minutes on one GPU (its time limits add up to 450 s). Run it once
# whenever a CUDA device is lent and put its numbers in the README. Each part has its own time limit and records its
# exit status and seconds, so one failure does not hide the others.
#
# The lent machine has torch, pytest and hypothesis but not kornia, and reaches no package index: kornia travels
# as wheels. Here, once:   make device-wheels          (kornia's wheels for its Python 3.12, into .whl/, ignored)
# then with the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=560)
#
# It writes three files to $OUT (./device_report when unset; the device tool brings back at most 8):
#   report.json        each part's exit status and seconds, torch and the device, the Distiller epochs
#   bench_speed.txt    bench_speed.py's table: CUDA, bf16, 128x3x32x32 and 256x3x224x224, ours (eager and
#                      compile=True) against kornia's RandAugment forward, aten ops and GPU kernels per call,
#                      first calls
#   device_check.log   every part's output
#
# Parts: setup (the wheels into a temporary folder, the project itself without dependencies, offline); the tests
# marked cuda (compile=True against eager in the GPU's layout, CUDA graphs too: compiling is most of their time);
# bench_epoch.py (a Distiller epoch of resnet56 -> resnet20 in fp32, bf16 and fp16); fit-priors on the device for
# two ops with few steps; bench_speed.py.
#
#   DEVICE=cpu SMOKE=1 bash benchmarks/device_check.sh     every part on the CPU at toy sizes (a test runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_report}"
DEVICE="${DEVICE:-cuda}"
SMOKE="${SMOKE:-0}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # a part stopped by its time limit keeps what it printed
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
PARTS=()

# part NAME LIMIT OUTPUT COMMAND...: COMMAND under a time limit, its stdout to OUTPUT ("-": the log), its stderr to
# the log; the exit status (124: the limit) and the seconds are recorded for the report.
part() {
  local name=$1 limit=$2 output=$3 start=$SECONDS rc
  shift 3
  [ "$output" = "-" ] && output="$LOG"
  # The limits keep a device run inside its lease; a smoke run (a test) has none: a loaded machine is no failure.
  [ "$SMOKE" = 1 ] && limit=0  # timeout 0: no limit
  echo "== $name (limit ${limit} s): $*" >>"$LOG"
  timeout "$limit" "$@" >>"$output" 2>>"$LOG"
  rc=$?
  echo "== $name: exit status $rc after $((SECONDS - start)) s" >>"$LOG"
  PARTS+=("$name" "$rc" "$((SECONDS - start))")
}

setup() {
  if ! "$PY" -c "import kornia" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site" .whl/*.whl || return 1
  fi
  # Imported from outside the tree: from its root, "import diffaug" finds the sources without an install.
  local installed="import diffaug.priors; diffaug.priors.shipped_priors_dir()"
  if ! (cd "$SCRATCH" && PYTHONPATH="$SCRATCH/site" "$PY" -c "$installed") 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  fi
  PYTHONPATH="$SCRATCH/site" "$PY" -c "import diffaug, kornia, torch
print('torch', torch.__version__, 'kornia', kornia.__version__, 'cuda', torch.cuda.is_available())"
}
start=$SECONDS
echo "== setup" >>"$LOG"
setup >>"$LOG" 2>&1
PARTS+=(setup "$?" "$((SECONDS - start))")
export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SMOKE" = 1 ]; then
  EPOCH=(--images 64 --batch-size 32 --amp none bf16)
  FIT=(--steps 2 --batch-size 4 --image-size 16)
  SPEED=(--dtype float32 --shapes 4x40 --repeats 1)
else
  EPOCH=()
  FIT=(--steps 200)
  SPEED=(--dtype bfloat16 --quick)
fi
part cuda_tests 180 - "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
part bench_epoch 70 - "$PY" benchmarks/bench_epoch.py --device "$DEVICE" --out "$SCRATCH/epochs.json" "${EPOCH[@]}"
part fit_priors 40 - "$PY" -m diffaug fit-priors --ops Rotate Brightness --refine-iterations 0 --device "$DEVICE" \
  --out "$SCRATCH/priors" "${FIT[@]}"
part bench_speed 160 "$OUT/bench_speed.txt" "$PY" benchmarks/bench_speed.py --device "$DEVICE" "${SPEED[@]}"

"$PY" - "$OUT/report.json" "$SCRATCH/epochs.json" "${PARTS[@]}" <<'PYTHON'
import json, os, sys

import torch

out, epochs, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
report = {
    "torch": torch.__version__,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
    "parts": {name: {"exit_status": int(rc), "seconds": int(s)} for name, rc, s in zip(*[iter(parts)] * 3)},
    "epochs": json.load(open(epochs))["epochs"] if os.path.exists(epochs) else None,
}
with open(out, "w") as file:
    json.dump(report, file, indent=1)
print(json.dumps(report, indent=1))
PYTHON
